"""Speculative decoding in the simulator (profiling/speculation.py): prompt-lookup verify steps replayed through the
simulator's own controller; exact acceptance on a hand trace, every generated token accounted for, the verify step's
routing, perfect drafts never loading more, K=0 and drafts that never hit equal to the plain simulator, the CLI."""
import gzip
import json

import numpy as np
import pytest

from moe_engine.cli import main
from moe_engine.errors import ConfigError
from moe_engine.profiling.hardware import Hardware
from moe_engine.profiling.shapes import expert_bytes_shape
from moe_engine.profiling.simulate import Simulator
from moe_engine.profiling.speculation import (SpeculativeSimulator, load_text, parse_speculative,
                                              simulate_speculative, text_path)
from moe_engine.profiling.synthetic import synthetic_trace
from moe_engine.profiling.trace import Trace, load_trace, save_trace

MIB = 1 << 20
HW = Hardware("test", 1e9, 1e10, load_latency_s=1e-4)
BASE_KEYS = ("loads", "demand_loads", "hits", "misses", "stall_seconds", "decode_stall_seconds", "decode_tokens",
             "decode_seconds", "prefill_tokens", "prefill_seconds", "compute_seconds", "link_busy_seconds",
             "decode_loads")


def write_text_trace(path, texts, experts):
    """A GPT-OSS-style trace: rows are decode steps only, token strings in <stem>_sequences.jsonl.gz.
    texts: (prompt strings, generated strings) per sequence; row k feeds full[prompt_len + k]."""
    offsets = np.cumsum([0] + [len(gen) - 1 for _, gen in texts]).astype(np.int64)
    assert offsets[-1] == len(experts)
    ex = np.asarray(experts, dtype=np.uint8)
    trace = Trace(ex, np.ones(ex.shape, np.float32), offsets,
                  extra={"prompt_len": np.asarray([len(p) for p, _ in texts], np.int32)})
    save_trace(path, trace)
    with gzip.open(text_path(path), "wt") as f:
        for prompt, gen in texts:
            f.write(json.dumps({"prompt_len": len(prompt), "n_routed": len(gen) - 1,
                                "full_text_tokens": list(prompt) + list(gen)}) + "\n")
    return load_trace(path)


def run(trace, text, quotas, spec, shape=None, events=None):
    shape = shape or expert_bytes_shape(MIB, trace.top_k, trace.num_layers, int(trace.num_experts))
    return SpeculativeSimulator(trace, text, shape, HW, quotas, parse_speculative(spec), "lru",
                                events=events).run().to_dict()


def test_hand_trace_acceptance_and_verify_rows(tmp_path):
    # full = a b c | a b x a b c; 5 rows feed full[3..7]. K=2, lookup 4..1-grams, by hand:
    #   row 0 (tokens a b c a): 1-gram 'a' at 0 -> draft b c; truth b x -> kept 1; feeds rows 0, 1, 2
    #   row 2 (.. a b x): nothing recurs -> no draft; feeds row 2
    #   row 3 (.. x a): 1-gram 'a' at 3 -> b x, room 1 (one row left) -> draft b; truth b -> kept 1; rows 3, 4
    path = tmp_path / "hand.npz"
    trace = write_text_trace(path, [("abc", "abxabc")], [[[e]] for e in range(5)])
    events = []
    res = run(trace, load_text(path), [8], "ngram:2", expert_bytes_shape(MIB, 1, 1, 8), events)
    assert (res["decode_steps"], res["drafted"], res["accepted"]) == (3, 3, 2)
    assert res["acceptance"] == pytest.approx(2 / 3) and res["tokens_per_step"] == pytest.approx(5 / 3)
    assert res["decode_tokens"] == 5
    loads = {}
    for kind, step, _, expert, *_ in events:
        loads.setdefault(step, []).append(expert)
    assert list(loads.values()) == [[0, 1, 2], [3, 4]]        # row 2's expert came with the first verify step


