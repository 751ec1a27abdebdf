"""`moe-engine profile` on the bundled tiny model: the JSON validates against its schema, its numbers agree
with one another (hits + misses = lookups, per-layer figures sum to the totals, Belady bounds the policy,
bytes = loads x expert bytes, ordered percentiles), the plot is a PNG, and bad input names the flag."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import sys

import pytest

from moe_engine.cli import main
from moe_engine.profiling.profile import builtin_prompts, load_schema, run_profile, summary, sweep_sizes

jsonschema = pytest.importorskip("jsonschema")

PROMPTS = ["def fibonacci(n):", "The capital of France is", "import os, sys"]
NEW_TOKENS = 12
TINY = dict(top_k=2, num_experts=16, expert_bytes=3 * 128 * 192 * 2)     # bundled tiny-moe: I 128, D 192, bf16
BUDGET = ["--gpu-mem", "18M", "--max-kv-tokens", "256", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run under a budget small enough for misses: (profile dict, stdout, png path)."""
    tmp = tmp_path_factory.mktemp("profile")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out_json, out_png = tmp / "p.json", tmp / "p.png"
    buf = io.StringIO()                     # module scope: capsys is per test, so redirect stdout here
    with contextlib.redirect_stdout(buf):
        code = main(["profile", *BUDGET, "--prompts", str(prompts), "--max-new-tokens", str(NEW_TOKENS),
                     "--json", str(out_json), *(["--plot", str(out_png)] if _has_matplotlib() else [])])
    assert code == 0
    return json.loads(out_json.read_text(encoding="utf-8")), buf.getvalue(), out_png


@pytest.fixture(scope="module")
def resident():
    """run_profile on the all-resident engine (no budget)."""
    import moe_engine
    eng = moe_engine.load(device="cpu", progress=False)
    try:
        return run_profile(eng, PROMPTS[:2], 4, progress=False)
    finally:
        eng.close()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ---- schema -------------------------------------------------------------------------------------
def test_json_validates_against_schema(run, resident):
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for profile in (run[0], resident):
        jsonschema.Draft202012Validator(schema).validate(profile)


@pytest.mark.parametrize("break_it", [
    lambda p: p.pop("cache"),
    lambda p: p["cache"].pop("hits"),
    lambda p: p["cache"].__setitem__("hit_rate", 1.5),
    lambda p: p["profile"]["tpot_s"].pop("p99"),
    lambda p: p["profile"]["lrc"]["segments"]["16"].__setitem__("srp", "high"),
    lambda p: p["latency"].__setitem__("ttft_p90_s", -1.0),
])
def test_schema_rejects_broken_profiles(run, break_it):
    broken = copy.deepcopy(run[0])
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, load_schema(), cls=jsonschema.Draft202012Validator)


