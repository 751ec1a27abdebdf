"""Text of a sequence as it is generated: incremental detokenization and stop-string hold-back.

Decoding token by token breaks multi-byte characters and merges (a byte-level BPE token can be
half a UTF-8 character), so each step decodes the ids from the last emitted boundary and emits
the new text only once it no longer ends in a replacement character (as TGI and vLLM do):
IncrementalText. TextStream adds the hold-back of what could be the start of a stop string; it is
the one text stream of the engine (Engine.stream, the serving loop's events).
"""
from __future__ import annotations

from collections.abc import Callable


class IncrementalText:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0   # ids[prefix:read] decode to text already emitted (kept for merge context)
        self.read = 0
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still partial)."""
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


class TextStream:
    """One sequence's text as its tokens arrive: incremental detokenization plus stop-string hold-back.

    push(token) returns the text that became visible: everything decoded so far except the last
    (longest stop string - 1) characters, which could be the start of a stop string. For the token that
    ends the sequence, push(token, done=True) returns the rest instead: the whole generation decoded once
    more (which also flushes a partial character) and cut before the first stop string (the sequence's
    StopChecker, row 0). The pieces of one sequence concatenate to its final text. Used by Engine.stream and
    by the serving loop's events.
    """

    def __init__(self, decode: Callable[[list[int]], str], stopper):
        self.decode, self.stopper = decode, stopper
        self.text = IncrementalText(decode)
        self.hold = max((len(s) for s in stopper.stop_strings), default=1) - 1
        self.sent = 0                                     # characters handed out so far

    def push(self, token_id: int, done: bool = False) -> str:
        self.text.push(token_id)
        if done:
            text = self.stopper.trim(0, self.decode(self.text.ids))
            ready = len(text)
        else:
            text, ready = self.text.text, len(self.text.text) - self.hold
        if ready <= self.sent:
            return ""
        delta, self.sent = text[self.sent:ready], ready
        return delta
