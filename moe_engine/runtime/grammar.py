"""Grammar-constrained decoding: which token ids a sequence may take next, per step.

    GrammarCompiler(tokenizer, vocab_size, eos_token_ids)       one per engine (reads the vocabulary once)
        .json_schema(schema) .json_object() .regex(p) .choice([...]) .grammar(ebnf_or_lark)
        .compile(kind, spec, ...)                               the same by kind name (server/tools.py's Constraint)
            -> Grammar      checked and compiled once, cached by its text (LRU of cache_size)
    Grammar.new() -> TokenConstraint                            one per sequence, its own parser state
    each decode step:
        allowed()  -> BoolTensor [vocab_size]                   True = may be sampled; eos only where it may end
        logits.masked_fill_(~allowed.to(logits.device), -inf)   before any other logits processing
        sample -> accept(token)                                 raises TokenRejected for a masked token
    speculative decoding: allowed_along(draft) -> [k+1, V] masks along a draft (state unchanged);
        accept the kept tokens; rollback(n) undoes the last n accepted (eos included).

Backed by llguidance (bench/bench_grammar.py compares it with xgrammar and outlines-core): no compile step
beyond parsing (per-request schemas and many-tool schemas stay cheap), every JSON-schema keyword it accepts is
enforced and the rest are refused by name, rollback, no Python dependencies. The mask covers the model's
vocab_size: ids past the tokenizer's vocabulary are never allowed, and neither are special tokens, except
the eos ids where the grammar may end. Bad specs raise ConfigError with one line naming the kind and the
fault. This module does not sample, stop sequences, or know about requests.
"""
from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable

import llguidance
import torch

from moe_engine.errors import ConfigError, TokenizerError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")   # "json" is json_schema's alias
# byte -> its 8 bits, least significant first: the bitmask's words are little-endian uint32
_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()   # [256, 8]


class TokenRejected(ValueError):
    """accept() was given a token the grammar does not allow here (the mask was not applied)."""


def _one_line(message: str, limit: int = 300) -> str:
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _tokenizer_json(tokenizer) -> str:
    """The tokenizers-library JSON of a fast HF tokenizer (or a tokenizers.Tokenizer), padding off."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise TokenizerError(f"structured output needs a fast (tokenizers-backed) tokenizer; got "
                             f"{type(tokenizer).__name__}. Give the model directory a tokenizer.json")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


class GrammarCompiler:
    """Compiles grammars for one tokenizer and model vocabulary; thread-safe; caches by grammar text."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int], *, cache_size: int = 64):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ConfigError(f"vocab_size must be a positive int (the model's logits width), got {vocab_size!r}")
        eos = sorted({int(e) for e in eos_token_ids})
        if not eos or not all(0 <= e < vocab_size for e in eos):
            raise ConfigError(f"eos_token_ids must be non-empty ids below vocab_size {vocab_size}, got {eos}")
        text = _tokenizer_json(tokenizer)
        n_tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer).get_vocab_size(with_added_tokens=True)
        self.vocab_size, self.eos_token_ids = vocab_size, tuple(eos)
        self.lib_vocab = max(vocab_size, n_tokenizer)   # llguidance needs every tokenizer id; extra ids masked
        try:
            self.tokenizer = llguidance.LLTokenizer(text, n_vocab=self.lib_vocab, eos_token=eos)
        except Exception as e:  # noqa: BLE001 - the library's reason, on one line
            raise TokenizerError(f"structured output cannot use this tokenizer: {_one_line(e)}") from e
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size, self._lock = cache_size, threading.Lock()

    # ---- the kinds ------------------------------------------------------------------------------------
    def json_schema(self, schema: dict | str, *, any_whitespace: bool = True,
                    whitespace_pattern: str | None = None) -> Grammar:
        """Output is one JSON value valid under `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConfigError(f"json_schema: the schema is not valid JSON ({e})") from None
        if not isinstance(schema, dict | bool):
            raise ConfigError(f"json_schema: a schema is a JSON object, got {type(schema).__name__}")
        return self._get("json_schema", llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides=_ws_options(any_whitespace, whitespace_pattern)))

    def json_object(self, *, any_whitespace: bool = True, whitespace_pattern: str | None = None) -> Grammar:
        """Output is one JSON object (any keys and values)."""
        return self._get("json_object", llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, overrides=_ws_options(any_whitespace, whitespace_pattern)))

    def regex(self, pattern: str) -> Grammar:
        """Output matches `pattern` as a whole (Rust regex syntax: no look-around, no backreferences)."""
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"regex: the pattern must be a non-empty string, got {pattern!r}")
        return self._get("regex", llguidance.LLMatcher.grammar_from_regex(pattern))

    def choice(self, options: list[str]) -> Grammar:
        """Output is exactly one of `options`."""
        if (not isinstance(options, list | tuple) or not options
                or not all(isinstance(o, str) and o for o in options)):
            raise ConfigError(f"choice: give a non-empty list of non-empty strings, got {options!r}")
        return self._get("choice", llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o) for o in options)))

    def grammar(self, text: str) -> Grammar:
        """Output follows a context-free grammar: GBNF/EBNF (`root ::= ...`, llama.cpp's) or Lark (`start: ...`)."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"grammar: give the grammar's text (GBNF `root ::= ...` or Lark `start: ...`), "
                              f"got {text!r}")
        try:
            return self._get("grammar", llguidance.grammar_from("grammar", text))
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"grammar: {_one_line(e)}") from None

    ebnf = grammar

    def compile(self, kind: str, spec=None, *, any_whitespace: bool = True,
                whitespace_pattern: str | None = None) -> Grammar:
        """By kind name: "json_schema" or "json" (spec = the schema), "json_object", "regex", "choice", "grammar"."""
        if kind in ("json_schema", "json"):
            return self.json_schema(spec, any_whitespace=any_whitespace, whitespace_pattern=whitespace_pattern)
        if kind == "json_object":
            return self.json_object(any_whitespace=any_whitespace, whitespace_pattern=whitespace_pattern)
        if kind in ("regex", "choice", "grammar"):
            return getattr(self, kind)(spec)
        raise ConfigError(f"unknown structured-output kind {kind!r}; expected one of {', '.join(KINDS)}")

    # ---- cache ----------------------------------------------------------------------------------------
    def _get(self, kind: str, text: str) -> Grammar:
        with self._lock:
            grammar = self._cache.get(text)
            if grammar is not None:
                self._cache.move_to_end(text)
                return grammar
        grammar = Grammar(self, kind, text)   # outside the lock: parsing a large grammar releases the GIL
        with self._lock:
            self._cache[text] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar


