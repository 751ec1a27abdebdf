"""From a checked OpenAI request to engine requests and back to OpenAI responses.

    prompts (token ids) x (best_of or n) --submit--> EngineLoop: one Request per choice; its events -> one
                                                     asyncio.Queue
    Job.events() --collect()--> one JSON body      (choices in index order; best_of: the n best by mean logprob)
                 --stream()---> SSE chunks ... [usage chunk] data: [DONE]
    client gone (http.disconnect) -> EngineLoop.cancel for every unfinished choice

Choice index = prompt index * n + j; with a seed, choice j samples with seed + j. The event callback runs on
the loop thread and only hands the event to the asyncio loop (never blocks). The response objects are built
by responses.py, logprobs by logprobs.py.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..runtime.loop import QueueFull, Request
from ..runtime.sampling import resolve_sampling
from .protocol import APIError, error_body
from .responses import Choice, Output, Shape, usage

COMPLETION_DEFAULT_MAX_TOKENS = 16           # OpenAI's default for /v1/completions
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "logit_bias", "allowed_token_ids", "min_tokens", "logprobs",
                    "prompt_logprobs", "seed")


# ---- building engine requests ------------------------------------------------------------------
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


def output_for(body, chat: bool) -> Output:
    """What the response shows besides text, and checks of the fields that only make sense together."""
    opts = body.stream_options
    if opts is not None and not body.stream:
        raise APIError(400, "stream_options can only be set when stream is true", "stream_options")
    if chat and body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if body.best_of is not None:
        if body.best_of < body.n:
            raise APIError(400, f"best_of={body.best_of} must be >= n={body.n}", "best_of")
        if body.stream and body.best_of > body.n:
            raise APIError(400, "best_of > n cannot be streamed (the best are known only at the end)", "best_of")
    return Output(chat, echo=body.echo, logprobs=body.top_logprobs_k, prompt_logprobs=body.prompt_logprobs,
                  token_ids=body.return_token_ids, stop_token_ids=frozenset(body.stop_token_ids or ()),
                  continuous_usage=bool(opts and opts.continuous_usage_stats))


def check_token_ids(body, vocab: int, gen_config: dict, out: Output) -> None:
    """Token ids named by the request must exist in the vocabulary (400 naming the field): logit_bias and
    allowed_token_ids through SamplingParams' own checks, stop_token_ids here."""
    params = sampling_for(gen_config, body, 0, out)
    try:
        params.check_vocab(vocab)
    except ConfigError as e:
        raise APIError(400, str(e), _param_of(str(e))) from None
    for i in body.stop_token_ids or []:
        if not 0 <= i < vocab:
            raise APIError(400, f"stop_token_ids names token id {i}; token ids are integers in 0..{vocab - 1}",
                           "stop_token_ids")


def sampling_for(gen_config: dict, body, j: int, out: Output):
    """Choice j's SamplingParams. best_of > n ranks candidates by logprob, so they are computed then."""
    values = {name: getattr(body, name, None) for name in _SAMPLING_FIELDS}
    values["top_k"] = 0 if body.top_k == -1 else body.top_k
    values["seed"] = None if body.seed is None else body.seed + j
    values["logprobs"] = out.logprobs if out.logprobs is not None else (0 if (body.best_of or 1) > body.n else None)
    prompt_k = [k for k in (out.prompt_logprobs, out.logprobs if out.echo_logprobs else None) if k is not None]
    values["prompt_logprobs"] = max(prompt_k) if prompt_k else None
    values["min_tokens"] = body.min_tokens or None
    try:
        return resolve_sampling(gen_config, **values)
    except ConfigError as e:
        raise APIError(400, str(e), _param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    """The request field a SamplingParams error names (its messages start with the field)."""
    return next((f for f in _SAMPLING_FIELDS if message.startswith(f)), None)


@dataclass
class Job:
    """The engine requests of one HTTP request and the queue their events arrive on."""

    loop: object                                   # EngineLoop
    queue: asyncio.Queue
    prompt_tokens: int
    out: Output
    n_per_prompt: int = 1                          # choices returned per prompt (n)
    ids: list[str] = field(default_factory=list)   # engine request id per candidate index
    choices: list[Choice] = field(default_factory=list)   # one per candidate (best_of of them per prompt)
    finished: set[int] = field(default_factory=set)
    disconnected: bool = False
    watcher: asyncio.Task | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(c.completion_tokens for c in self.choices))

    def best(self) -> list[Choice]:
        """The n choices per prompt to return: all of them, or with best_of the n with the highest mean logprob."""
        per_prompt = self.n // max(1, len({c.prompt for c in self.choices}))
        if per_prompt == self.n_per_prompt:
            return self.choices
        out = []
        for start in range(0, self.n, per_prompt):
            group = self.choices[start:start + per_prompt]
            out += sorted(group, key=lambda c: -c.mean_logprob)[:self.n_per_prompt]
        return out

    async def events(self):
        """(choice index, Event) in arrival order until every choice has finished."""
        index = {rid: i for i, rid in enumerate(self.ids)}
        while len(self.finished) < self.n:
            ev = await self.queue.get()
            i = index[ev.request_id]
            if ev.finish_reason is not None:
                self.finished.add(i)
            if ev.finish_reason not in ("error", "abort"):
                self.choices[i].add(ev, self.out)
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


