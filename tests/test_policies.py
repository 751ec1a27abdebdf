"""Eviction policies, per-layer quotas, Belady's bound, trace files and replays (all CPU, fast)."""
from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from moe_engine.errors import ConfigError
from moe_engine.experts.policies import (
    DEFAULT_POLICY,
    LFU,
    LRU,
    layer_quotas,
    make_policy,
    quotas_from_curves,
)
from moe_engine.experts.policy_default import DefaultPolicy, hazard_features
from moe_engine.experts.table import SlotTable
from moe_engine.profiling.belady import belady, belady_slow
from moe_engine.profiling.replay import ContextScorer, replay
from moe_engine.profiling.trace import (
    Trace,
    TraceError,
    load_trace,
    save_trace,
    validate,
)


def brute_force_loads(steps: list[list[int]], capacity: int) -> int:
    """Fewest loads over every eviction choice (demand loading, the current step's experts kept)."""
    @functools.cache
    def best(t: int, resident: frozenset) -> int:
        if t == len(steps):
            return 0
        need = frozenset(steps[t])
        miss = need - resident
        n_evict = max(0, len(resident) + len(miss) - capacity)
        return len(miss) + min(best(t + 1, (resident - frozenset(ev)) | need)
                               for ev in itertools.combinations(sorted(resident - need), n_evict))
    return best(0, frozenset())


def random_steps(rng, num_steps: int, num_experts: int, k: int) -> list[list[int]]:
    p = rng.dirichlet(np.full(num_experts, 0.5))
    return [rng.choice(num_experts, k, replace=False, p=p).tolist() for _ in range(num_steps)]


def make_trace(rng, num_seq=3, num_steps=40, layers=2, num_experts=6, k=2) -> Trace:
    rows = [random_steps(rng, num_steps, num_experts, k) for _ in range(num_seq * layers)]
    experts = np.array(rows).reshape(num_seq, layers, num_steps, k).transpose(0, 2, 1, 3).reshape(-1, layers, k)
    offsets = np.arange(num_seq + 1, dtype=np.int64) * num_steps
    return Trace(experts.astype(np.uint8), np.full(experts.shape, 1.0 / k, np.float16), offsets, num_experts=num_experts)


# --- Belady --------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, capacity, loads", [
    ([[0], [1], [2], [0], [1], [2]], 2, 4),                   # evict the farthest: 2 then 0 or 1
    ([[0, 1], [2, 3], [0, 1], [2, 3]], 2, 8),                 # capacity = K: every step misses
    ([[0, 1], [2, 3], [0, 1], [2, 3]], 4, 4),                 # everything fits: compulsory loads only
    ([[0, 1], [0, 2], [0, 1], [0, 2], [0, 1]], 2, 6),          # 0 stays, 1 and 2 take turns in one slot
    ([[0, 1], [2, 0], [1, 3], [0, 1]], 3, 4),                 # at step 2, keep 0 (used next), drop 2
])
def test_belady_known_answers(steps, capacity, loads):
    experts = np.array(steps)[:, None, :]                      # one layer
    assert belady(experts, capacity).total_loads == loads
    assert belady_slow(steps, capacity) == loads
    assert brute_force_loads(steps, capacity) == loads


def test_belady_equals_brute_force_on_tiny_cases():
    rng = np.random.default_rng(1)
    for _ in range(60):
        num_experts = int(rng.integers(3, 7))
        k = int(rng.integers(1, 3))
        capacity = int(rng.integers(k, num_experts))
        steps = random_steps(rng, int(rng.integers(1, 10)), num_experts, k)
        fast = belady(np.array(steps)[:, None, :], capacity).total_loads
        assert fast == belady_slow(steps, capacity) == brute_force_loads(steps, capacity), (steps, capacity)