def _repeating(seed, sequences=3, rows=60):
    """Token strings that repeat (prompt lookup hits) with a wrong token now and then, and skewed routing."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(sequences):
        period = [f"w{rng.integers(1000)}" for _ in range(5)]
        gen = [period[i % 5] if rng.random() > 0.15 else "odd" for i in range(rows + 1)]
        texts.append((period * 2, gen))
    return texts


@pytest.mark.parametrize("spec", ["ngram:3", "ngram:5:adaptive"])
def test_every_generated_token_is_accounted_for(tmp_path, spec):
    routing = synthetic_trace(4, 16, 2, sequences=3, tokens=60, seed=3)
    path = tmp_path / "rep.npz"
    trace = write_text_trace(path, _repeating(0), routing.experts)
    res = run(trace, load_text(path), [6] * 4, spec)
    plain = run(trace, load_text(path), [6] * 4, "ngram:0")
    assert res["decode_tokens"] == plain["decode_tokens"] == trace.num_steps
    assert res["prefill_tokens"] == 0                              # these rows are decode steps only
    assert 0 < res["accepted"] < res["drafted"] and res["decode_steps"] < trace.num_steps
    assert res["decode_steps"] + res["accepted"] == trace.num_steps   # each step emits its kept drafts + 1


@pytest.mark.parametrize("quota", [4, 6, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_drafts_that_are_always_right_never_load_more(tmp_path, quota, seed):
    routing = synthetic_trace(4, 16, 2, sequences=3, tokens=60, seed=seed)
    period = ["p", "q", "r", "s", "t"]
    texts = [(period * 2, [period[i % 5] for i in range(61)])] * 3
    path = tmp_path / "right.npz"
    trace = write_text_trace(path, texts, routing.experts)
    text = load_text(path)
    plain = run(trace, text, [quota] * 4, "ngram:0")
    for spec in ("ngram:2", "ngram:4"):
        res = run(trace, text, [quota] * 4, spec)
        assert res["acceptance"] == 1.0
        assert res["loads_per_generated_token"] <= plain["loads_per_generated_token"]
        assert res["decode_seconds"] < plain["decode_seconds"]


def _engine_trace(tmp_path, distinct: bool) -> tuple[Trace, list]:
    """A trace as `moe-engine trace` writes it: prompt rows first, token_ids and prompt_len in the npz."""
    routing = synthetic_trace(4, 8, 2, sequences=2, tokens=40, seed=5)
    rng = np.random.default_rng(1)
    ids = np.arange(80) if distinct else rng.integers(0, 4, 80)
    trace = Trace(routing.experts, routing.probs, routing.seq_offsets, ids.astype(np.int32),
                  {"prompt_len": np.asarray([6, 9], np.int32)})
    save_trace(tmp_path / "engine.npz", trace)
    return load_trace(tmp_path / "engine.npz"), load_text(tmp_path / "engine.npz")


@pytest.mark.parametrize("spec,distinct", [("ngram:0", False), ("ngram:4", True)])
def test_no_drafts_equal_the_plain_simulator(tmp_path, spec, distinct):
    trace, text = _engine_trace(tmp_path, distinct)
    shape = expert_bytes_shape(MIB, 2, 4, 8)
    plain = Simulator(trace, shape, HW, [3] * 4, "lru").run().to_dict()
    res = run(trace, text, [3] * 4, spec, shape)
    assert res["prefill_tokens"] == 15 and res["drafted"] == 0
    assert {k: res[k] for k in BASE_KEYS} == {k: plain[k] for k in BASE_KEYS}


def test_engine_trace_speculates_only_after_the_prompt(tmp_path):
    trace, text = _engine_trace(tmp_path, False)
    res = run(trace, text, [3] * 4, "ngram:4")
    assert res["prefill_tokens"] == 15 and res["decode_tokens"] == 65 and res["accepted"] > 0


def test_sweep_reports_both_ways(tmp_path):
    path = tmp_path / "rep.npz"
    trace = write_text_trace(path, _repeating(2), synthetic_trace(4, 16, 2, sequences=3, tokens=60).experts)
    rep = simulate_speculative(trace, load_text(path), expert_bytes_shape(MIB, 2, 4, 16), HW, [4, 8],
                               parse_speculative("ngram:3"))
    for r in rep["results"]:
        s, p = r["speculative"], r["plain"]
        assert r["loads_ratio"] == pytest.approx(p["loads_per_generated_token"] / s["loads_per_generated_token"])
        assert r["speedup"] == pytest.approx(s["tokens_per_s"] / p["tokens_per_s"])
        assert p["decode_steps"] == p["decode_tokens"] == s["decode_tokens"]


@pytest.mark.parametrize("text,words", [("ngram", "ngram:K"), ("ngram:-1", "K >= 0"), ("ngram:2:fast", "adaptive"),
                                        ("resident:4", "resident")])
def test_bad_spec_names_the_flag(text, words):
    with pytest.raises(ConfigError, match="--speculative") as e:
        parse_speculative(text)
    assert words in str(e.value)


def test_text_that_does_not_match_the_rows_is_refused(tmp_path):
    path = tmp_path / "bad.npz"
    write_text_trace(path, [("abc", "abxabc")], [[[e]] for e in range(5)])
    with gzip.open(text_path(path), "wt") as f:
        f.write(json.dumps({"prompt_len": 3, "full_text_tokens": list("abcabx")}) + "\n")
    with pytest.raises(ConfigError, match="sequence 0 has 6 token strings"):
        load_text(path)


def test_cli_speculative(tmp_path, capsys):
    path = tmp_path / "rep.npz"
    write_text_trace(path, _repeating(4), synthetic_trace(4, 16, 2, sequences=3, tokens=60).experts)
    out = tmp_path / "out.json"
    argv = ["simulate", "--trace", str(path), "--expert-bytes", str(MIB), "--cache-experts", "4,8",
            "--hardware", "pcie4-x16", "--speculative", "ngram:4", "--json", str(out)]
    assert main(argv) == 0
    assert "speculative decoding (ngram:4) vs plain decode" in capsys.readouterr().out
    spec = json.loads(out.read_text())["speculative"]
    assert [r["cache_experts"] for r in spec["results"]] == [4, 8]
    assert spec["results"][0]["speculative"]["decode_tokens"] == 180
    assert main(argv[:-4] + ["--speculative", "ngram:4", "--predictor", "oracle"]) == 2
    assert "drop --predictor oracle" in capsys.readouterr().err
    text_path(path).unlink()
    assert main(argv) == 2
    assert "--speculative needs the tokens" in capsys.readouterr().err
