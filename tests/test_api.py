"""The public Engine API on a tokenizer-bearing checkpoint: text in/out, batching, streaming, stopping,
seeds, generation_config.json defaults, chat, stats schema and close (docs/architecture.md "Contracts")."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from transformers import TextIteratorStreamer

import moe_engine
from tokenized import copy_checkpoint

PROMPTS = ["def fibonacci(n):", "Hello world", "class A:", "return x", "print('hi')", "for i in range(10):",
           "Once upon a time", "The quick brown fox", "import os"]
GREEDY = dict(do_sample=False)


def new_ids(eng, prompt: str, **kw) -> list[int]:
    """Generated ids of a text prompt, through the token-id path."""
    ids = torch.tensor(eng.encode(prompt))
    return eng.generate(ids, **kw)[len(ids):].tolist()


class Recorder:
    """A streamer that records every put() and end()."""

    def __init__(self):
        self.calls: list = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


# ---- text and token-id input -----------------------------------------------------------------
def test_str_prompt_returns_continuation_only(eng):
    prompt = PROMPTS[1]
    ids = eng.encode(prompt)
    out = eng.generate(torch.tensor(ids), max_new_tokens=12, **GREEDY)
    text = eng.generate(prompt, max_new_tokens=12, **GREEDY)
    assert isinstance(text, str) and text
    assert text == eng.tokenizer.decode(out[len(ids):].tolist(), skip_special_tokens=True)
    assert not text.startswith(prompt)


def single_token_prompt_followed_by_special(eng) -> tuple[str, int]:
    """A one-token text prompt whose greedy next token is a special token (eos included)."""
    tok = eng.tokenizer
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    ordinary = [t for t in range(eng.spec.vocab_size) if t not in special]
    nxt = eng.logits(torch.tensor(ordinary)[:, None])[:, 0].argmax(-1).tolist()
    for t, n in zip(ordinary, nxt):
        text = tok.decode([t])
        if n in special and eng.encode(text) == [t]:
            return text, n
    pytest.fail("no one-token prompt is followed by a special token in this random checkpoint")


def test_special_tokens_are_skipped_in_text(eng):
    prompt, special = single_token_prompt_followed_by_special(eng)
    ids = new_ids(eng, prompt, max_new_tokens=6, eos_token_id=[], **GREEDY)
    assert ids[0] == special
    with_special = eng.tokenizer.decode(ids, skip_special_tokens=False)
    assert eng.tokenizer.convert_ids_to_tokens(special) in with_special
    text = eng.generate(prompt, max_new_tokens=6, eos_token_id=[], **GREEDY)
    assert text == eng.tokenizer.decode(ids, skip_special_tokens=True)
    assert eng.tokenizer.convert_ids_to_tokens(special) not in text


def test_list_prompt_equals_each_prompt_alone(eng):
    prompts = PROMPTS[:4]    # different lengths: the batch is left-padded inside
    assert len({len(eng.encode(p)) for p in prompts}) > 1
    batch = eng.generate(prompts, max_new_tokens=10, **GREEDY)
    assert isinstance(batch, list) and len(batch) == len(prompts)
    assert batch == [eng.generate(p, max_new_tokens=10, **GREEDY) for p in prompts]


def test_tensor_input_returns_prompt_plus_new_ids(eng):
    ids = torch.tensor(eng.encode(PROMPTS[0]))
    out1 = eng.generate(ids, max_new_tokens=7, eos_token_id=[], **GREEDY)
    assert out1.dim() == 1 and out1.dtype == torch.long and len(out1) == len(ids) + 7
    assert torch.equal(out1[:len(ids)], ids)
    out2 = eng.generate(ids[None], max_new_tokens=7, eos_token_id=[], **GREEDY)
    assert out2.shape == (1, len(ids) + 7) and torch.equal(out2[0], out1)


# ---- streaming -------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS[:4])
def test_stream_pieces_join_to_generate_text(eng, prompt):
    pieces = list(eng.stream(prompt, max_new_tokens=20, **GREEDY))
    assert len(pieces) > 1 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == eng.generate(prompt, max_new_tokens=20, **GREEDY)


def test_text_iterator_streamer_in_thread(eng):
    prompt = PROMPTS[0]
    expected = eng.generate(prompt, max_new_tokens=16, **GREEDY)
    streamer = TextIteratorStreamer(eng.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=30)
    errors = []

    def run():
        try:
            eng.generate(prompt, max_new_tokens=16, streamer=streamer, **GREEDY)
        except Exception as e:   # surfaced below; the consumer would otherwise block until timeout
            errors.append(e)
            streamer.end()
    worker = threading.Thread(target=run)
    worker.start()
    got = "".join(streamer)
    worker.join(30)
    assert not errors and got == expected


def test_custom_streamer_gets_prompt_then_one_token_per_step_then_end(eng):
    ids = eng.encode(PROMPTS[2])
    rec = Recorder()
    out = eng.generate(PROMPTS[2], max_new_tokens=9, eos_token_id=[], streamer=rec, **GREEDY)
    gen = new_ids(eng, PROMPTS[2], max_new_tokens=9, eos_token_id=[], **GREEDY)
    kinds = [k for k, _ in rec.calls]
    assert kinds == ["put"] * 10 + ["end"]
    assert rec.calls[0][1].tolist() == [ids]                       # the prompt, [1, T]
    steps = [v for _, v in rec.calls[1:-1]]
    assert all(v.numel() == 1 for v in steps)
    assert [int(v.reshape(-1)[0]) for v in steps] == gen
    assert out == eng.tokenizer.decode(gen, skip_special_tokens=True)


# ---- stopping --------------------------------------------------------------------------------
def stop_string_inside(text: str) -> str:
    """A 2-character piece of `text` (no replacement characters) that first occurs after its start."""
    for i in range(1, len(text) - 1):
        s = text[i:i + 2]
        if "\ufffd" not in s and text.find(s) == i and s.strip():
            return s
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_stop_string_cuts_text(eng, prompt):
    full = eng.generate(prompt, max_new_tokens=24, eos_token_id=[], **GREEDY)
    stop = stop_string_inside(full)
    expected = full[:full.find(stop)]
    got = eng.generate(prompt, max_new_tokens=24, eos_token_id=[], stop=stop, **GREEDY)
    assert got == expected
    assert stop not in got
    assert "".join(eng.stream(prompt, max_new_tokens=24, eos_token_id=[], stop=[stop], **GREEDY)) == expected


def test_stop_string_ends_generation_early(eng):
    prompt = PROMPTS[1]
    full_ids = new_ids(eng, prompt, max_new_tokens=24, eos_token_id=[], **GREEDY)
    stop = stop_string_inside(eng.decode(full_ids))
    rec = Recorder()
    eng.generate(prompt, max_new_tokens=24, eos_token_id=[], stop=stop, streamer=rec, **GREEDY)
    n = len(rec.calls) - 2                                            # minus prompt put and end
    assert n < len(full_ids)
    assert stop in eng.decode(full_ids[:n]) and stop not in eng.decode(full_ids[:n - 1])


def test_eos_token_id_ends_at_that_token(eng):
    for prompt in PROMPTS:
        full = new_ids(eng, prompt, max_new_tokens=12, eos_token_id=[], **GREEDY)
        if full[2] not in full[:2]:
            break
    else:
        pytest.fail("every prompt repeats an early token")
    ids = torch.tensor(eng.encode(prompt))
    out = eng.generate(ids, max_new_tokens=12, eos_token_id=full[2], **GREEDY)
    assert out[len(ids):].tolist() == full[:3]
    text = eng.generate(prompt, max_new_tokens=12, eos_token_id=[full[2]], **GREEDY)
    assert text == eng.tokenizer.decode(full[:3], skip_special_tokens=True)


# ---- sampling seeds --------------------------------------------------------------------------
def test_seed_reproduces_and_varies_sampling(eng):
    kw = dict(max_new_tokens=16, temperature=1.0, do_sample=True, eos_token_id=[])
    a = eng.generate(PROMPTS[0], seed=1, **kw)
    assert a == eng.generate(PROMPTS[0], seed=1, **kw)
    assert a != eng.generate(PROMPTS[0], seed=2, **kw)
    assert a != eng.generate(PROMPTS[0], **GREEDY, max_new_tokens=16, eos_token_id=[])


# ---- generation_config.json ------------------------------------------------------------------
def engine_with_generation_config(src, dst, **values):
    path = copy_checkpoint(src, dst)
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    gen_file.write_text(json.dumps({**gen, **values}))
    return moe_engine.load(path, device="cpu", dtype="float32", progress=False)


def test_generation_config_max_new_tokens(eng, tok_dir, tmp_path):
    e5 = engine_with_generation_config(tok_dir, tmp_path / "m", max_new_tokens=5, eos_token_id=[])
    try:
        ids = torch.tensor(eng.encode(PROMPTS[0]))
        assert len(e5.generate(ids)) == len(ids) + 5
        assert len(e5.generate(ids, max_new_tokens=8)) == len(ids) + 8      # an argument wins over the file
        assert e5.generate(PROMPTS[0]) == eng.generate(PROMPTS[0], max_new_tokens=5, eos_token_id=[], **GREEDY)
    finally:
        e5.close()


def test_generation_config_sampling_defaults(eng, tok_dir, tmp_path):
    sampling = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    es = engine_with_generation_config(tok_dir, tmp_path / "s", max_new_tokens=12, **sampling)
    try:
        kw = dict(max_new_tokens=12)
        got = es.generate(PROMPTS[0], seed=3)
        assert got == eng.generate(PROMPTS[0], seed=3, **sampling, **kw)
        assert got != eng.generate(PROMPTS[0], seed=3, do_sample=True, temperature=1.0, **kw)
        assert got != es.generate(PROMPTS[0], seed=4)
        assert es.generate(PROMPTS[0], do_sample=False) == eng.generate(PROMPTS[0], **GREEDY, **kw)
    finally:
        es.close()


# ---- chat ------------------------------------------------------------------------------------
def test_chat_uses_the_chat_template(eng):
    prompt = "What is a list?"
    expected = eng.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert expected != eng.encode(prompt)
    rec = Recorder()
    text = eng.generate(prompt, chat=True, max_new_tokens=6, streamer=rec, **GREEDY)
    assert rec.calls[0][1].tolist() == [expected]
    out = eng.generate(torch.tensor(expected), max_new_tokens=6, **GREEDY)
    assert text == eng.tokenizer.decode(out[len(expected):].tolist(), skip_special_tokens=True)
    assert "".join(eng.stream(prompt, chat=True, max_new_tokens=6, **GREEDY)) == text


# ---- stats -----------------------------------------------------------------------------------
SCHEMA = {
    "cache": {"hits", "misses", "hit_rate", "per_layer_hit_rate", "evictions", "capacity_experts",
              "resident_experts"},
    "prefetch": {"issued", "used", "wasted", "precision", "recall"},
    "io": {"loads", "bytes_loaded", "bytes_disk_read", "bytes_host_to_device", "stall_seconds"},
    "memory": {"device_budget_bytes", "device_peak_bytes", "host_budget_bytes", "host_peak_bytes"},
    "latency": {"prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "tpot_s"},
    "optimal": {"belady_loads", "belady_hit_rate"},
}


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_stats_schema_after_generate(eng):
    eng.generate(PROMPTS[0], max_new_tokens=8, eos_token_id=[], **GREEDY)
    stats = eng.stats()
    json.dumps(stats)                                   # plain JSON types only
    assert set(stats) >= set(SCHEMA)                    # the contract: keys may be added, never renamed
    for section, keys in SCHEMA.items():
        assert set(stats[section]) >= keys, section
        for key in keys - {"per_layer_hit_rate"}:
            assert is_number(stats[section][key]), (section, key, stats[section][key])
    per_layer = stats["cache"]["per_layer_hit_rate"]
    assert len(per_layer) == eng.spec.num_layers and all(is_number(v) and 0 <= v <= 1 for v in per_layer)
    for key in ("hit_rate",):
        assert 0 <= stats["cache"][key] <= 1
    assert 0 <= stats["optimal"]["belady_hit_rate"] <= 1
    assert stats["cache"]["hits"] + stats["cache"]["misses"] > 0
    assert all(v > 0 for v in stats["latency"].values()), stats["latency"]
    assert stats["memory"]["device_peak_bytes"] > 0 and stats["memory"]["host_peak_bytes"] > 0


def test_stats_budgets_are_reported(tok_dir):
    e = moe_engine.load(tok_dir, device="cpu", dtype="float32", gpu_mem="1G", cpu_mem=1 << 20, progress=False)
    try:
        mem = e.stats()["memory"]
        assert mem["device_budget_bytes"] == 1 << 30 and mem["host_budget_bytes"] == 1 << 20
    finally:
        e.close()


# ---- close -----------------------------------------------------------------------------------
def test_closed_engine_refuses_use(tok_dir):
    e = moe_engine.load(tok_dir, device="cpu", dtype="float32", progress=False)
    ids = torch.tensor(e.encode(PROMPTS[0]))
    e.close()
    e.close()                                           # closing twice is harmless
    for call in (lambda: e.generate(PROMPTS[0], max_new_tokens=2), lambda: e.generate(ids, max_new_tokens=2),
                 lambda: list(e.stream(PROMPTS[0], max_new_tokens=2)), lambda: e.logits(ids[None])):
        with pytest.raises(moe_engine.MoeEngineError, match="closed"):
            call()
