"""moe-lrc metrics: hand-computed tiny cases and the vectorized path against the readable loop twin."""
import json

import numpy as np
import pytest

from moe_engine.profiling.lrc import (default_cache_sizes, format_lrc, lrc_metrics, lrc_slow, segment_starts,
                                      suggest_cache_experts)
from moe_engine.profiling.trace import Trace


def _trace(experts, seq_offsets, num_experts=None) -> Trace:
    experts = np.asarray(experts, dtype=np.int16)
    return Trace(experts, np.ones(experts.shape, np.float32), np.asarray(seq_offsets, np.int64),
                 num_experts=num_experts)


def _random_trace(rng, lengths, n_layers=3, n_exp=8, k=2, sticky=0.6) -> Trace:
    """Routing with some locality: each token keeps the previous token's experts with probability `sticky`."""
    rows = []
    for length in lengths:
        prev = rng.choice(n_exp, size=(n_layers, k), replace=False) if n_exp >= n_layers * k else None
        for _ in range(length):
            tok = np.stack([rng.choice(n_exp, size=k, replace=False) for _ in range(n_layers)])
            if prev is not None and rng.random() < sticky:
                tok = prev
            rows.append(tok)
            prev = tok
    return _trace(np.array(rows), np.r_[0, np.cumsum(lengths)], n_exp)


def test_hand_case_one_segment():
    # one layer, k = 1, m = 4: experts 0 0 0 1 -> n = {0: 3, 1: 1}
    tr = _trace([[[0]], [[0]], [[0]], [[1]]], [0, 4], num_experts=4)
    out = lrc_metrics(tr, segments=(4,), cache_sizes=(1, 2))
    seg = out["segments"]["4"]
    assert seg["num_segments"] == 1
    assert seg["sch"]["1"] == pytest.approx(3 / 4)
    assert seg["sch"]["2"] == pytest.approx(1.0)
    # t = 1: P = {0, 1}, matches 4, preds 8, acts 4 -> 8/12; t = 2, 3: P = {0}, matches 3, preds 4 -> 6/8
    assert seg["srp"] == pytest.approx(6 / 8)
    assert seg["srp_threshold_per_layer"] == [2]


def test_hand_case_tail_dropped_and_boundaries():
    # sequences of 5 and 3 tokens, m = 2: segments [0,2), [2,4) of seq 0 and [5,7) of seq 1; rows 4 and 7 dropped
    assert segment_starts(np.array([0, 5, 8]), 2).tolist() == [0, 2, 5]
    ex = [[[0]], [[1]], [[2]], [[2]], [[3]], [[1]], [[1]], [[0]]]
    tr = _trace(ex, [0, 5, 8], num_experts=4)
    seg = lrc_metrics(tr, segments=(2, 16), cache_sizes=(1,))["segments"]
    # c = 1: best single expert per segment serves 1, 2, 2 tokens of 2 -> 5/6
    assert seg["2"]["sch"]["1"] == pytest.approx(5 / 6)
    assert seg["2"]["tokens_covered"] == 6
    assert seg["16"]["num_segments"] == 0 and seg["16"]["srp"] is None


def test_perfectly_consistent_routing():
    # every token of a sequence uses the same k experts: SCH(m, k) = 1 and SRP = 1 (threshold m)
    tr = _trace(np.tile(np.array([[3, 5]]), (64, 2, 1)), [0, 64], num_experts=8)
    out = lrc_metrics(tr, segments=(4, 16))
    for entry in out["segments"].values():
        assert entry["sch"]["2"] == pytest.approx(1.0)
        assert entry["srp"] == pytest.approx(1.0)
    assert out["suggested_cache_experts"] == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("m", [1, 3, 4, 16])
def test_vectorized_matches_loop_twin(seed, m):
    rng = np.random.default_rng(seed)
    tr = _random_trace(rng, lengths=rng.integers(1, 40, size=5), n_layers=3, n_exp=8, k=2)
    out = lrc_metrics(tr, segments=(m,), cache_sizes=(1, 2, 3, 5, 8))["segments"][str(m)]
    for layer in range(tr.num_layers):
        seqs = [tr.experts[a:b, layer].tolist() for a, b in zip(tr.seq_offsets[:-1], tr.seq_offsets[1:])]
        for c in (1, 2, 3, 5, 8):
            ref = lrc_slow(seqs, m, c, tr.top_k)
            if ref is None:
                assert out["sch"][str(c)] is None
                continue
            assert out["sch_per_layer"][str(c)][layer] == pytest.approx(ref[0], abs=1e-12)
            assert out["srp_per_layer"][layer] == pytest.approx(ref[1], abs=1e-12)


def test_sch_monotone_bounded_and_json_ready():
    rng = np.random.default_rng(5)
    tr = _random_trace(rng, lengths=[300, 200], n_layers=2, n_exp=16, k=2, sticky=0.3)
    out = lrc_metrics(tr)
    json.dumps(out)                                          # JSON-ready: no numpy scalars
    assert out["cache_sizes"] == default_cache_sizes(2, 16) == [2, 4, 8, 16]
    for entry in out["segments"].values():
        if entry["num_segments"] == 0:
            continue
        vals = [entry["sch"][str(c)] for c in out["cache_sizes"]]
        assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:]))
        assert vals[-1] == pytest.approx(1.0)
        assert 0 < entry["srp"] <= 1
    s = out["suggested_cache_experts"]
    assert 2 <= s <= 16 and out["suggestion"]["sch_at_suggested"] >= 0.9
    assert len(format_lrc(out)) == 1 + len(out["segments"])


def test_suggestion_rule():
    sch = np.array([0.5, 0.7, 0.85, 0.92, 0.97, 1.0])
    assert suggest_cache_experts(sch, top_k=2) == 4
    assert suggest_cache_experts(sch, top_k=5) == 5             # never below k
    assert suggest_cache_experts(sch, top_k=1, target=0.999) == 6


def test_longer_segments_lower_sch_on_real_trace():
    z = np.load("/work/shared/data/routing/gptoss20b_dev.npz")
    off = z["seq_offsets"][:5]
    tr = Trace(z["experts"][:off[-1]], z["probs"][:off[-1]], off.astype(np.int64), num_experts=32)
    out = lrc_metrics(tr)
    sch = [out["segments"][m]["sch"]["8"] for m in ("4", "16", "64", "256")]
    assert all(a >= b for a, b in zip(sch, sch[1:]))          # a fixed cache serves short segments better
    assert 4 <= out["suggested_cache_experts"] <= 32