def test_documented_stats_keys_present(run):
    """The stats keys of docs/architecture.md, none renamed."""
    doc = {"cache": ["hits", "misses", "hit_rate", "per_layer_hit_rate", "evictions", "capacity_experts",
                     "resident_experts"],
           "prefetch": ["issued", "used", "wasted", "precision", "recall"],
           "io": ["loads", "bytes_loaded", "bytes_disk_read", "bytes_host_to_device", "stall_seconds"],
           "memory": ["device_budget_bytes", "device_peak_bytes", "host_budget_bytes", "host_peak_bytes"],
           "latency": ["prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "tpot_s"],
           "optimal": ["belady_loads", "belady_hit_rate"]}
    for section, keys in doc.items():
        assert set(keys) <= set(run[0][section]), section


# ---- consistency ----------------------------------------------------------------------------------
def test_lookups_hits_misses_agree(run, resident):
    for p in (run[0], resident):
        c, lay = p["cache"], p["profile"]["layers"]
        assert c["hits"] + c["misses"] == c["lookups"] > 0
        assert math.isclose(c["hit_rate"], c["hits"] / c["lookups"])
        assert sum(c["per_layer_hits"]) == c["hits"] and sum(c["per_layer_misses"]) == c["misses"]
        assert sum(lay["hits"]) == c["hits"] and sum(lay["misses"]) == c["misses"]
        assert sum(lay["lookups"]) == c["lookups"]
        for h, m, n, r in zip(lay["hits"], lay["misses"], lay["lookups"], lay["hit_rate"]):
            assert h + m == n and math.isclose(r, h / n)
    assert run[0]["cache"]["misses"] > 0, "the budget is meant to leave misses"
    assert resident["cache"]["misses"] == 0 and resident["io"]["loads"] == 0


def test_prefetch_per_layer_and_lookahead_sum_to_totals(run):
    pre = run[0]["prefetch"]
    assert sum(pre["per_layer_issued"]) == pre["issued"] and sum(pre["per_layer_used"]) == pre["used"]
    assert sum(d["issued"] for d in pre["by_lookahead"].values()) == pre["issued"]
    assert sum(d["used"] for d in pre["by_lookahead"].values()) == pre["used"]
    assert pre["used"] + pre["wasted"] <= pre["issued"]
    assert math.isclose(pre["precision"], pre["used"] / pre["issued"]) if pre["issued"] else pre["precision"] == 0
    misses = run[0]["cache"]["per_layer_misses"]
    for u, i, m, prec, rec in zip(pre["per_layer_used"], pre["per_layer_issued"], misses,
                                  pre["per_layer_precision"], pre["per_layer_recall"]):
        assert u <= i and math.isclose(prec, u / i if i else 0.0) and math.isclose(rec, u / (u + m) if u + m else 0.0)


def test_belady_bounds_the_policy(run):
    p = run[0]
    opt, sweep = p["optimal"], p["profile"]["cache_sweep"]
    assert sum(opt["per_layer_belady_loads"]) == opt["belady_loads"]
    assert p["io"]["loads"] >= opt["belady_loads"]                   # no policy (prefetching or not) loads fewer
    assert sweep["cache_experts_per_layer"][0] == TINY["top_k"] and sweep["cache_experts_per_layer"][-1] == 16
    for pol, bel, pol_loads, bel_loads in zip(sweep["policy_hit_rate"], sweep["belady_hit_rate"],
                                              sweep["policy_loads"], sweep["belady_loads"]):
        assert bel >= pol - 1e-12 and bel_loads <= pol_loads
    assert all(b <= a for a, b in zip(sweep["belady_loads"], sweep["belady_loads"][1:]))   # more slots, fewer loads
    live = sweep["live"]
    assert live["replay_belady_hit_rate"] >= live["replay_policy_hit_rate"]
    assert live["mean_cache_experts_per_layer"] * len(live["quotas"]) == p["cache"]["capacity_experts"]


def test_bytes_are_loads_times_expert_bytes(run):
    io = run[0]["io"]
    assert io["loads"] > 0 and io["bytes_loaded"] == io["loads"] * TINY["expert_bytes"]
    assert io["bytes_disk_read"] >= io["bytes_loaded"]                # direct IO reads whole aligned blocks


def test_latency_percentiles_and_requests(run):
    p = run[0]
    lat, prof = p["latency"], p["profile"]
    req = prof["requests"]
    assert req["count"] == len(PROMPTS) and all(0 < n <= NEW_TOKENS for n in req["new_tokens"])
    for key in ("ttft", "tpot"):
        assert 0 < lat[f"{key}_p50_s"] <= lat[f"{key}_p90_s"] <= lat[f"{key}_p99_s"]
        assert lat[f"{key}_p99_s"] == prof[f"{key}_s"]["p99"]
    assert math.isclose(lat["ttft_s"], sum(req["ttft_s"]) / len(req["ttft_s"]))
    assert prof["tpot_s"]["count"] == sum(n - 1 for n in req["new_tokens"]) == prof["time_per_token"]["decode_steps"]
    assert math.isclose(lat["decode_tokens_per_s"], 1 / lat["tpot_s"])
    tpt = prof["time_per_token"]
    assert math.isclose(tpt["compute_s"] + tpt["stall_s"], tpt["total_s"]) and math.isclose(tpt["total_s"], lat["tpot_s"])
    assert lat["prefill_tokens_per_s"] > 0


def test_lrc_section(run):
    lrc = run[0]["profile"]["lrc"]
    assert set(lrc["segments"]) == {"4", "16", "64", "256"}
    assert lrc["top_k"] == TINY["top_k"] <= lrc["suggested_cache_experts"] <= TINY["num_experts"]
    assert lrc["tokens"] == sum(run[0]["profile"]["requests"]["prompt_tokens"]) + \
        sum(n - 1 for n in run[0]["profile"]["requests"]["new_tokens"])     # every token fed through the model
    seg4 = lrc["segments"]["4"]
    assert len(seg4["srp_per_layer"]) == len(run[0]["profile"]["layers"]["moe_layers"])


# ---- the report and the plot ------------------------------------------------------------------------
def test_report_prints_tables_and_verdict(run):
    p, out, _ = run
    out = " ".join(out.split())                               # rich wraps long lines
    for text in ("summary", "per MoE layer", "hit rate vs experts per layer", "local routing consistency",
                 "Suits offloading", f"Suggested cache: {p['profile']['lrc']['suggested_cache_experts']} of 16",
                 "no sequence reached m = 64, 256 tokens"):          # 12 new tokens: too short for those m
        assert text in out, text
    assert f"{p['cache']['lookups']}" in out and f"{100 * p['cache']['hit_rate']:.1f}%" in out


def test_plot_is_a_png(run):
    pytest.importorskip("matplotlib")
    png = run[2]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ---- helpers and bad input ------------------------------------------------------------------------------
def test_summary_and_sweep_sizes():
    s = summary([0.5, 0.1, 0.3, 0.2, 0.9])
    assert s["count"] == 5 and s["p50"] == 0.3 and s["p50"] <= s["p90"] <= s["p99"] <= 0.9
    assert summary([]) == {"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    sizes = sweep_sizes(2, 16)
    assert sizes[0] == 2 and sizes[-1] == 16 and sizes == sorted(set(sizes))
    assert len(builtin_prompts()) >= 16


def _cli_error(capsys, *flags) -> str:
    assert main(["profile", *flags]) == 2
    return capsys.readouterr().err


def test_cli_bad_input(capsys, tmp_path):
    assert "--max-new-tokens 0" in _cli_error(capsys, "--max-new-tokens", "0")
    assert "--prompts" in _cli_error(capsys, "--prompts", str(tmp_path / "missing.txt"))
    existing = tmp_path / "exists.json"
    existing.write_text("{}")
    err = _cli_error(capsys, "--json", str(existing))
    assert "--json" in err and "--force" in err and existing.read_text() == "{}"
    assert "--json" in _cli_error(capsys, "--json", str(tmp_path / "no-dir" / "p.json"))
    assert ".png" in _cli_error(capsys, "--plot", str(tmp_path / "p.jpg"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "--prompts" in _cli_error(capsys, "--prompts", str(empty))


def test_plot_without_matplotlib_names_the_fix(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    err = _cli_error(capsys, "--plot", str(tmp_path / "p.png"))
    assert "pip install -e \".[bench]\"" in err and not (tmp_path / "p.png").exists()
