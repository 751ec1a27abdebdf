"""Per-sequence stop detection: end-of-sequence token ids and stop strings.

The checker sees only generated tokens (never the prompt). For stop strings it decodes a tail
window of the row's generated ids, just long enough to hold the longest stop string plus the newest
token's text, instead of the whole generation at every step. It does not count tokens against a
length limit; the engine does that.
"""

from __future__ import annotations

from collections.abc import Callable

from moe_engine.errors import ConfigError

Decode = Callable[[list[int]], str]  # token ids -> text, special tokens skipped

# Extra characters decoded to the left of the longest stop string: the left edge of a tail window
# can decode differently from the same tokens in context (a leading space dropped, a multi-byte
# character cut in half), so the window reaches a little further than strictly needed.
_EDGE_CHARS = 4


def normalize_eos(value) -> set[int]:
    """None -> set(), int -> {int}, list / tuple / set of ints -> set. Anything else is a ConfigError."""
    if value is None:
        return set()
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise ConfigError(f"eos_token_id={value!r} is invalid: use a token id or a list of token ids")
    bad = [item for item in items if not isinstance(item, int) or isinstance(item, bool) or item < 0]
    if bad:
        raise ConfigError(f"eos_token_id={value!r} is invalid: token ids must be integers >= 0, found {bad!r}")
    return set(items)


def normalize_stop(value) -> list[str]:
    """None -> [], str -> [str], list / tuple of str -> list. Empty or non-string entries are a ConfigError."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"stop={value!r} is invalid: use a string or a list of strings")
    if any(not isinstance(item, str) or item == "" for item in items):
        raise ConfigError(f"stop={value!r} is invalid: every stop string must be a non-empty string")
    return list(items)


class StopChecker:
    """Per-sequence stop detection on eos ids and stop strings.

    eos_token_ids: ids that end a row. stop_strings: texts that end a row once the generated text
    contains them. decode: token ids -> text (special tokens skipped), or None when there is no
    tokenizer, in which case stop strings are refused. Tokens passed to update() after a row is
    finished are ignored. min_tokens: neither eos ids nor stop strings end a row before it has this many
    tokens (vLLM's min_tokens). keep_stop: trim() keeps the stop string that ended the row
    (include_stop_str_in_output). stop_reason(row): the eos id or the stop string that ended the row.
    """

    def __init__(self, eos_token_ids, stop_strings, decode: Decode | None, batch_size: int, min_tokens: int = 0,
                 keep_stop: bool = False):
        self.eos_token_ids = normalize_eos(eos_token_ids)
        self.stop_strings = normalize_stop(stop_strings)
        if self.stop_strings and decode is None:
            raise ConfigError(
                f"stop strings {self.stop_strings!r} need a tokenizer to decode text, but none was loaded: "
                "drop the stop strings or use a model directory with a tokenizer"
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is invalid: use an integer >= 1")
        self._decode = decode
        self.min_tokens, self.keep_stop = min_tokens, keep_stop
        self._matched: list[int | str | None] = [None] * batch_size
        self._max_stop_chars = max((len(s) for s in self.stop_strings), default=0)
        self._ids: list[list[int]] = [[] for _ in range(batch_size)]
        self._reasons: list[str | None] = [None] * batch_size

    def update(self, row: int, token_id: int) -> bool:
        """Append a generated token to the row; True when the row is done (now or before)."""
        if self._reasons[row] is not None:
            return True
        self._ids[row].append(token_id)
        if len(self._ids[row]) < self.min_tokens:
            return False
        if token_id in self.eos_token_ids:
            self._reasons[row], self._matched[row] = "eos", token_id
        elif self.stop_strings and self._tail_has_stop(self._ids[row]):
            self._reasons[row] = "stop"
        return self._reasons[row] is not None

    def stop_reason(self, row: int) -> int | str | None:
        """The eos / stop token id or the stop string that ended the row (None: not ended by one)."""
        if self._reasons[row] == "stop" and self._matched[row] is None:
            tail = self._tail_text(self._ids[row])
            self._matched[row] = min((s for s in self.stop_strings if s in tail), key=tail.find)
        return self._matched[row]

    def finished(self, row: int) -> bool:
        return self._reasons[row] is not None

    def reason(self, row: int) -> str | None:
        """"eos", "stop", or None while the row is still running."""
        return self._reasons[row]

    def trim(self, row: int, text: str) -> str:
        """Cut a row's full generated text before (keep_stop: after) its first stop string; unchanged unless
        stopped on one."""
        if self._reasons[row] != "stop":
            return text
        hits = [(pos, pos + len(s)) for pos, s in ((text.find(s), s) for s in self.stop_strings) if pos >= 0]
        if not hits:
            return text
        start, end = min(hits)
        return text[:end] if self.keep_stop else text[:start]

    def _tail_has_stop(self, ids: list[int]) -> bool:
        tail = self._tail_text(ids)
        return any(s in tail for s in self.stop_strings)

    def _tail_text(self, ids: list[int]) -> str:
        """Decode the fewest trailing ids whose text covers the newest token plus the longest stop string.

        Any stop string that newly appeared ends inside the newest token's text (or within a few
        characters of it), so it lies inside this window. The window doubles until long enough.
        """
        needed = len(self._decode(ids[-1:])) + self._max_stop_chars + _EDGE_CHARS
        window = self._max_stop_chars + _EDGE_CHARS
        while True:
            start = max(0, len(ids) - window)
            text = self._decode(ids[start:])
            if start == 0 or len(text) >= needed:
                return text
            window *= 2


__all__ = ["StopChecker", "normalize_eos", "normalize_stop"]