def _ws_options(any_whitespace: bool, whitespace_pattern: str | None) -> dict:
    if whitespace_pattern is not None:
        return {"whitespace_pattern": whitespace_pattern}
    return {"whitespace_flexible": bool(any_whitespace)}


class Grammar:
    """A checked, compiled grammar; `new()` gives each sequence its own TokenConstraint."""

    def __init__(self, compiler: GrammarCompiler, kind: str, text: str):
        self.compiler, self.kind, self.text = compiler, kind, text
        error = llguidance.LLMatcher.validate_grammar(text, compiler.tokenizer)
        if error:
            raise ConfigError(f"{kind}: {_one_line(error)}")
        self._template = llguidance.LLMatcher(compiler.tokenizer, text, log_level=0)
        first = TokenConstraint(self._template.deep_copy(), self)
        if not first.allowed().any():
            raise ConfigError(f"{kind}: no token can start the output (an empty language, or one this "
                              f"tokenizer cannot spell)")

    def new(self) -> TokenConstraint:
        return TokenConstraint(self._template.deep_copy(), self)


class TokenConstraint:
    """One sequence's grammar state. Not thread-safe: one sequence, one thread at a time."""

    def __init__(self, matcher, grammar: Grammar):
        self._m, self.grammar = matcher, grammar
        c = grammar.compiler
        self._vocab, self._eos = c.vocab_size, frozenset(c.eos_token_ids)
        self._words = torch.empty((c.lib_vocab + 31) // 32, dtype=torch.int32)   # the library's bitmask
        self._counted: list[bool] = []   # per accepted token: whether the parser consumed it
        self._mask: torch.Tensor | None = None

    @property
    def num_accepted(self) -> int:
        return len(self._counted)

    @property
    def finished(self) -> bool:
        """The output is complete: only eos may follow (or eos was accepted)."""
        return self._m.is_stopped()

    @property
    def can_end(self) -> bool:
        """eos is allowed now."""
        return self._m.is_accepting() or self._m.is_stopped()

    def allowed(self) -> torch.Tensor:
        """BoolTensor [vocab_size]: the ids that may come next. Shared until the next accept/rollback: read only."""
        if self._mask is None:
            self._m.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
            self._check()
            bits = _BITS[self._words.view(torch.uint8).long()].view(-1)   # [32 * words]
            mask = bits[:self._vocab]
            if mask.numel() < self._vocab:   # model ids past the tokenizer's: never allowed
                mask = torch.cat([mask, mask.new_zeros(self._vocab - mask.numel())])
            self._mask = mask
        return self._mask

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., vocab_size] with every disallowed id set to -inf, in place; returns logits."""
        if logits.shape[-1] != self._vocab:
            raise ValueError(f"logits have {logits.shape[-1]} columns, the grammar covers vocab_size {self._vocab}")
        return logits.masked_fill_(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance by one sampled token (eos included); TokenRejected if the mask did not allow it."""
        t = int(token_id)
        if not 0 <= t < self._vocab or not bool(self.allowed()[t]):
            raise TokenRejected(f"token {t} ({self._spell(t)}) is not allowed by the {self.grammar.kind} grammar "
                                f"after {self.num_accepted} tokens; apply allowed() to the logits before sampling")
        if t in self._eos and self._m.is_stopped():
            self._counted.append(False)   # the parser is already done: eos leaves no state to undo
        else:
            if not self._m.consume_token(t):
                self._check()
            self._counted.append(True)
        self._mask = None

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.num_accepted:
            raise ValueError(f"rollback({n!r}): can undo 0..{self.num_accepted} tokens")
        if n == 0:
            return
        consumed = sum(self._counted[-n:])
        del self._counted[-n:]
        if consumed and not self._m.rollback(consumed):
            self._check()
        self._mask = None

    def allowed_along(self, draft: list[int]) -> torch.Tensor:
        """BoolTensor [k+1, vocab_size]: the mask before each draft token and after the last, following the
        draft while the grammar allows it (rows after a refused token are all False). State is unchanged."""
        rows, taken = [], 0
        for t in draft:
            rows.append(self.allowed())
            if not bool(rows[-1][int(t)]):
                break
            self.accept(t)
            taken += 1
        else:
            rows.append(self.allowed())
        self.rollback(taken)
        out = torch.zeros(len(draft) + 1, self._vocab, dtype=torch.bool)
        out[:len(rows)] = torch.stack(rows)
        return out

    def _check(self) -> None:
        if self._m.is_error():
            raise RuntimeError(f"{self.grammar.kind} grammar: {_one_line(self._m.get_error(), 200)}")

    def _spell(self, t: int) -> str:
        if t >= self.grammar.compiler.lib_vocab:
            return "past the tokenizer's vocabulary"
        return self.grammar.compiler.tokenizer.dbg_tokens([t])