def test_belady_layers_sequences_and_reset():
    rng = np.random.default_rng(2)
    tr = make_trace(rng, num_seq=4, num_steps=30, layers=3, num_experts=8, k=2)
    caps = [2, 3, 5]
    res = belady(tr.experts, caps, tr.seq_offsets, reset=True, batch=3)           # batches split the sequences
    for layer, cap in enumerate(caps):
        want = sum(belady_slow(tr.experts[a:b, layer].tolist(), cap)
                   for a, b in zip(tr.seq_offsets[:-1], tr.seq_offsets[1:]))
        assert res.loads[layer] == want
    cont = belady(tr.experts, caps, tr.seq_offsets, reset=False)
    assert cont.loads[1] == belady_slow(tr.experts[:, 1].tolist(), 3)
    assert cont.total_loads <= res.total_loads                 # no reset keeps what earlier sequences loaded
    with pytest.raises(ValueError, match="below top_k"):
        belady(tr.experts, 1)


@pytest.mark.parametrize("name", ["lru", "lfu", "default"])
def test_belady_never_worse_than_policies(name):
    rng = np.random.default_rng(3)
    tr = make_trace(rng, num_seq=3, num_steps=60, layers=2, num_experts=8, k=2)
    for cap in (2, 3, 5):
        r = replay(tr, make_policy(name), cap)
        assert r.belady.total_loads <= r.total_loads
        assert r.ratio >= 1.0


# --- slot table + policies ------------------------------------------------------------------------

def serve(table: SlotTable, layer: int, experts: list[int], step: int, scores=None) -> list[int | None]:
    evicted = []
    for e in table.lookup(layer, experts, step):
        evicted.append(table.place(layer, e, step, protected=experts, scores=scores)[1])
    return evicted


def test_lru_evicts_the_oldest_and_lfu_the_rarest():
    lru, lfu = SlotTable([3], 8, LRU()), SlotTable([3], 8, LFU())
    for step, experts in enumerate([[0], [1], [1], [2], [0]]):
        serve(lru, 0, experts, step)
        serve(lfu, 0, experts, step)
    assert serve(lru, 0, [3], 5) == [1]                        # 1 last used at step 2, 2 at 3, 0 at 4
    assert serve(lfu, 0, [3], 5) == [2]                        # 2 used once, 0 and 1 twice


@pytest.mark.parametrize("name", ["lru", "lfu", "default"])
def test_protected_experts_never_evicted_and_quotas_respected(name):
    rng = np.random.default_rng(4)
    quotas = [2, 4, 3]
    table = SlotTable(quotas, 10, make_policy(name))
    for step in range(200):
        for layer, q in enumerate(quotas):
            need = rng.choice(10, 2, replace=False).tolist()
            evicted = serve(table, layer, need, step)
            assert not set(evicted) & set(need)
            assert set(need) <= set(table.resident_experts(layer))
            assert len(table.resident_experts(layer)) <= q
            slots = [table.slot_of[layer][e] for e in need]
            assert all(table.base[layer] <= s < table.base[layer + 1] for s in slots)
    assert table.place(0, 9 if 9 not in table.slot_of[0] else 8, 200, protected=table.resident_experts(0)) is None


def test_default_policy_prefers_keeping_frequent_recent_experts():
    table = SlotTable([3], 8, DefaultPolicy())
    for step in range(40):
        serve(table, 0, [0, 1] if step % 2 else [0, 2], step)  # 0 always, 1 and 2 alternate
    serve(table, 0, [3, 4], 40)                                # evicts two of {0, 1, 2}: 0 is the most used
    assert 0 in table.resident_experts(0)


def test_default_policy_scores_override_history():
    policy = DefaultPolicy()
    policy.reset(1, 6)
    for step in range(30):
        policy.record(0, [0, 1], step)
    policy.record(0, [2, 3], 30)
    scores = np.zeros(6)
    assert policy.victim(0, [0, 1, 2, 3], 31) in (2, 3)        # used once: evict one of them
    scores[[2, 3]] = 1.0
    scores[0] = 0.0
    assert policy.victim(0, [0, 1, 2, 3], 31, scores) in (0, 1)  # the predictor says 2 and 3 come back


