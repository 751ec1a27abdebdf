"""OpenAI's response objects for /v1/completions and /v1/chat/completions, whole or as stream chunks.

    Output (what the request asked to see: echo, logprobs, token ids, usage style) + Choice (one choice's
    accumulated text, ids, logprobs, finish) --Shape.full()--> one body | --Shape.chunk()--> one SSE chunk

Choice fields a vLLM client reads are filled the way vLLM fills them: `stop_reason` (the stop string or stop
token id that ended it, None for eos or length), `prompt_logprobs`, `token_ids` / `prompt_token_ids` (with
return_token_ids). Usage carries `prompt_tokens_details.cached_tokens` (always 0: there is no prefix cache).
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from . import logprobs as lp


@dataclass
class Output:
    """What a request asked to see besides the text (derived from the body once)."""

    chat: bool
    echo: bool = False
    logprobs: int | None = None           # alternatives per generated token (None: no logprobs)
    prompt_logprobs: int | None = None    # vLLM's prompt_logprobs (None: not asked)
    token_ids: bool = False               # return_token_ids
    stop_token_ids: frozenset = frozenset()
    continuous_usage: bool = False

    @property
    def echo_logprobs(self) -> bool:
        """Completions with echo and logprobs: the prompt's tokens are scored too."""
        return self.echo and self.logprobs is not None and not self.chat


