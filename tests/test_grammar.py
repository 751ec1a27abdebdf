"""runtime/grammar.py: masks that only ever produce valid output, eos exactly where the output may end,
rollback that restores the same masks, vocabulary padding, and one-line errors for bad specs.

Outputs are sampled from random logits under the mask (sample_under), on the bundled model's tokenizer and on
a small hand-built byte-level BPE, and checked with json / jsonschema / re, never with the library itself.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moe_engine.errors import ConfigError, TokenizerError
from moe_engine.runtime.grammar import GrammarCompiler, TokenRejected

TINY = Path(__file__).resolve().parents[1] / "moe_engine" / "models" / "tiny-moe"
TINY_VOCAB = 4096

SCHEMA = {   # every part bounded, so random sampling ends
    "type": "object",
    "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                      "y": {"type": "boolean"}},
                     "required": ["x"], "additionalProperties": False}},
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "kind": {"enum": ["cat", "dog", 7, None]},
        "tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 3},
        "where": {"$ref": "#/$defs/pt"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,4}$"}]},
    },
    "required": ["name", "age", "kind", "where"],
    "additionalProperties": False,
}


def hand_tokenizer(extra_specials: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE: 256 byte symbols, a few JSON merges, <s> and </s>, then `extra_specials` more."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, merges = {c: i for i, c in enumerate(alphabet)}, []
    for word in ('{"', '":', '",', '"}', "true", "false", "null", "Ġ\"", "ab", "abc"):
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                vocab[word[:k]] = len(vocab)
                merges.append((word[:k - 1], word[k - 1]))
    tk = Tokenizer(BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] + [f"<x{i}>" for i in range(extra_specials)]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_tok():
    return AutoTokenizer.from_pretrained(str(TINY))


@pytest.fixture(scope="module")
def tiny(tiny_tok):
    return GrammarCompiler(tiny_tok, TINY_VOCAB + 64, [tiny_tok.eos_token_id])   # a padded lm_head


@pytest.fixture(scope="module")
def hand():
    tok = hand_tokenizer()
    return tok, GrammarCompiler(tok, len(tok) + 13, [tok.eos_token_id])


def sample_under(constraint, seed: int, max_steps: int = 600, scale: float = 3.0, bias=None) -> list[int]:
    """Random logits (+ bias), masked, sampled until eos or the grammar is finished; the ids (eos included)."""
    gen = torch.Generator().manual_seed(seed)
    eos = set(constraint.grammar.compiler.eos_token_ids)
    ids: list[int] = []
    for _ in range(max_steps):
        if constraint.finished:
            return ids
        logits = torch.randn(constraint.grammar.compiler.vocab_size, generator=gen) * scale
        logits = constraint.apply(logits if bias is None else logits + bias)
        t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        constraint.accept(t)
        ids.append(t)
        if t in eos:
            return ids
    raise AssertionError(f"no end after {max_steps} tokens: {ids[:40]}...")


def text_of(tok, ids, eos) -> str:
    return tok.decode([i for i in ids if i not in eos])


def whitespace_penalty(tok, vocab_size: int) -> torch.Tensor:
    """-6 on whitespace-only tokens: random logits would otherwise pad flexible JSON without end."""
    bias = torch.zeros(vocab_size)
    for i in range(len(tok)):
        if tok.decode([i]).isspace():
            bias[i] = -6.0
    return bias


@pytest.mark.parametrize("whitespace", ["none", "flexible", "pattern"])
def test_sampled_json_validates_against_schema(tiny, tiny_tok, whitespace):
    grammar = tiny.json_schema(SCHEMA, any_whitespace=whitespace == "flexible",
                               whitespace_pattern=r"[ ]?" if whitespace == "pattern" else None)
    bias = whitespace_penalty(tiny_tok, tiny.vocab_size) if whitespace == "flexible" else None
    spaced = 0
    for seed in range(8):
        c = grammar.new()
        ids = sample_under(c, seed, bias=bias)
        assert c.finished
        text = text_of(tiny_tok, ids, {2})
        jsonschema.validate(json.loads(text), SCHEMA)
        spaced += text != json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
        if whitespace == "pattern":
            outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)   # whitespace outside strings: [ ]?
            assert "  " not in outside and "\n" not in outside, text
    assert (spaced > 0) == (whitespace != "none")


def test_eos_allowed_exactly_where_the_output_can_end(tiny, tiny_tok):
    """Oracle: the text so far is a complete document valid under the schema."""
    grammar, eos = tiny.json_schema(SCHEMA, any_whitespace=False), tiny_tok.eos_token_id
    checked_true = 0
    for seed in range(6):
        c, ids = grammar.new(), []
        while True:
            text = tiny_tok.decode(ids)
            try:
                jsonschema.validate(json.loads(text), SCHEMA)
                complete = True
            except (json.JSONDecodeError, jsonschema.ValidationError):
                complete = False
            assert bool(c.allowed()[eos]) == complete == c.can_end, (seed, text)
            checked_true += complete
            if complete:
                break
            logits = torch.randn(tiny.vocab_size, generator=torch.Generator().manual_seed(seed * 1000 + len(ids)))
            logits[eos] = float("-inf")
            t = int(c.apply(logits).argmax())
            c.accept(t)
            ids.append(t)
        c.accept(eos)
        assert c.finished and c.allowed().nonzero().view(-1).tolist() == [eos]   # after eos: only eos
    assert checked_true == 6


def test_json_object_is_a_json_object(tiny, tiny_tok):
    closing = torch.zeros(tiny.vocab_size)   # random logits that lean towards closing brackets and quotes
    for piece, i in tiny_tok.get_vocab().items():
        if any(ch in piece for ch in '}]"'):
            closing[i] = 4.0
    grammar = tiny.json_object(any_whitespace=False)
    for seed in range(8):
        c, gen, ids = grammar.new(), torch.Generator().manual_seed(seed), []
        while not c.finished and len(ids) < 800:
            logits = c.apply(torch.randn(tiny.vocab_size, generator=gen) + closing)
            ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
            c.accept(ids[-1])
        assert c.finished, seed
        assert isinstance(json.loads(text_of(tiny_tok, ids, {2})), dict)


@pytest.mark.parametrize("which", ["tiny", "hand"])
def test_regex_choice_and_grammar_outputs(which, tiny, tiny_tok, hand):
    tok, comp = (tiny_tok, tiny) if which == "tiny" else hand
    eos = set(comp.eos_token_ids)
    pattern = r"[a-c]{2,5}@(x|yz)\.com"
    for seed in range(6):
        out = text_of(tok, sample_under(comp.regex(pattern).new(), seed), eos)
        assert re.fullmatch(pattern, out), out
    options = ["yes", "no", "maybe so", 'quote "q"', "ünï"]
    seen = {text_of(tok, sample_under(comp.choice(options).new(), seed), eos) for seed in range(20)}
    assert seen <= set(options) and len(seen) >= 3
    gbnf = 'root ::= "SELECT " col " FROM " tbl\ncol ::= "a" | "bc"\ntbl ::= "t" [0-9]'
    for seed in range(6):
        out = text_of(tok, sample_under(comp.grammar(gbnf).new(), seed), eos)
        assert re.fullmatch(r"SELECT (a|bc) FROM t[0-9]", out), out
    lark = 'start: "n=" NUM\nNUM: /[1-9][0-9]?/'
    out = text_of(tok, sample_under(comp.grammar(lark).new(), 0), eos)
    assert re.fullmatch(r"n=[1-9][0-9]?", out), out


def test_hand_tokenizer_json(hand):
    tok, comp = hand
    grammar = comp.json_schema(SCHEMA, any_whitespace=False)
    for seed in range(6):
        c = grammar.new()
        jsonschema.validate(json.loads(text_of(tok, sample_under(c, seed), set(comp.eos_token_ids))), SCHEMA)


def test_rollback_then_reaccept_gives_the_same_masks(tiny):
    c = tiny.json_schema(SCHEMA, any_whitespace=False).new()
    ids = sample_under(c, 3)
    if ids[-1] != 2:   # finished without eos: accept it too (the parser does not count it)
        c.accept(2)
        ids.append(2)
    assert len(ids) > 10
    c.rollback(len(ids))
    masks = []
    for t in ids:   # the mask before each token, on a fresh walk
        masks.append(c.allowed().clone())
        c.accept(t)
    masks.append(c.allowed().clone())
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):   # undo k from a random point, check, then redo
        at = int(torch.randint(1, len(ids) + 1, (1,), generator=gen))
        c.rollback(len(ids) - at)
        k = int(torch.randint(0, at + 1, (1,), generator=gen))
        c.rollback(k)
        assert torch.equal(c.allowed(), masks[at - k])
        for j in range(at - k, len(ids)):
            assert torch.equal(c.allowed(), masks[j])
            c.accept(ids[j])
        assert c.finished and torch.equal(c.allowed(), masks[-1])
    with pytest.raises(ValueError, match="rollback"):
        c.rollback(len(ids) + 1)


def test_rollback_past_eos_of_a_stopped_grammar(tiny, tiny_tok):
    """choice "ab": after it nothing can follow; the eos accepted then is undone by rollback(1) alone."""
    c = tiny.choice(["ab"]).new()
    for t in tiny_tok.encode("ab", add_special_tokens=False):
        c.accept(t)
    assert c.finished
    c.accept(2)
    c.rollback(1)
    assert c.finished and c.allowed().nonzero().view(-1).tolist() == [2]
    c.rollback(c.num_accepted)
    assert not c.can_end and not c.allowed()[2]


def test_allowed_along_matches_step_masks_and_leaves_state(tiny):
    c = tiny.json_schema(SCHEMA, any_whitespace=False).new()
    ids = sample_under(c, 5)
    c.rollback(len(ids))
    head, draft = ids[:4], ids[4:9]
    for t in head:
        c.accept(t)
    along = c.allowed_along(draft)
    assert along.shape == (len(draft) + 1, tiny.vocab_size) and c.num_accepted == len(head)
    for j, t in enumerate(draft):
        assert torch.equal(along[j], c.allowed())
        c.accept(t)
    assert torch.equal(along[-1], c.allowed())
    c.rollback(len(draft))
    bad = [draft[0], 5]   # 5 is a special token: refused, so the rows after it are empty
    along = c.allowed_along(bad)
    assert along[1].any() and not along[2].any() and c.num_accepted == len(head)


def test_mask_covers_model_vocab_both_ways():
    tok = hand_tokenizer(extra_specials=40)   # the tokenizer has more ids than the model
    n = len(tok)
    small = GrammarCompiler(tok, n - 30, [tok.eos_token_id])
    c = small.json_object().new()
    assert c.allowed().shape == (n - 30,)
    big = GrammarCompiler(tok, n + 100, [tok.eos_token_id])   # the model pads its vocabulary
    c = big.json_object().new()
    assert c.allowed().shape == (n + 100,) and not c.allowed()[n:].any()
    with pytest.raises(TokenRejected, match="not allowed"):
        c.accept(n + 50)
    specials = tok.convert_tokens_to_ids(["<s>", "<x0>", "<x39>"])
    ids = sample_under(c, 0, max_steps=2000)
    assert not set(specials) & set(ids)


def test_every_eos_id_ends(tiny_tok):
    comp = GrammarCompiler(tiny_tok, TINY_VOCAB, [2, 3])
    c = comp.regex("ab?").new()
    c.accept(tiny_tok.convert_tokens_to_ids("a"))
    assert c.can_end and not c.finished and c.allowed()[[2, 3]].all()
    c.accept(3)
    assert c.finished


def test_accept_refuses_masked_tokens(tiny, tiny_tok):
    c = tiny.json_object().new()
    with pytest.raises(TokenRejected, match="not allowed by the json_object grammar"):
        c.accept(tiny_tok.convert_tokens_to_ids("a"))
    with pytest.raises(TokenRejected):
        c.accept(2)   # eos before anything
    c.accept(tiny_tok.convert_tokens_to_ids("{"))   # and the state is intact
    assert c.num_accepted == 1


def test_cache_by_grammar_text(tiny):
    assert tiny.json_schema(SCHEMA) is tiny.json_schema(json.dumps(SCHEMA))
    assert tiny.json_schema(SCHEMA) is not tiny.json_schema(SCHEMA, any_whitespace=False)
    assert tiny.compile("json", SCHEMA) is tiny.json_schema(SCHEMA)
    assert tiny.compile("choice", ["a"]) is tiny.choice(["a"])


@pytest.mark.parametrize("call, match", [
    (lambda c: c.json_schema({"type": "strin"}), r"^json_schema: Invalid type: strin$"),
    (lambda c: c.json_schema('{"type": '), r"^json_schema: the schema is not valid JSON"),
    (lambda c: c.json_schema([1]), r"^json_schema: a schema is a JSON object, got list$"),
    (lambda c: c.json_schema({"not": {"type": "string"}}), r"^json_schema: .*not"),
    (lambda c: c.json_schema({"$ref": "#/$defs/missing"}), r"^json_schema: .*missing"),
    (lambda c: c.json_schema({"type": "integer", "minimum": 5, "maximum": 2}), r"^json_schema: .*minimum"),
    (lambda c: c.json_schema({"type": "string", "pattern": "a(b"}), r"^json_schema: .*unclosed group"),
    (lambda c: c.regex("a(b"), r"^regex: .*unclosed group"),
    (lambda c: c.regex(""), r"^regex: the pattern must be a non-empty string"),
    (lambda c: c.choice([]), r"^choice: give a non-empty list"),
    (lambda c: c.choice(["a", 3]), r"^choice: give a non-empty list"),
    (lambda c: c.grammar('root ::= "x'), r"^grammar: .*GBNF"),
    (lambda c: c.grammar('start: "x" missing_rule'), r"^grammar: .*missing_rule"),
    (lambda c: c.compile("xml", "<a/>"), r"^unknown structured-output kind 'xml'"),
])
def test_bad_specs_are_one_line_config_errors(tiny, call, match):
    with pytest.raises(ConfigError, match=match) as info:
        call(tiny)
    assert "\n" not in str(info.value)


def test_compiler_argument_errors(tiny_tok):
    with pytest.raises(ConfigError, match="vocab_size must be a positive int"):
        GrammarCompiler(tiny_tok, 0, [2])
    with pytest.raises(ConfigError, match="eos_token_ids must be non-empty ids below vocab_size"):
        GrammarCompiler(tiny_tok, TINY_VOCAB, [TINY_VOCAB])
    with pytest.raises(TokenizerError, match="fast"):
        GrammarCompiler(object(), TINY_VOCAB, [2])


def test_apply_checks_the_logits_width(tiny):
    c = tiny.json_object().new()
    with pytest.raises(ValueError, match="columns"):
        c.apply(torch.zeros(TINY_VOCAB))
    batch = c.apply(torch.zeros(3, tiny.vocab_size))
    assert torch.equal(torch.isfinite(batch), c.allowed().expand(3, -1))
