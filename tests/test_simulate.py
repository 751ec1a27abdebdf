"""Offloading simulator: timeline cases by hand, agreement with replay.py and Belady, prefetching, CLI contract."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from moe_engine.cli import main
from moe_engine.errors import ConfigError
from moe_engine.experts.policies import make_policy
from moe_engine.config import parse_rate
from moe_engine.profiling.hardware import Hardware
from moe_engine.profiling.replay import replay
from moe_engine.profiling.shapes import SHAPES, expert_bytes_shape, shape_from_config
from moe_engine.profiling.simulate import Job, Link, Simulator, compute_bound_tokens_per_s, simulate
from moe_engine.profiling.trace import Trace, save_trace

DEV = Path("/work/shared/data/routing/gptoss20b_dev.npz")
CONTRACT = ("loads", "hit_rate", "belady_loads", "belady_hit_rate", "stall_seconds", "tokens_per_s")
MIB = 1 << 20


@pytest.fixture(scope="module")
def small_trace() -> Trace:
    """The first 2 sequences of the GPT-OSS-20B dev trace, cut to 96 tokens each (24 layers, top-4 of 32)."""
    z = np.load(DEV)
    off = z["seq_offsets"]
    rows = np.concatenate([np.arange(off[i], off[i] + 96) for i in range(2)])
    return Trace(z["experts"][rows], z["probs"][rows], np.array([0, 96, 192]), num_experts=32)


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


def test_gpu_mem_decides_experts_per_layer():
    shape = SHAPES["gpt-oss-20b"]
    fixed = shape.resident_dense_bytes + 4096 * shape.kv_bytes_per_token
    per_slot = shape.expert_bytes * shape.num_layers                     # one more expert in every layer
    assert shape.experts_per_layer(fixed + 7 * per_slot) == 7
    assert shape.experts_per_layer(fixed + 7 * per_slot - 1) == 6
    assert shape.experts_per_layer(fixed + 7 * per_slot, kv_tokens=8192) < 7
    assert shape.experts_per_layer(fixed + 100 * per_slot) == shape.num_experts
    with pytest.raises(ConfigError, match="top_k=4 need at least"):
        shape.experts_per_layer(fixed + 3 * per_slot)
    with pytest.raises(ConfigError, match="--gpu-mem"):                  # Mixtral in bf16 on an 8 GB card
        SHAPES["mixtral-8x7b"].experts_per_layer(int(7.5 * 2**30))


def test_cli_gpu_mem(small_trace, tmp_path):
    path, out = tmp_path / "t.npz", tmp_path / "sim.json"
    save_trace(path, small_trace)
    assert main(["simulate", "--trace", str(path), "--model-shape", "gpt-oss-20b", "--gpu-mem", "7.5G",
                 "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["cache_experts"] for r in rep["results"]] == [SHAPES["gpt-oss-20b"].experts_per_layer(int(7.5 * 2**30))]
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
    ([], ["MODEL_DIR", "--model-shape", "--expert-bytes"]),
    (["--model-shape", "mixtral-8x7b"], ["top-2", "top-4"]),
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