def test_default_policy_fast_logits_match_features():
    rng = np.random.default_rng(5)
    policy = DefaultPolicy()
    policy.reset(2, 12)
    for step in range(0, 300, 3):                              # gaps between steps, duplicates in a record
        policy.record(1, rng.choice(12, 3).tolist(), step)
    step = 305
    steps = step - policy.first[1] + 1
    k_over_e = max(policy.uses[1] / steps, 1.0) / 12                       # K/E, at least one expert a step
    age = np.where(policy.last[1] < 0, steps + 1, step - policy.last[1])
    dec = policy.decayed[1] * policy.lam_pow[np.minimum(step - policy.updated[1], policy.max_gap)]
    for scores, coef in ((None, policy.coef_no_scores), (rng.random(12), policy.coef_scores)):
        slow = hazard_features(age, policy.count[1], steps, dec, k_over_e, scores) @ coef[:-1] + coef[-1]
        np.testing.assert_allclose(policy.logits(1, step, scores), slow, rtol=1e-12, atol=1e-12)


def test_make_policy_names():
    assert DEFAULT_POLICY == "default" and make_policy(DEFAULT_POLICY).name == "default"
    with pytest.raises(ConfigError, match="available: default, lfu, lru"):
        make_policy("mru")


# --- quotas ---------------------------------------------------------------------------------------

def test_layer_quotas_sum_and_bounds():
    rng = np.random.default_rng(6)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        lo = int(rng.integers(1, 5))
        hi = int(rng.integers(lo, 40))
        total = int(rng.integers(n * lo, n * hi + 1))
        w = rng.random(n) ** 3 * (rng.random(n) > 0.2)
        q = layer_quotas(total, w, lo, hi)
        assert sum(q) == total and min(q) >= lo and max(q) <= hi
    assert layer_quotas(192, [1.0] * 24, 4, 32) == [8] * 24
    assert layer_quotas(20, [4, 2, 1, 1], 2, 10) == [10, 5, 3, 2]
    assert layer_quotas(12, [0.9, 0.1, 0.1], 2, 8) == [8, 2, 2]      # capped layer's share goes to the rest


def test_layer_quotas_dense_layers_and_errors():
    assert layer_quotas(10, [1, 5, 1, 1], 2, 8, moe_layers=[0, 2, 3]) == [4, 0, 3, 3]
    with pytest.raises(ConfigError, match="raise the expert budget"):
        layer_quotas(7, [1, 1, 1, 1], 2, 8)
    with pytest.raises(ConfigError, match="finite"):
        layer_quotas(8, [1, -1, 1, 1], 2, 8)


def test_quotas_from_curves_is_optimal_on_convex_curves():
    rng = np.random.default_rng(7)
    for _ in range(20):
        steps = rng.random((3, 6)) * 10
        curves = np.concatenate([np.full((3, 1), 100.0), 100 - np.cumsum(np.sort(steps, axis=1)[:, ::-1], 1)], 1)
        best = min((sum(curves[i, q[i]] for i in range(3)), q)
                   for q in itertools.product(range(1, 7), repeat=3) if sum(q) == 9)
        q = quotas_from_curves(9, curves, 1, 6)
        assert sum(q) == 9 and sum(curves[i, q[i]] for i in range(3)) == pytest.approx(best[0])


# --- trace files ----------------------------------------------------------------------------------

