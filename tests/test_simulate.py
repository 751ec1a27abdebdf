"""Offloading simulator: timeline cases by hand, agreement with replay.py and Belady, prefetching, the engine's
placement plan for --gpu-mem, where the routing comes from (the bundled model's trace, synthetic, folded), CLI
contract and tables."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import moe_engine
from moe_engine.cli import main
from moe_engine.config import parse_rate
from moe_engine.errors import ConfigError
from moe_engine.experts.policies import make_policy
from moe_engine.profiling.hardware import Hardware
from moe_engine.profiling.profile import builtin_prompts
from moe_engine.profiling.replay import replay
from moe_engine.profiling.shapes import PRESETS, expert_bytes_shape, shape_from_config, shape_preset
from moe_engine.profiling.simulate import Job, Link, Simulator, compute_bound_tokens_per_s, simulate
from moe_engine.profiling.synthetic import BUNDLED_TRACE, fold_trace, synthetic_trace
from moe_engine.profiling.trace import Trace, load_trace, save_trace
from moe_engine.runtime.load import DEFAULT_MODEL_DIR

CONTRACT = ("loads", "hit_rate", "belady_loads", "belady_hit_rate", "stall_seconds", "tokens_per_s")
MIB = 1 << 20
SHAPES = {name: shape_preset(name) for name in PRESETS}


@pytest.fixture(scope="module")
def small_trace() -> Trace:
    """GPT-OSS-20B-shaped routing (24 layers, top-4 of 32), 2 sequences of 96 tokens: synthetic (seeded, skewed
    popularity per sequence), so that the suite needs no data from outside the repository."""
    return synthetic_trace(24, 32, 4, sequences=2, tokens=96, seed=1)


def _hw(link=1e9, compute=1e10, overlap=True, latency=0.0) -> Hardware:
    return Hardware("test", link, compute, load_latency_s=latency, overlap=overlap)


def _trace(rows, offsets, num_experts) -> Trace:
    ex = np.asarray(rows, dtype=np.int16)
    return Trace(ex, np.ones(ex.shape, np.float32), np.asarray(offsets, np.int64), num_experts=num_experts)


def test_hand_timeline_demand_misses():
    # 1 layer, top-1 of 2 experts, 1 slot: 0, 1, 0 -> three misses, each stalls one load then computes
    tr = _trace([[[0]], [[1]], [[0]]], [0, 3], 2)
    shape = expert_bytes_shape(10 * MIB, 1, 1, 2)
    hw = _hw(link=1e9, compute=1e10, latency=1e-3)
    res = Simulator(tr, shape, hw, [1], policy="lru").run().to_dict()
    load, expert = 1e-3 + shape.expert_bytes / 1e9, shape.expert_bytes / 1e10
    assert res["loads"] == 3 and res["hits"] == 0
    assert res["stall_seconds"] == pytest.approx(3 * load)
    assert res["decode_seconds"] == pytest.approx(3 * (load + expert))
    assert res["tokens_per_s"] == pytest.approx(3 / (3 * (load + expert)))


def test_link_serves_demand_before_queued_prefetch():
    link = Link()
    a = Job(0, 0, 2, 1, 0.0, 1.0, True)          # prefetch, submitted first, starts at once
    b = Job(0, 1, 3, 2, 0.0, 1.0, True)          # prefetch, queued
    link.submit(a)
    link.run_until(0.0)
    link.submit(b)
    c = Job(1, 0, 0, 3, 0.5, 1.0, False)         # demand at 0.5: after a (never pre-empted), before b
    link.run_until(0.5)
    link.submit(c)
    assert link.finish(c) == pytest.approx(2.0)
    assert link.finish(b) == pytest.approx(3.0)
    assert link.cancel(b) is False               # already ran


def test_prompt_rows_only_where_the_trace_records_them():
    """prompt_len marks prompt rows in a trace the engine recorded (token_ids: one row per token fed); a trace
    without token_ids (the GPT-OSS routing data) counts its prompt there but holds decode rows only."""
    rows = [[[0]], [[1]], [[0]], [[1]]]
    shape = expert_bytes_shape(MIB, 1, 1, 2)
    decode_only = _trace(rows, [0, 4], 2)
    decode_only.extra["prompt_len"] = np.array([2], np.int32)
    res = Simulator(decode_only, shape, _hw(), [1]).run().to_dict()
    assert (res["decode_tokens"], res["prefill_tokens"]) == (4, 0)
    recorded = Trace(decode_only.experts, decode_only.probs, decode_only.seq_offsets,
                     np.array([5, 6, 7, 8], np.int32), {"prompt_len": np.array([2], np.int32)}, 2)
    res = Simulator(recorded, shape, _hw(), [1]).run().to_dict()
    assert (res["decode_tokens"], res["prefill_tokens"]) == (2, 2)
    two = Trace(np.concatenate([recorded.experts] * 2), np.concatenate([recorded.probs] * 2),
                np.array([0, 4, 8]), np.tile(recorded.token_ids, 2), {"prompt_len": np.array([2, 3], np.int32)}, 2)
    second = two.sequences(1)                      # a cut keeps each sequence's own prompt_len
    assert second.extra["prompt_len"].tolist() == [3]
    res = Simulator(second, shape, _hw(), [1]).run().to_dict()
    assert (res["decode_tokens"], res["prefill_tokens"]) == (1, 3)


def test_infinite_bandwidth_is_compute_bound(small_trace):
    shape = SHAPES["gpt-oss-20b"]
    hw = _hw(link=1e30, compute=200e9).replace(layer_overhead_s=1e-5, token_overhead_s=1e-4)
    out = simulate(small_trace, shape, hw, [4, 16])
    for r in out["results"]:
        assert r["tokens_per_s"] == pytest.approx(compute_bound_tokens_per_s(shape, hw), rel=1e-6)
        assert r["stall_seconds"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("policy", ["lru", "default"])
@pytest.mark.parametrize("cache", [4, 8, 16])
def test_loads_match_replay_and_exceed_belady(small_trace, policy, cache):
    out = simulate(small_trace, SHAPES["gpt-oss-20b"], _hw(), [cache], policy=policy)
    ref = replay(small_trace, make_policy(policy), cache)
    assert out["loads"] == ref.total_loads
    assert out["hit_rate"] == pytest.approx(ref.hit_rate)
    assert out["belady_loads"] == ref.belady.total_loads <= out["loads"]


def test_oracle_prefetching_cuts_stalls(small_trace):
    shape, hw = SHAPES["gpt-oss-20b"], _hw(link=12.5e9, compute=190e9)
    none = simulate(small_trace, shape, hw, [8], predictor="none")
    oracle = simulate(small_trace, shape, hw, [8], predictor="oracle")
    assert oracle["stall_seconds"] < 0.8 * none["stall_seconds"]
    assert oracle["tokens_per_s"] > none["tokens_per_s"]
    pf = oracle["results"][0]["prefetch"]
    assert pf["issued"] > 0 and pf["precision"] > 0.9


def test_no_overlap_serializes_every_load(small_trace):
    shape = SHAPES["gpt-oss-20b"]
    hw = _hw(link=5e9, compute=100e9, overlap=False)
    r = simulate(small_trace, shape, hw, [8])["results"][0]
    assert r["stall_seconds"] == pytest.approx(r["loads"] * hw.load_s(shape.expert_bytes))
    faster = simulate(small_trace, shape, hw.replace(overlap=True), [8])["results"][0]
    assert faster["tokens_per_s"] > r["tokens_per_s"]


def test_shape_from_config_alone(tmp_path):
    src = Path(__file__).resolve().parent.parent / "moe_engine" / "models" / "tiny-moe" / "config.json"
    shutil.copy(src, tmp_path / "config.json")              # no weights
    cfg = json.loads(src.read_text())
    shape = shape_from_config(tmp_path)
    assert shape.num_experts == cfg["num_local_experts"] and shape.top_k == cfg["num_experts_per_tok"]
    assert shape.expert_bytes == 3 * cfg["hidden_size"] * cfg["intermediate_size"] * shape.expert_bits / 8


def test_presets_sizes():
    assert SHAPES["mixtral-8x7b"].expert_bytes == 3 * 4096 * 14336 * 2           # 352 MB in bf16
    assert SHAPES["gpt-oss-20b"].total_expert_bytes / 1e9 == pytest.approx(10.2, rel=0.05)
    assert parse_rate("2.2G", "--bandwidth") == 2.2e9 and parse_rate("25GB/s", "--bandwidth") == 25e9


def test_gpu_mem_is_the_engines_placement_plan(tmp_path):
    """--gpu-mem gives the experts per layer that the engine itself places in that budget (loader buffers and
    workspace included): the bundled model in 16 MiB gets 3-4 per layer, not the 8 a weights-and-KV-only rule says."""
    eng = moe_engine.load(device="cpu", gpu_mem="16M", progress=False)
    try:
        placed = [eng.plan.quotas[layer] for layer in eng.spec.moe_layers]
    finally:
        eng.close()
    assert shape_from_config(DEFAULT_MODEL_DIR).engine_quotas(16 * MIB, device="cpu") == placed
    assert 3 <= min(placed) < max(placed) <= 4
    out = tmp_path / "sim.json"
    assert main(["simulate", "--gpu-mem", "16M", "--hardware", "this-cpu-disk", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert len(res) == 1 and res[0]["quotas"] == placed and res[0]["cache_experts"] == round(sum(placed) / 6, 2)


def test_gpu_mem_on_a_preset_grows_with_the_budget_and_names_the_minimum():
    shape = SHAPES["gpt-oss-20b"]
    small, large = shape.engine_quotas(int(6 * 2**30)), shape.engine_quotas(int(7.5 * 2**30))
    assert len(small) == 24 and sum(small) < sum(large) and shape.experts_per_layer(int(7.5 * 2**30)) == min(large)
    assert shape.engine_quotas(int(7.5 * 2**30), kv_tokens=16384) < large
    with pytest.raises(ConfigError, match=r"--gpu-mem .* too small .* raise --gpu-mem to at least"):
        SHAPES["mixtral-8x7b"].experts_per_layer(int(7.5 * 2**30))        # Mixtral in bf16 on an 8 GB card
    with pytest.raises(ConfigError, match="--cache-experts"):
        expert_bytes_shape(4096, 2, 4, 8).engine_quotas(2**30)


def test_cli_gpu_mem(small_trace, tmp_path):
    path, out = tmp_path / "t.npz", tmp_path / "sim.json"
    save_trace(path, small_trace)
    assert main(["simulate", "--trace", str(path), "--model-shape", "gpt-oss-20b", "--gpu-mem", "7.5G",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["quotas"] for r in rep["results"]] == [SHAPES["gpt-oss-20b"].engine_quotas(int(7.5 * 2**30))]
    assert main(["simulate", "--trace", str(path), "--model-shape", "gpt-oss-20b", "--gpu-mem", "8G",
                 "--cache-experts", "8"]) == 2


def test_cli_json_contract(small_trace, tmp_path, capsys):
    path, out = tmp_path / "t.npz", tmp_path / "sim.json"
    save_trace(path, small_trace)
    rc = main(["simulate", "--trace", str(path), "--model-shape", "gpt-oss-20b", "--hardware", "pcie4-x8-8gb",
               "--cache-experts", "4,8", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert all(k in rep for k in CONTRACT)
    assert [r["cache_experts"] for r in rep["results"]] == [4, 8]
    assert rep["results"][0]["loads"] > rep["results"][1]["loads"]
    assert rep["lrc"]["suggested_cache_experts"] is not None
    assert "tok/s" in capsys.readouterr().out


def test_cli_host_compute_runs_misses_on_the_host(small_trace, tmp_path):
    """--host-compute: a host that streams expert weights faster than the link loads them takes every miss."""
    path, outs = tmp_path / "t.npz", {}
    save_trace(path, small_trace)
    for name, extra in (("link", []), ("host", ["--host-compute", "1T"]), ("slow-host", ["--host-compute", "1M"])):
        out = tmp_path / f"{name}.json"
        assert main(["simulate", "--trace", str(path), "--model-shape", "gpt-oss-20b", "--cache-experts", "8",
                     "--json", str(out), *extra]) == 0
        outs[name] = json.loads(out.read_text())
    assert outs["host"]["loads"] == 0 and outs["host"]["hardware"]["host_compute_bytes_per_s"] == 1e12
    assert outs["host"]["tokens_per_s"] > outs["link"]["tokens_per_s"]
    assert outs["slow-host"]["loads"] == outs["link"]["loads"] > 0


@pytest.mark.parametrize("argv, words", [
    (["--model-shape", "gpt-oss-20b", "--host-compute", "lots"], ["--host-compute", "lots"]),
    (["--trace", "/nonexistent.npz", "--model-shape", "gpt-oss-20b"], ["--trace", "no such trace file"]),
    (["--model-shape", "gpt-oss-20b", "--cache-experts", "64"], ["--cache-experts", "64", "32"]),
    (["--model-shape", "gpt-oss-20b", "--hardware", "rtx9999"], ["--hardware", "rtx9999", "pcie4-x16"]),
    (["--model-shape", "nope"], ["--model-shape", "mixtral-8x7b"]),
    (["--model-shape", "gpt-oss-20b", "--expert-bytes", "4096"], ["--model-shape", "--expert-bytes"]),
    (["--model-shape", "gpt-oss-20b", "--bandwidth", "fast"], ["--bandwidth", "fast"]),
    (["--model-shape", "gpt-oss-20b", "--predictor", "gate-lookahead"], ["--predictor", "routing trace"]),
])
def test_cli_bad_input_names_the_flag(small_trace, tmp_path, capsys, argv, words):
    path = tmp_path / "t.npz"
    save_trace(path, small_trace)
    full = ["simulate", *(["--trace", str(path)] if "--trace" not in argv else []), *argv]
    assert main(full) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err


# ---- where the routing comes from -------------------------------------------------------------------------

def test_no_arguments_simulates_the_bundled_model_on_its_own_trace(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", "--cache-experts", "4,8", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    err = capsys.readouterr().err
    assert rep["model"]["name"] == "tiny-moe" and "bundled model's own routing" in err
    tr = load_trace(BUNDLED_TRACE)
    assert rep["trace"]["tokens"] == tr.num_steps and [r["cache_experts"] for r in rep["results"]] == [4, 8]


def test_the_bundled_trace_is_the_bundled_models_routing():
    tr, shape = load_trace(BUNDLED_TRACE), shape_from_config(DEFAULT_MODEL_DIR)
    assert (tr.num_layers, tr.top_k) == (shape.num_layers, shape.top_k) and tr.num_experts <= shape.num_experts
    assert tr.num_sequences == len(builtin_prompts()) and tr.token_ids is not None


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_without_a_trace_gets_synthetic_routing_and_says_so(tmp_path, capsys, name):
    out = tmp_path / "sim.json"
    shape = SHAPES[name]
    assert main(["simulate", "--model-shape", name, "--cache-experts", str(shape.top_k), "--sequences", "1",
                 "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "synthetic routing" in err and "not real routing" in err and err.count("\n") == 1
    rep = json.loads(out.read_text())
    assert rep["trace"]["layers"] == shape.num_layers and rep["trace"]["top_k"] == shape.top_k
    assert "synthetic" in rep["trace_source"]


def test_synthetic_trace_is_seeded_distinct_and_skewed():
    a, b = synthetic_trace(4, 16, 2, sequences=2, tokens=200), synthetic_trace(4, 16, 2, sequences=2, tokens=200)
    assert np.array_equal(a.experts, b.experts) and a.experts.shape == (400, 4, 2)
    assert (a.experts[..., 0] != a.experts[..., 1]).all()
    np.testing.assert_allclose(a.probs.sum(-1), 1.0, rtol=1e-5)
    counts = np.bincount(a.experts[:200, 0].ravel(), minlength=16)
    assert counts.max() > 4 * 400 / 16 / 2                       # popularity skew: far from uniform (25 each)


def test_another_models_trace_is_folded_with_a_warning(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", "--model-shape", "mixtral-8x7b", "--trace", str(BUNDLED_TRACE), "--sequences", "2",
                 "--cache-experts", "4", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: the trace (6 MoE layers x top-2 of 16 experts) is not mixtral-8x7b's shape" in err
    rep = json.loads(out.read_text())
    assert rep["trace"]["layers"] == 32 and rep["trace"]["experts"] == 8


def test_fold_keeps_k_distinct_ids_and_the_trace_rows():
    tr = Trace(np.array([[[3, 11, 7, 19]], [[0, 8, 16, 1]]], np.int16), np.full((2, 1, 4), 0.25, np.float32),
               np.array([0, 2]), num_experts=20)
    f = fold_trace(tr, 2, 8, 2)
    assert f.experts.shape == (2, 2, 2)
    assert f.experts[0, 0].tolist() == [3, 7]                    # 11 -> 3 (taken already), then 7
    assert f.experts[1, 1].tolist() == [0, 1]                    # 8, 16 -> 0 (taken twice): then 1
    assert (f.experts[:, 0] == f.experts[:, 1]).all()           # layer 1 takes trace layer 1 mod 1 = 0


def test_expert_bytes_needs_a_trace(capsys):
    assert main(["simulate", "--expert-bytes", "4096"]) == 2
    assert "--expert-bytes needs --trace" in capsys.readouterr().err


def test_tables_are_not_cut_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["simulate", "--cache-experts", "2,4", "--sequences", "2"]) == 0
    out = capsys.readouterr().out
    for header in ("C/layer", "resident", "Belady hit", "loads/tok", "Belady loads", "stall s", "tok/s", "pf P/R",
                   "segments", "SCH c=16"):
        assert header in out, header
    assert "…" not in out
