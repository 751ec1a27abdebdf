"""Incremental detokenization: the text of a growing list of ids, decoding only a short window.

Decoding token by token breaks multi-byte characters and merges (a byte-level BPE token can be
half a UTF-8 character), so each step decodes the ids from the last emitted boundary and emits
the new text only once it no longer ends in a replacement character (as TGI and vLLM do).
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
