"""scheduling/: FIFO, the expert-aware scheduler (overlap, residents, starvation bound, FIFO when nothing can miss),
group_batches, the fairness rules (turns, caps, chunk sizes, cold experts), errors."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from scheduling import (Candidate, ExpertAwareScheduler, FifoScheduler, chunk_sizes, cold_forced, distinct_experts,
                        fair_order, group_batches, make_scheduler, misses, over_cap, rows_per_client)

ROOT = Path(__file__).resolve().parent.parent
f = frozenset


def cands(*paths, arrivals=None):
    """Candidates 1..n with arrival 0..n-1; each path is a list of per-layer expert sets (or None)."""
    arrivals = arrivals or range(len(paths))
    return [Candidate(i + 1, a, None if p is None else [f(x) for x in p]) for i, (p, a) in enumerate(zip(paths, arrivals))]


# ---- FIFO -------------------------------------------------------------------------------------------
def test_fifo_oldest_first_within_capacity():
    ready = cands([{0}], [{1}], [{2}], [{3}], arrivals=[5, 1, 3, 1])
    assert FifoScheduler().select(ready, 3) == [2, 4, 3]           # arrival 1 (ids 2, 4), then 3
    assert FifoScheduler().select(ready, 10) == [2, 4, 3, 1]


# ---- expert-aware: what it picks ----------------------------------------------------------------------
def test_picks_the_overlapping_pair():
    ready = cands([{0, 1}, {4, 5}], [{2, 3}, {6, 7}], [{0, 1}, {4, 5}], [{8, 9}, {10, 11}])
    assert FifoScheduler().select(ready, 2) == [1, 2]
    sched = ExpertAwareScheduler()
    assert sched.select(ready, 2) == [1, 3]
    assert distinct_experts([ready[0], ready[2]]) == 4 < distinct_experts(ready[:2]) == 8


def test_overlap_pair_found_when_not_oldest():
    ready = cands([{0, 1}], [{2, 3}], [{4, 5}], [{2, 3}])
    assert ExpertAwareScheduler().select(ready, 2) == [2, 4]      # all cost 2 alone: the shared experts seed


def test_residents_steer_the_pick():
    ready = cands([{0, 1}], [{2, 3}], [{4, 5}], [{6, 7}])
    resident = [f({4, 5, 6, 7})]
    assert ExpertAwareScheduler().select(ready, 2, resident) == [3, 4]
    assert misses([ready[2], ready[3]], resident) == 0 and misses(ready[:2], resident) == 4


def test_miss_weight_trades_misses_against_distinct_experts():
    # s2 shares expert 0 with s1 but needs non-resident 9; s3 adds two resident experts (4, 5)
    ready = cands([{0, 1}], [{0, 9}], [{4, 5}])
    resident = [f({0, 1, 4, 5})]
    assert ExpertAwareScheduler(miss_weight=1.0).select(ready, 2, resident) == [1, 2]    # 1 new < 2 new
    assert ExpertAwareScheduler(miss_weight=4.0).select(ready, 2, resident) == [1, 3]    # 4 (a miss) > 2 hits


def test_docstring_example():
    ready = cands([{1, 2}], [{1, 3}], [{7, 8}], [{3, 9}])
    sched = ExpertAwareScheduler(max_wait=4)
    sched._waits = {3: 1, 4: 4}                     # the counters of the diagram
    assert sched.select(ready, 2, [f({1, 2})]) == [2, 4]
    assert sched.waits == {1: 1, 3: 2}


def test_everyone_runs_when_capacity_suffices_and_counters_reset():
    ready = cands([{0}], [{1}], [{2}])
    sched = ExpertAwareScheduler(max_wait=3)
    sched.select(ready, 1)
    assert len(sched.waits) == 2
    assert sched.select(list(reversed(ready)), 3) == [1, 2, 3]
    assert sched.waits == {}


def test_forget_drops_the_counter():
    sched = ExpertAwareScheduler()
    sched.select(cands([{0}], [{1}]), 1)
    (waiting,) = sched.waits
    sched.forget(waiting)
    sched.forget(12345)                             # unknown ids are fine
    assert sched.waits == {}


def test_unknown_paths():
    assert ExpertAwareScheduler().select(cands(None, None, None, arrivals=[2, 0, 1]), 2) == [2, 3]
    ready = cands([{5, 6}], None, [{0, 1}])
    assert ExpertAwareScheduler().select(ready, 1, [f({0, 1})]) == [3]      # cheap known beats the mean
    assert ExpertAwareScheduler().select(ready, 2, [f({0, 1})]) == [1, 3]   # then mean of {s1} ties s1; older wins
    assert distinct_experts(ready) == 4 and distinct_experts(cands(None)) == 0


def test_nothing_to_save_picks_as_fifo():
    """Every predicted expert resident (or no path known): the pick is FIFO's, not the overlap greedy's."""
    ready = cands([{0, 1}], [{2, 3}], [{0, 1}], [{0, 1}], arrivals=[0, 1, 2, 3])
    resident = [f({0, 1, 2, 3})]
    assert ExpertAwareScheduler().select(ready, 2, resident) == FifoScheduler().select(ready, 2) == [1, 2]
    assert ExpertAwareScheduler().select(ready, 2, [f({0, 1})]) == [1, 3]      # s2 misses: the greedy again
    assert ExpertAwareScheduler().select(cands(None, None, None, arrivals=[2, 0, 1]), 2, resident) == [2, 3]


# ---- starvation bound -----------------------------------------------------------------------------------
def check_bound(sched: ExpertAwareScheduler, steps: int, rng: random.Random, capacity: int, make_ready) -> None:
    """Drive `sched`; no ready sequence may be passed over more than max_wait consecutive steps."""
    passed: dict[int, int] = {}
    for t in range(steps):
        ready, resident = make_ready(t)
        picked = sched.select(ready, capacity, resident)
        ids = [c.seq_id for c in ready]
        assert len(picked) == min(capacity, len(ready)) and set(picked) <= set(ids)
        for sid in ids:
            passed[sid] = 0 if sid in picked else passed.get(sid, 0) + 1
            assert passed[sid] <= sched.max_wait, (t, sid, passed[sid])
        for sid in [s for s in passed if rng.random() < 0.01]:              # sequences finish now and then
            passed.pop(sid)
            sched.forget(sid)


@pytest.mark.parametrize("seed", range(12))
def test_no_wait_exceeds_max_wait_random(seed):
    rng = random.Random(seed)
    capacity, max_wait = rng.randint(1, 4), rng.randint(0, 5)
    limit = capacity * (max_wait + 1)                                      # the most the bound can hold for
    layers, experts = 3, 8
    live = list(range(rng.randint(1, limit)))
    paths = {}

    def make_ready(t):
        while len(live) < limit and rng.random() < 0.3:
            live.append(max(live, default=0) + 1)
        for sid in live:
            if sid not in paths or rng.random() < 0.5:
                paths[sid] = None if rng.random() < 0.1 else [f(rng.sample(range(experts), 2)) for _ in range(layers)]
        ready = [Candidate(sid, rng.randint(0, 50), paths[sid]) for sid in live if rng.random() < 0.9]
        resident = [f(rng.sample(range(experts), 3)) for _ in range(layers)]
        return ready, resident

    sched = ExpertAwareScheduler(max_wait=max_wait, miss_weight=rng.choice([1.0, 4.0]))
    check_bound(sched, 300, rng, capacity, make_ready)


@pytest.mark.parametrize("capacity,max_wait", [(1, 2), (2, 3), (3, 1), (1, 0)])
def test_no_wait_exceeds_max_wait_adversarial(capacity, max_wait):
    """Full load: capacity * (max_wait + 1) always ready; one sequence's experts never overlap or reside,
    while the others share the resident experts (the greedy would pass the loner over forever)."""
    n = capacity * (max_wait + 1)
    shared = [f({0, 1})]

    def make_ready(t):
        ready = [Candidate(sid, sid, shared) for sid in range(n - 1)]
        return ready + [Candidate(n - 1, n - 1, [f({100 + t, 200 + t})])], shared

    sched = ExpertAwareScheduler(max_wait=max_wait, miss_weight=8.0)
    check_bound(sched, 200, random.Random(0), capacity, make_ready)


def test_overload_runs_longest_waiting_first():
    """More ready than capacity * (max_wait + 1): the bound cannot hold; the most overdue run first."""
    sched = ExpertAwareScheduler(max_wait=0)
    ready = cands([{0}], [{0}], [{9}])
    first = sched.select(ready, 1, [f({0})])
    second = sched.select(ready, 1, [f({0})])
    third = sched.select(ready, 1, [f({0})])
    assert sorted(first + second + third) == [1, 2, 3]


# ---- group_batches ----------------------------------------------------------------------------------------
def test_group_batches_covers_every_index_once():
    rng = random.Random(0)
    paths = [[f(rng.sample(range(16), 3)) for _ in range(4)] for _ in range(23)]
    for size in (1, 4, 5, 23, 40):
        batches = group_batches(paths, size)
        assert sorted(i for b in batches for i in b) == list(range(23))
        assert all(1 <= len(b) <= size for b in batches)
        assert len(batches) == -(-23 // size)
    assert group_batches([], 4) == []


def test_group_batches_groups_identical_paths():
    kinds = [[f({0, 1}), f({2, 3})], [f({4, 5}), f({6, 7})], [f({0, 8}), f({9, 10})]]
    order = [k for k in range(3) for _ in range(4)]
    random.Random(1).shuffle(order)
    paths = [kinds[k] for k in order]
    batches = group_batches(paths, 4)
    assert len(batches) == 3
    assert all(len({order[i] for i in b}) == 1 for b in batches)


# ---- fairness ------------------------------------------------------------------------------------------------
def test_fair_order_takes_turns():
    items = [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "c"), (6, "b")]
    assert fair_order(items) == [1, 4, 5, 2, 6, 3]                       # each client's first, then seconds
    assert fair_order(items, offset={"a": 2}) == [4, 5, 6, 1, 2, 3]      # a already runs two: it waits
    assert fair_order(items, priority={"a": 10, "c": 5}) == [4, 5, 1, 6, 2, 3]
    assert fair_order([(7, None), (8, None)]) == [7, 8]                   # one client: queue order


def test_over_cap_lists_the_cheapest_to_give_up():
    running = [(1, "a", 50), (2, "a", 10), (3, "a", 30), (4, "b", 5), (5, "c", 1), (6, "c", 2)]
    assert over_cap(running, 1) == [2, 3, 5]                  # a (3 running) first, then evenly; least progress
    assert over_cap(running, 2) == [2]
    assert over_cap(running, 3) == []


def test_rows_per_client():
    ready = [(1, "a"), (2, "a"), (3, "b"), (4, "a")]
    assert rows_per_client(ready, 1) == [1, 3]
    assert rows_per_client(ready, 2) == [1, 2, 3]
    assert rows_per_client([(1, "a"), (2, "a")], 1) == [1, 2]          # alone: never capped


@pytest.mark.parametrize("remaining,budget,want", [([100, 100], 64, [32, 32]), ([10, 100, 100], 64, [10, 27, 27]),
                                                   ([5, 6], 64, [5, 6]), ([9, 9, 9], 2, [1, 1, 0]),
                                                   ([3, 50, 7], 21, [3, 11, 7]), ([], 8, [])])
def test_chunk_sizes_water_fill(remaining, budget, want):
    got = chunk_sizes(remaining, budget)
    assert got == want and sum(got) <= budget and all(0 <= g <= r for g, r in zip(got, remaining))


def test_chunk_sizes_bad_input():
    with pytest.raises(ValueError, match="must be >= 0"):
        chunk_sizes([3], -1)


def test_cold_forced_counts_what_only_one_needs():
    ready = cands([{0, 5}, {1}], [{0, 6}, {2}], [{0, 5}, {3}], None)
    resident = [f({0}), f({3})]
    assert cold_forced(ready, resident) == {1: 1, 2: 2, 3: 0}      # s1: {1}; s2: {6, 2}; s3: 5 shared, 3 resident
    assert cold_forced(cands(None), [f()]) == {}


# ---- construction and errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_peek_is_select_without_counting_a_step(seed):
    rng = random.Random(seed)
    ready = [Candidate(i, i, [f(rng.sample(range(8), 2)) for _ in range(3)]) for i in range(9)]
    resident = [f(rng.sample(range(8), 3)) for _ in range(3)]
    sched = ExpertAwareScheduler(max_wait=3)
    for _ in range(3):                                       # build up some wait counters
        sched.select(ready, 3, resident)
    waits = sched.waits
    peeked = sched.peek(ready, 3, resident)
    assert sched.waits == waits                              # peek changes nothing
    assert sched.select(ready, 3, resident) == peeked        # and is what select picks
    assert FifoScheduler().peek(ready, 4) == FifoScheduler().select(ready, 4)


def test_make_scheduler():
    assert isinstance(make_scheduler("fifo"), FifoScheduler)
    s = make_scheduler("expert", max_wait=2, miss_weight=3.0)
    assert isinstance(s, ExpertAwareScheduler) and (s.max_wait, s.miss_weight) == (2, 3.0)
    with pytest.raises(ValueError, match="choose one of: expert, fifo"):
        make_scheduler("lru")
    with pytest.raises(ValueError, match="does not accept options"):
        make_scheduler("fifo", max_wait=3)


@pytest.mark.parametrize("kw", [{"max_wait": -1}, {"max_wait": 1.5}, {"miss_weight": 0}])
def test_bad_options(kw):
    with pytest.raises(ValueError, match="must be"):
        ExpertAwareScheduler(**kw)


@pytest.mark.parametrize("sched", [FifoScheduler(), ExpertAwareScheduler()])
def test_bad_inputs(sched):
    with pytest.raises(ValueError, match="capacity must be"):
        sched.select(cands([{0}]), 0)
    with pytest.raises(ValueError, match=r"unique, got \[1\] more than once"):
        sched.select([Candidate(1, 0, None), Candidate(1, 1, None)], 1)
    with pytest.raises(ValueError, match="same number of MoE layers"):
        sched.select(cands([{0}], [{0}, {1}]), 1)
    with pytest.raises(ValueError, match="same number of MoE layers"):
        sched.select(cands([{0}], [{1}]), 1, [f(), f()])
    with pytest.raises(ValueError, match="batch_size"):
        group_batches([], 0)
    with pytest.raises(ValueError, match="same number of MoE layers"):
        misses(cands([{0}]), [f(), f()])


def test_never_imports_moe_engine():
    code = "import sys, scheduling; assert not any(m.startswith('moe_engine') for m in sys.modules), 'moe_engine'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