def test_trace_round_trip(tmp_path):
    tr = make_trace(np.random.default_rng(8))
    tr.token_ids = np.arange(tr.num_steps, dtype=np.int32)
    save_trace(tmp_path / "t.npz", tr)
    back = load_trace(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.experts, tr.experts)
    np.testing.assert_array_equal(back.seq_offsets, tr.seq_offsets)
    np.testing.assert_array_equal(back.token_ids, tr.token_ids)
    assert back.sequences(1, 3).num_steps == 80 and back.sequences(1, 3).seq_offsets.tolist() == [0, 40, 80]


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("probs"), "missing key 'probs'"),
    (lambda a: a.update(experts=a["experts"].astype(np.float32)), "key 'experts' must be an integer array"),
    (lambda a: a.update(experts=a["experts"][:, 0]), "key 'experts' must be an integer array"),
    (lambda a: a.update(probs=a["probs"][:-1]), "key 'probs' has shape"),
    (lambda a: a.update(seq_offsets=np.array([0, 5])), "key 'seq_offsets' must rise from 0 to T=120"),
    (lambda a: a.update(seq_offsets=np.array([0, 80, 40, 120])), "key 'seq_offsets' must rise"),
    (lambda a: a.update(token_ids=np.zeros(3, np.int32)), "key 'token_ids' has shape"),
])
def test_trace_errors_name_file_and_key(tmp_path, change, message):
    tr = make_trace(np.random.default_rng(9))
    arrays = {"experts": tr.experts, "probs": tr.probs, "seq_offsets": tr.seq_offsets}
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(TraceError, match=message) as err:
        load_trace(path)
    assert str(path) in str(err.value)


def test_trace_missing_file_and_id_range(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "none.npz")
    tr = make_trace(np.random.default_rng(10), num_experts=6)
    save_trace(tmp_path / "t.npz", tr)
    with pytest.raises(TraceError, match="num_experts=4"):
        load_trace(tmp_path / "t.npz", num_experts=4)
    with pytest.raises(TraceError, match="negative"):
        validate({"experts": -np.ones((2, 1, 1), np.int16), "probs": np.ones((2, 1, 1)),
                  "seq_offsets": np.array([0, 2])})


# --- replay ---------------------------------------------------------------------------------------

def test_replay_counts_on_a_hand_made_trace():
    experts = np.array([[[0, 1]], [[2, 3]], [[0, 1]], [[0, 2]]], dtype=np.uint8)     # T=4, L=1, K=2
    tr = Trace(experts, np.ones(experts.shape, np.float16), np.array([0, 2, 4]), num_experts=4)
    r = replay(tr, LRU(), 2, reset=True)
    assert (r.total_loads, int(r.hits.sum())) == (7, 1)                        # 4 | 2 + 1 (0 hits at step 3)
    r = replay(tr, LRU(), 3, reset=False)      # 0 1 | 2, 3 evicts 0 | 0 evicts 2 (tie, lower id) | 2 evicts 3
    assert r.total_loads == 6 and r.hit_rate == pytest.approx(2 / 8)
    assert r.belady.total_loads == 5 and r.to_dict()["ratio"] == pytest.approx(6 / 5)


def test_replay_matches_belady_free_capacity_and_scorer_twin():
    rng = np.random.default_rng(11)
    tr = make_trace(rng, num_seq=4, num_steps=50, layers=2, num_experts=6, k=2)
    r = replay(tr, DefaultPolicy(), 6)                          # everything fits: compulsory loads only
    assert r.total_loads == r.belady.total_loads
    scorer = ContextScorer.fit(tr, horizon=2)
    seq = tr.experts[:50]
    want = scorer.predict(seq)                                  # [T, L, E]
    scorer.reset()
    for t in range(len(seq)):
        for layer in range(2):
            scorer.observe(layer, seq[t, layer].tolist())
            np.testing.assert_allclose(scorer.scores(layer), want[t, layer], atol=1e-4)
        scorer.end_token()
    with_scores = replay(tr, DefaultPolicy(), [3, 4], scorer=scorer)
    assert with_scores.quotas == [3, 4] and with_scores.total_loads >= with_scores.belady.total_loads


@pytest.mark.parametrize("name", ["lru", "lfu", "default"])
def test_avoided_experts_evicted_only_when_nothing_else_can_be(name):
    table = SlotTable([3], 8, make_policy(name))
    serve(table, 0, [0, 1, 2], 0)
    slot, evicted = table.place(0, 5, 1, protected=[0], avoid=[1])
    assert evicted == 2                                      # 0 protected, 1 avoided: 2 is the only choice
    slot, evicted = table.place(0, 6, 2, protected=[0, 5], avoid=[1])
    assert evicted == 1                                      # everything else protected: the avoided one goes
    assert set(table.resident_experts(0)) == {0, 5, 6}
