"""From a checked OpenAI request to engine requests and back to OpenAI responses.

    prompts (token ids) x n --submit--> EngineLoop: one Request per choice; its events -> one asyncio.Queue
    Job.events() --collect()--> one JSON body      (choices in index order, usage)
                 --stream()---> SSE chunks ... [usage chunk] data: [DONE]
    client gone (http.disconnect) -> EngineLoop.cancel for every unfinished choice

Choice index = prompt index * n + j; with a seed, choice j samples with seed + j. The event
callback runs on the loop thread and only hands the event to the asyncio loop (never blocks).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..runtime.loop import QueueFull, Request
from ..runtime.sampling import resolve_sampling
from .protocol import APIError, error_body

COMPLETION_DEFAULT_MAX_TOKENS = 16           # OpenAI's default for /v1/completions


# ---- building engine requests ------------------------------------------------------------------
def check_prompt(ids: list[int], limit: int, vocab: int, what: str) -> None:
    if not ids:
        raise APIError(400, f"{what} is empty: give at least one token", what)
    if min(ids) < 0 or max(ids) >= vocab:
        raise APIError(400, f"{what} has token id {min(ids) if min(ids) < 0 else max(ids)} outside the "
                       f"vocabulary 0..{vocab - 1}", what)
    if len(ids) >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} has "
                       f"{len(ids)} tokens; shorten it", what)


def max_tokens_for(asked: int | None, prompt_len: int, limit: int, default: int | None, what: str) -> int:
    """max_tokens of one prompt: the asked value (checked against the context), else the default capped by it."""
    room = limit - prompt_len
    if asked is None:
        return room if default is None else min(default, room)
    if prompt_len + asked > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{prompt_len + asked} tokens ({prompt_len} in the {what}, {asked} in the completion). "
                       f"Please reduce the length of the {what} or max_tokens", "max_tokens")
    return asked


def sampling_for(gen_config: dict, body, j: int):
    top_k = 0 if body.top_k == -1 else body.top_k
    seed = None if body.seed is None else body.seed + j
    try:
        return resolve_sampling(gen_config, temperature=body.temperature, top_p=body.top_p, top_k=top_k, seed=seed)
    except ConfigError as e:
        raise APIError(400, str(e)) from None


@dataclass
class Job:
    """The engine requests of one HTTP request and the queue their events arrive on."""

    loop: object                                   # EngineLoop
    queue: asyncio.Queue
    prompt_tokens: int
    ids: list[str] = field(default_factory=list)   # engine request id per choice index
    finished: set[int] = field(default_factory=set)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    disconnected: bool = False
    watcher: asyncio.Task | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def usage(self) -> dict:
        done = sum(self.completion_tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    async def events(self):
        """(choice index, Event) in arrival order until every choice has finished."""
        index = {rid: i for i, rid in enumerate(self.ids)}
        while len(self.finished) < self.n:
            ev = await self.queue.get()
            i = index[ev.request_id]
            if ev.finish_reason is not None:
                self.finished.add(i)
                self.completion_tokens[i] = ev.completion_tokens
            yield i, ev

    def cancel_unfinished(self) -> None:
        for i, rid in enumerate(self.ids):
            if i not in self.finished:
                self.loop.cancel(rid)

    def close(self) -> None:
        """The response is over (sent, failed or abandoned): cancel what still runs, stop watching."""
        self.cancel_unfinished()
        if self.watcher is not None:
            self.watcher.cancel()

    def watch(self, receive) -> None:
        """Cancel every unfinished choice when the client disconnects."""
        async def run():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected = True
                    self.cancel_unfinished()
                    return
        self.watcher = asyncio.get_running_loop().create_task(run())


def submit(loop, metrics, gen_config: dict, prompts: list[list[int]], max_tokens: list[int], body,
           eos_token_ids=None, client=None) -> Job:
    """One engine Request per (prompt, j < n); all or none are queued (QueueFull -> 503)."""
    aio = asyncio.get_running_loop()
    job = Job(loop, asyncio.Queue(), sum(len(p) for p in prompts))

    def on_event(ev) -> None:                      # on the loop thread
        metrics.observe(ev)
        try:
            aio.call_soon_threadsafe(job.queue.put_nowait, ev)
        except RuntimeError:                       # the event loop is closed: nobody listens any more
            pass

    stops = body.stop_list()
    try:
        for p, ids in enumerate(prompts):
            for j in range(body.n):
                req = Request(ids, max_tokens[p], sampling_for(gen_config, body, j), on_event, stops, eos_token_ids,
                              client=client)
                job.ids.append(req.request_id)
                loop.submit(req)
    except QueueFull as e:
        job.close()
        raise APIError(503, f"the server is busy: {e}") from None
    except ValueError as e:
        job.close()
        raise APIError(400, str(e), "max_tokens") from None
    except APIError:
        job.close()
        raise
    return job


# ---- responses ---------------------------------------------------------------------------------
class Shape:
    """OpenAI's response objects for /v1/completions (chat=False) or /v1/chat/completions (chat=True)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _obj(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def full(self, texts: list[str], reasons: list[str], usage: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
            return self._obj("chat.completion", choices, usage=usage)
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return self._obj("text_completion", choices, usage=usage)

    def chunk(self, index: int, text: str | None, reason: str | None, **extra) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return self._obj("chat.completion.chunk", [choice], **extra)
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._obj("text_completion", [choice], **extra)

    def usage_chunk(self, usage: dict) -> dict:
        return self._obj("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)


def _failure(job: Job, ev) -> APIError:
    if ev.finish_reason == "error":
        return APIError(500, f"generation failed: {ev.error}")
    return APIError(503, "the request was aborted because the server is shutting down; retry later")


async def collect(job: Job, shape: Shape) -> dict | None:
    """Wait for every choice; the response body, or None when the client has gone."""
    texts: list[list[str]] = [[] for _ in range(job.n)]
    reasons: list[str | None] = [None] * job.n
    try:
        async for i, ev in job.events():
            if ev.finish_reason in ("error", "abort"):
                if job.disconnected:
                    return None
                raise _failure(job, ev)
            texts[i].append(ev.text)
            reasons[i] = ev.finish_reason
    finally:
        job.close()
    return shape.full(["".join(t) for t in texts], reasons, job.usage())


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(job: Job, shape: Shape, include_usage: bool):
    """Server-sent events: a chunk per piece of text, the finish of each choice, [usage], [DONE]."""
    extra = {"usage": None} if include_usage else {}
    try:
        if shape.chat:
            for i in range(job.n):
                yield sse(shape.chunk(i, None, None, **extra))
        async for i, ev in job.events():
            if ev.finish_reason in ("error", "abort") and job.disconnected:
                return
            if ev.finish_reason == "error":         # "abort" (the drain deadline) ends its choice like vLLM's abort
                err = _failure(job, ev)
                yield sse(error_body(err.status, err.message))
                break
            if ev.text or ev.finish_reason:
                yield sse(shape.chunk(i, ev.text, ev.finish_reason, **extra))
        else:
            if include_usage:
                yield sse(shape.usage_chunk(job.usage()))
        yield "data: [DONE]\n\n"
    finally:
        job.close()


__all__ = ["Job", "Shape", "check_prompt", "collect", "max_tokens_for", "stream", "submit"]