def submit(loop, metrics, gen_config: dict, prompts: list[list[int]], max_tokens: list[int], body, out: Output,
           eos_token_ids: set[int], prompt_texts: list[str] | None = None, constraints=None, client=None) -> Job:
    """One engine Request per (prompt, j < best_of or n); all or none are queued (QueueFull -> 503).
    eos_token_ids: the model's (ignore_eos drops them; stop_token_ids are added). prompt_texts: echoed before
    each choice's text when the request asks for echo. constraints(): a new grammar TokenConstraint per choice."""
    aio = asyncio.get_running_loop()
    job = Job(loop, asyncio.Queue(), sum(len(p) for p in prompts), out, body.n)
    eos = (set() if body.ignore_eos else set(eos_token_ids)) | set(body.stop_token_ids or ())
    if body.allowed_token_ids and body.min_tokens and set(body.allowed_token_ids) <= eos:
        raise APIError(400, f"allowed_token_ids holds only end ids ({sorted(set(body.allowed_token_ids))}), which "
                       f"min_tokens={body.min_tokens} forbids at first: no token could be generated",
                       "allowed_token_ids")
    candidates = body.best_of or body.n

    def on_event(ev) -> None:                      # on the loop thread
        metrics.observe(ev)
        try:
            aio.call_soon_threadsafe(job.queue.put_nowait, ev)
        except RuntimeError:                       # the event loop is closed: nobody listens any more
            pass

    stops = body.stop_list()
    try:
        for p, ids in enumerate(prompts):
            for j in range(candidates):
                req = Request(ids, max_tokens[p], sampling_for(gen_config, body, j, out), on_event, stops, eos,
                              constraint=constraints() if constraints is not None else None,
                              keep_stop=body.include_stop_str_in_output,
                              skip_special_tokens=body.skip_special_tokens, client=client)
                job.ids.append(req.request_id)
                job.choices.append(Choice(p, ids, prompt_texts[p] if prompt_texts and out.echo else ""))
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
def _failure(job: Job, ev) -> APIError:
    if ev.finish_reason == "error":
        return APIError(500, f"generation failed: {ev.error}")
    return APIError(503, "the request was aborted because the server is shutting down; retry later")


async def collect(job: Job, shape: Shape) -> dict | None:
    """Wait for every choice; the response body, or None when the client has gone."""
    try:
        async for _, ev in job.events():
            if ev.finish_reason in ("error", "abort"):
                if job.disconnected:
                    return None
                raise _failure(job, ev)
    finally:
        job.close()
    return shape.full(job.best(), job.usage())


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(job: Job, shape: Shape, include_usage: bool):
    """Server-sent events: a chunk per piece of text, the finish of each choice, [usage], [DONE]. With
    continuous_usage_stats every chunk carries the usage so far; else with include_usage chunks carry
    "usage": null and a last chunk has the totals."""
    def send(chunk: dict) -> str:
        if job.out.continuous_usage:
            chunk["usage"] = job.usage()
        elif include_usage:
            chunk["usage"] = None
        return sse(chunk)

    try:
        if shape.chat:
            for i in range(job.n):
                yield send(shape.opening(i, job.choices[i]))
                job.choices[i].opened = True
        async for i, ev in job.events():
            if ev.finish_reason in ("error", "abort") and job.disconnected:
                return
            if ev.finish_reason == "error":         # "abort" (the drain deadline) ends its choice like vLLM's abort
                err = _failure(job, ev)
                yield sse(error_body(err.status, err.message))
                break
            choice = job.choices[i]
            if ev.finish_reason == "abort":
                choice.finish_reason = "abort"
            if not choice.opened:
                choice.opened = True
                if (opening := shape.opening(i, choice)) is not None:
                    yield send(opening)
            if ev.text or ev.finish_reason or ev.logprobs or (job.out.token_ids and ev.token_ids):
                for chunk in shape.chunks(i, choice, ev):
                    yield send(chunk)
        else:
            if include_usage:
                yield sse(shape.usage_chunk(job.usage()))
        yield "data: [DONE]\n\n"
    finally:
        job.close()


__all__ = ["Job", "check_token_ids", "collect", "max_tokens_for", "output_for", "stream", "submit"]
