"""One cache controller, two transports: the live cache (loader threads, real reads) and the offloading simulator
(a modelled link) make the same decisions for the same routing, step by step."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from moe_engine.checkpoint import Checkpoint
from moe_engine.experts import OffloadedExperts
from moe_engine.experts.controller import CacheController
from moe_engine.experts.loader import DONE, QUEUED, LoadJob
from moe_engine.experts.plan import make_plan
from moe_engine.experts.policies import make_policy
from moe_engine.experts.tracker import CacheCounters
from moe_engine.profiling.hardware import Hardware
from moe_engine.profiling.record import record_trace
from moe_engine.profiling.shapes import expert_bytes_shape
from moe_engine.profiling.simulate import Simulator
from moe_engine.runtime.build import non_expert_bytes
from moe_engine.runtime.forecast import Forecaster
from moe_engine.runtime.load import DEFAULT_MODEL_DIR
from predictors.oracle import OraclePredictor

ZERO_TIME = Hardware("zero-time", float("inf"), float("inf"))      # every load and every layer takes no time


@pytest.fixture(scope="module")
def routing():
    """Real routing of the bundled model: 2 prompts, prompt and generated tokens, one row per token fed."""
    import moe_engine
    eng = moe_engine.load(progress=False, dtype="float32")
    trace = record_trace(eng, ["def fibonacci(n):", "import os\nclass Config:"], max_new_tokens=24, progress=False)
    eng.close()
    return trace


def live_cache(quota: int, policy: str, predictor, events: list) -> OffloadedExperts:
    ckpt = Checkpoint(DEFAULT_MODEL_DIR)
    dev, dt = torch.device("cpu"), torch.float32
    plan = make_plan(ckpt.spec, dev, dt, non_expert_bytes(ckpt, dt), 64 << 20, None)
    quotas = [quota if q else 0 for q in plan.quotas]
    plan = dataclasses.replace(plan, quotas=quotas, device_slots=sum(quotas))
    moe = ckpt.spec.moe
    forecaster = None
    if predictor is not None:
        forecaster = Forecaster(predictor, None, {m: None for m in ckpt.spec.moe_layers}, moe.top_k, moe.num_experts)
    return OffloadedExperts(ckpt, plan, dt, dev, make_policy(policy), forecaster, clock=lambda: 0.0, events=events)


def drive_live(cache: OffloadedExperts, trace, hidden: int) -> None:
    """What the MoE blocks do, one token per step, with the loader quiet before each layer (the zero-time link
    has finished every load by then, too)."""
    x = torch.zeros(1, hidden)
    for s in range(trace.num_sequences):
        for row in range(int(trace.seq_offsets[s]), int(trace.seq_offsets[s + 1])):
            cache.observer.begin_step(torch.tensor([int(trace.token_ids[row])]), torch.tensor([s]))
            for layer in range(trace.num_layers):
                ids = torch.tensor(trace.experts[row, layer][None], dtype=torch.long)
                cache.observer.observe(layer, x, ids, torch.tensor(trace.probs[row, layer][None], dtype=torch.float32))
                cache.loader.join()
                used = sorted(set(ids.flatten().tolist()))
                for _e, buf, _host in cache.fetch(layer, used, [1] * len(used)):
                    assert buf.numel() > 0


@pytest.mark.parametrize("quota,policy,prefetch", [(3, "lru", True), (5, "default", True), (2, "default", False)])
def test_live_cache_and_simulator_decide_alike_step_by_step(routing, quota, policy, prefetch):
    live_events, sim_events = [], []
    oracle = lambda: OraclePredictor(routing.experts, routing.probs, routing.seq_offsets)   # noqa: E731
    cache = live_cache(quota, policy, oracle() if prefetch else None, live_events)
    try:
        drive_live(cache, routing, 192)
        live = cache.stats()
    finally:
        cache.close()
    shape = expert_bytes_shape(1 << 20, routing.top_k, routing.num_layers, 16)
    sim = Simulator(routing, shape, ZERO_TIME, [quota] * routing.num_layers, policy,
                    predictor=oracle() if prefetch else None, reset=False, events=sim_events).run()
    kinds = {e[0] for e in live_events}
    assert "demand" in kinds and ("prefetch" in kinds) == prefetch and any(e[4] is not None for e in live_events)
    assert live_events == sim_events                     # (kind, step, layer, expert, evicted, distance), in order
    assert (live["io"]["loads"], live["cache"]["evictions"], live["cache"]["hits"], live["cache"]["misses"]) == \
        (sim.counters.loads, sim_events_evictions(sim_events), sim.table_hits, sim.table_misses)
    assert (live["prefetch"]["issued"], live["prefetch"]["used"], live["prefetch"]["wasted"]) == \
        (sim.counters.prefetch_issued, sim.counters.prefetch_used, sim.counters.prefetch_wasted)


def sim_events_evictions(events: list) -> int:
    return sum(1 for e in events if e[0] in ("demand", "prefetch") and e[4] is not None)


# ---- the controller alone, over a scripted transport ------------------------------------------------------
class Script:
    """A transport whose loads finish only when the test says so."""

    parallelism = 1

    def __init__(self):
        self.jobs: list[LoadJob] = []
        self.now = lambda: 0.0

    def submit(self, job):
        self.jobs.append(job)

    def promote(self, job):
        job.priority = 0

    def cancel(self, job):
        if job.state != QUEUED:
            return False
        job.state = "cancelled"
        return True

    def busy(self, job):
        return job.state in (QUEUED, "running")

    def wait(self, job):
        job.state = DONE


def test_misses_wait_for_stale_loads_holding_every_slot():
    """Layer 1 has 2 slots, both taken by wrong prefetches that are still running when its routing is known (2
    misses). Both misses are deferred; the first waits for a stale load to finish and takes its slot, the second
    evicts the first once that has been computed. Nothing is evicted from under a running load."""
    t, events = Script(), []
    ctl = CacheController([2, 2], 8, make_policy("lru"), 2, t, CacheCounters(2), events=events)
    guess = torch.zeros(1, 8)
    guess[0, [2, 3]] = 1.0                                                  # layer 1 will use 2 and 3 (wrong)
    ctl.prepare(0, [0, 1], [1, 1], {1: guess})
    for e in (0, 1):
        ctl.acquire(0, e)
    stale = [j for j in t.jobs if j.layer == 1]
    for j in stale:
        j.state = "running"
    assert ctl.prepare(1, [4, 5], [1, 1], {}) == [(4, False), (5, False)]
    assert events[2:] == [("prefetch", 0, 1, 2, None, 1), ("prefetch", 0, 1, 3, None, 1),
                          ("defer", 0, 1, 4), ("defer", 0, 1, 5)]
    slot, job = ctl.acquire(1, 4)
    assert stale[0].state == DONE and stale[1].state == "running"         # waited for one stale load only
    assert job.expert == 4 and events[6:] == [("demand", 0, 1, 4, 2, 0)]
    assert ctl.acquire(1, 5)[1].expert == 5 and events[7:] == [("demand", 0, 1, 5, 4, 0)]
    assert ctl.table.contains(1, 3) and stale[1].state == "running"


def test_simulator_defers_instead_of_failing_when_every_slot_is_held():
    """The same case on the modelled link: the prefetch has started when layer 1 routes, so it holds its slot;
    the old simulator raised ("every slot is held"), the controller defers the miss as the live cache does."""
    from moe_engine.profiling.trace import Trace
    rows = np.array([[[0, 1], [4, 5]]], dtype=np.int16)                       # [T, L, K]
    wrong = np.array([[[0, 1], [2, 3]]], dtype=np.int16)                      # the forecast: layer 1 uses 2, 3
    trace = Trace(rows, np.full(rows.shape, 0.5, np.float32), np.array([0, 1]), num_experts=8)
    shape = expert_bytes_shape(1 << 20, 2, 2, 8)
    events = []
    res = Simulator(trace, shape, Hardware("slow-link", 1e9, 1e12), [2, 2], "lru",
                    predictor=OraclePredictor(wrong, np.full(wrong.shape, 0.5, np.float32), np.array([0, 1])),
                    reset=False, events=events).run().to_dict()
    assert [e[0] for e in events] == ["demand", "demand", "prefetch", "prefetch", "cancel", "demand", "defer",
                                      "demand"]
    assert events[-1] == ("demand", 0, 1, 5, 2, 0) and res["loads"] == 5 and res["stall_seconds"] > 0


def test_simulator_takes_the_hybrid_path_when_the_host_is_faster(routing):
    shape = expert_bytes_shape(64 << 20, routing.top_k, routing.num_layers, 16)
    slow_link = Hardware("pcie", 1e9, 500e9)
    fast_host = slow_link.replace(host_compute_bytes_per_s=100e9)
    slow_host = slow_link.replace(host_compute_bytes_per_s=0.5e9)
    runs = {}
    for name, hw in (("none", slow_link), ("fast", fast_host), ("slow", slow_host)):
        events = []
        res = Simulator(routing, shape, hw, [4] * routing.num_layers, "lru", reset=False, events=events).run()
        runs[name] = (res.to_dict(), {e[0] for e in events})
    assert "host" not in runs["none"][1] and "host" not in runs["slow"][1]
    assert runs["fast"][1] == {"host"} and runs["fast"][0]["loads"] == 0      # every miss computed where it is
    assert runs["fast"][0]["tokens_per_s"] > runs["none"][0]["tokens_per_s"]
    assert runs["slow"][0]["loads"] == runs["none"][0]["loads"]