@dataclass
class Choice:
    """One choice (or best_of candidate) as its events arrive."""

    prompt: int                                  # index of its prompt
    prompt_ids: list[int]
    prompt_text: str = ""                        # echoed before the text when asked
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion_tokens: int = 0
    offset: int = 0                              # text_offset of its next token (completions logprobs)
    opened: bool = False                         # its opening stream chunk (role / echo) has gone out
    started: bool = False                        # its first event chunk has gone out
    tool_stream: object | None = None            # chat with tools: its tools.ToolCallStream

    def add(self, ev, out: Output) -> None:
        self.text.append(ev.text)
        self.token_ids.extend(ev.token_ids)
        self.logprobs.extend(ev.logprobs or [])
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        self.completion_tokens = ev.completion_tokens
        if ev.finish_reason is not None:
            self.finish_reason = "stop" if ev.finish_reason == "stop" else ev.finish_reason
            reason = ev.stop_reason
            self.stop_reason = None if isinstance(reason, int) and reason not in out.stop_token_ids else reason

    @property
    def mean_logprob(self) -> float:
        """Average logprob per generated token (best_of's ranking)."""
        return sum(e[1] for e in self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


class Shape:
    """Builds response bodies and chunks for one request (one id and creation time for all its chunks)."""

    def __init__(self, out: Output, model: str, text_of, request_id: str | None = None, tools=None):
        self.out, self.model, self.text_of = out, model, text_of     # text_of: token id -> its text (TokenText)
        self.tools = tools                       # chat with tools: a tools.ToolPlan parses calls from the text
        self.chat = out.chat
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + (request_id or uuid.uuid4().hex)
        self.created = int(time.time())

    def _obj(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    # ---- whole responses -----------------------------------------------------------------------
    def full(self, choices: list[Choice], usage: dict) -> dict:
        rows = [self._full_choice(i, c) for i, c in enumerate(choices)]
        return self._obj("chat.completion" if self.chat else "text_completion", rows, usage=usage)

    def _full_choice(self, index: int, c: Choice) -> dict:
        text = "".join(c.text)
        row = {"index": index}
        if self.chat:
            row["message"] = {"role": "assistant", "content": c.prompt_text + text}
            row["logprobs"] = lp.chat(c.logprobs, self.text_of, self.out.logprobs) \
                if self.out.logprobs is not None else None
            if self.tools is not None:
                parsed = self.tools.parse(c.prompt_text + text, c.finish_reason)
                row["message"], c.finish_reason = parsed.message(), parsed.finish_reason
        else:
            row["text"] = c.prompt_text + text
            row["logprobs"] = self._completion_logprobs(c, c.prompt_logprobs if self.out.echo_logprobs else None,
                                                        c.logprobs)
        row.update(finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        self._extras(row, c, c.token_ids, first=True)
        return row

    def _completion_logprobs(self, c: Choice, prompt_entries: list | None, entries: list) -> dict | None:
        if self.out.logprobs is None:
            return None
        rows = []
        if prompt_entries is not None:             # echo: the prompt's tokens first, its first one unscored
            rows = [(c.prompt_ids[0], None, [])] + list(prompt_entries[1:])
        body, c.offset = lp.completion(rows + list(entries), self.text_of, c.offset, self.out.logprobs)
        return body

    def _extras(self, row: dict, c: Choice, token_ids: list[int], first: bool) -> None:
        if self.out.prompt_logprobs is not None and first:
            row["prompt_logprobs"] = lp.prompt(c.prompt_logprobs or [], self.text_of, self.out.prompt_logprobs)
        if self.out.token_ids:
            if first:
                row["prompt_token_ids"] = c.prompt_ids
            row["token_ids"] = token_ids

    # ---- stream chunks -------------------------------------------------------------------------
    def opening(self, index: int, c: Choice) -> dict | None:
        """The chunk before a choice's first event chunk: chat's role (and echoed text), or completions' echoed
        prompt (with its logprobs: call it once the choice's first event, which carries them, was added)."""
        if self.chat:
            delta = {"role": "assistant", "content": c.prompt_text}
            return self._chunk({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
        if not self.out.echo:
            return None
        row = {"index": index, "text": c.prompt_text, "finish_reason": None, "stop_reason": None}
        row["logprobs"] = self._completion_logprobs(c, c.prompt_logprobs, []) if self.out.echo_logprobs else None
        return self._chunk(row)

    def chunks(self, index: int, c: Choice, ev) -> list[dict]:
        """The chunks for one event of a choice (its new text, tokens, logprobs, finish): one, or with tools one
        per tool-call delta the text completes."""
        if self.tools is None or not self.chat:
            return [self.chunk(index, c, ev)]
        if c.tool_stream is None:
            c.tool_stream = self.tools.stream()
        deltas = c.tool_stream.feed(ev.text)
        if ev.finish_reason:
            more, c.finish_reason = c.tool_stream.finish(c.finish_reason)
            deltas += more
        if not deltas:                           # text held back (a tag may be starting): a chunk only if it has more
            deltas = [{}] if ev.finish_reason or ev.logprobs or (self.out.token_ids and ev.token_ids) else []
        return [self.chunk(index, c, ev, delta=d, last=i == len(deltas) - 1) for i, d in enumerate(deltas)]

    def chunk(self, index: int, c: Choice, ev, delta: dict | None = None, last: bool = True) -> dict:
        """A chunk for one event of a choice (delta: chat's delta when tools made it, else the event's text)."""
        row = {"index": index}
        entries = (ev.logprobs or []) if last else []
        if self.chat:
            row["delta"] = delta if delta is not None else ({"content": ev.text} if ev.text else {})
            row["logprobs"] = lp.chat(entries, self.text_of, self.out.logprobs) \
                if self.out.logprobs is not None and entries else None
        else:
            row["text"] = ev.text
            row["logprobs"] = self._completion_logprobs(c, None, entries) if entries else None
        end = bool(ev.finish_reason) and last
        row.update(finish_reason=c.finish_reason if end else None, stop_reason=c.stop_reason if end else None)
        self._extras(row, c, ev.token_ids if last else [], first=not c.started)
        c.started = True
        return self._chunk(row)

    def _chunk(self, row: dict, **extra) -> dict:
        return self._obj("chat.completion.chunk" if self.chat else "text_completion", [row], **extra)

    def usage_chunk(self, usage: dict) -> dict:
        return self._obj("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": 0}}


__all__ = ["Choice", "Output", "Shape", "usage"]
