"""The cache controller: every decision of an expert cache, over expert ids, driving a transport.

    prepare(layer, experts, counts, predictions)       once per MoE layer pass, before any expert is computed
        cancel stale prefetches -> score the last prediction -> lookup (SlotTable + policy)
        hits: promote their queued loads | misses: compute on the host (hybrid), demand-load, or defer
        (every slot held by this pass) -> prefetch predicted experts of later layers (PrefetchGate)
        -> compute order: ready, loading, demand, deferred; host experts last
    acquire(layer, expert)                              as compute takes each expert
        place deferred misses as slots free up -> wait for exactly this expert's load -> its slot

The live cache (cache.py) is this controller + the loader threads (loader.Loader) + slot storage; the
offloading simulator (profiling/simulate.py) is this controller + a modelled link on a modelled
timeline. Both therefore make the same loads, evictions, deferrals and prefetches for the same routing
and the same times; `events` (a list, when given) records each decision for comparing them step by step:

    ("demand" | "prefetch", step, layer, expert, evicted or None, distance)   a load started
    ("defer", step, layer, expert) / ("host", step, layer, expert) / ("cancel", step, layer, expert)

The controller owns the slot table, the job ledger, the lookahead clock, the prefetch gate and the
counters' decision side; it never touches bytes, threads or files.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from ..errors import ExpertReadError
from .clock import LookaheadClock
from .ledger import JobLedger, Transport
from .loader import DEMAND, FAILED, LoadJob
from .prefetch_gate import PrefetchGate
from .table import SlotTable
from .tracker import CacheCounters

# (layer, expert, tokens) -> True when the missed expert should be computed on the host CPU (hybrid execution)
HostDecision = Callable[[int, int, int], bool]


class CacheController:
    def __init__(self, quotas: Sequence[int], num_experts: int, policy, top_k: int, transport: Transport,
                 counters: CacheCounters, host_compute: HostDecision | None = None, max_lookahead: int = 4,
                 events: list | None = None):
        self.table = SlotTable(quotas, num_experts, policy)
        self.counters = counters
        self.clock = LookaheadClock(transport.now)
        self.jobs = JobLedger(transport, counters, self.clock.issued)
        self.gate = PrefetchGate(len(quotas), top_k)   # what to prefetch, when prefetching may evict
        self.parallelism, self.max_lookahead = transport.parallelism, max_lookahead
        self.host_compute = host_compute
        self.events = events
        self.step, self._layer = 0, -1
        self._needed: list[int] = []                      # experts of the current layer pass, not yet computed
        self._deferred: list[int] = []                    # misses waiting for a slot (more experts than slots)
        self.on_host: set[int] = set()                    # experts of this pass computed on the host
        self._upcoming: dict[int, frozenset[int]] = {}    # layer -> experts the next scheduled step is forecast to use

    def hint_upcoming(self, experts: dict[int, frozenset[int]]) -> None:
        """A batching loop's guess of the next step's experts per layer: evicted only when nothing else can be.

        Replaces the previous hint; an empty dict clears it. Changes which expert is evicted, never what is computed.
        """
        self._upcoming = dict(experts)

    def prefetch_forecast(self, experts: dict[int, Iterable[int]], keep: dict[int, Iterable[int]] | None = None) -> int:
        """Between steps: start loads of the experts the next step is forecast to use ({layer: experts}, e.g. a
        speculative verify step's from its drafted tokens), nearest layer first, each into a free slot or in place
        of a resident the forecast does not name (the policy's victim; never a load in flight nor `keep`'s
        {layer: experts}, e.g. what a draft still computes with). Returns the loads
        started. They count as prefetches (distance: the layer's rank in the forecast) and are cancelled, if not
        begun, when their layer's step does not use them."""
        started = 0
        for distance, layer in enumerate(sorted(experts), start=1):
            want = set(experts[layer])
            if not self.table.quotas[layer]:
                continue
            for e in sorted(want):
                if self.table.contains(layer, e):
                    continue
                protected = self.jobs.inflight(layer) | want | set((keep or {}).get(layer, ()))
                placed = self.table.place(layer, e, self.step, protected=protected)
                if placed is None:
                    break
                self._issue_prefetch(layer, e, placed, distance)
                started += 1
        return started

    def lookahead(self) -> int:
        """How many layers ahead to prefetch so loads finish just before they are needed.

        A layer's loads take (loads per layer x time per load / loads in parallel); a layer computes in
        `layer_s`. Prefetching d layers ahead hides the loads when d x layer_s covers their time.
        """
        t = self.clock
        if t.load_s is None or t.layer_s is None:
            return 1
        need = max(t.loads_per_layer, 1.0) * t.load_s / self.parallelism
        return max(1, min(self.max_lookahead, math.ceil(need / max(t.layer_s, 1e-6))))

    def prepare(self, layer: int, experts: Sequence[int], counts: Sequence[int],
                predictions: dict[int, torch.Tensor]) -> list[tuple[int, bool]]:
        """Look the layer's experts up, start their loads, then prefetch; returns (expert, on_host) in compute order.

        predictions: the predictor's scores {later layer: [N, E]} made from this layer's routing (may be empty).
        """
        new_step = layer <= self._layer
        if new_step:
            self.step += 1
            self.gate.new_step()
        self.clock.layer_start(new_step, self.counters.stall_seconds)
        self._layer = layer
        experts = list(experts)
        self._needed, self._deferred = list(experts), []
        for e in self.jobs.cancel_stale(layer, experts):
            self.table.remove(layer, e)
            self._log("cancel", layer, e)
        self.gate.score(layer, experts)
        for e in self.jobs.failed(layer):
            self.table.remove(layer, e)
        missing = self.table.lookup(layer, experts, self.step)
        self.counters.accessed(layer, self.step, experts)
        for e in experts:
            if e not in missing:
                self.counters.prefetch_hit(layer, e)
                self.jobs.promote(layer, e)
        tokens = dict(zip(experts, counts))
        host = [e for e in missing if self.host_compute is not None and self.host_compute(layer, e, tokens[e])]
        self.on_host = set(host)
        for e in missing:
            if e in self.on_host:
                self._log("host", layer, e)
            elif not self._demand(layer, e):
                self._deferred.append(e)
                self._log("defer", layer, e)
        self.gate.issue(layer, predictions, self.table, self.step, self.jobs.inflight, self._issue_prefetch,
                        self._avoid, self.clock.load_s, self.clock.layer_s)
        ready = [e for e in experts if e not in missing and (layer, e) not in self.jobs]
        loading = [e for e in experts if e not in missing and (layer, e) in self.jobs]
        demand = [e for e in missing if e not in self._deferred and e not in self.on_host]
        return [(e, False) for e in ready + loading + demand + self._deferred] + [(e, True) for e in host]

    def acquire(self, layer: int, expert: int) -> tuple[int | None, LoadJob | None]:
        """Compute takes `expert` now: (its slot, the load that brought it or None for a hit), once that load has
        finished; (None, None) for an expert computed on the host. A failed load raises ExpertReadError."""
        if expert in self.on_host:
            return None, None
        self._drain_deferred(layer, expert)
        job = self.jobs.take(layer, expert)
        if job is not None:
            self.clock.loaded(job.seconds)
            if job.state == FAILED:
                self.table.remove(layer, expert)
                raise ExpertReadError(f"loading expert {expert} of layer {layer} failed: {job.error}") from None
        if expert in self._needed:
            self._needed.remove(expert)
        return self.table.slot_of[layer][expert], job

    # ---- misses and prefetches ------------------------------------------------------------------
    def _protected(self, layer: int) -> set[int]:
        return self.jobs.inflight(layer) | set(self._needed)

    def _avoid(self, layer: int) -> frozenset[int]:
        return self._upcoming.get(layer, frozenset())

    def _demand(self, layer: int, e: int) -> bool:
        placed = self.table.place(layer, e, self.step, protected=self._protected(layer), avoid=self._avoid(layer))
        if placed is None:
            return False
        self._load(layer, e, placed, DEMAND)
        return True

    def _drain_deferred(self, layer: int, expert: int) -> None:
        """More misses than free slots: place waiting misses as slots free up (computed experts, finished loads)."""
        while self._deferred:
            e = self._deferred[0]
            placed = self.table.place(layer, e, self.step, protected=self._protected(layer) - {e},
                                      avoid=self._avoid(layer))
            if placed is None:
                if e != expert:
                    return
                self._wait_for_unneeded_load(layer)       # a stale prefetch still running holds the slot
                continue
            self._deferred.pop(0)
            self._load(layer, e, placed, DEMAND)

    def _wait_for_unneeded_load(self, layer: int) -> None:
        job = self.jobs.busy_unneeded(layer, self._needed)
        if job is None:
            raise RuntimeError(f"no slot can be freed in layer {layer} (quota {self.table.quotas[layer]}); "
                               f"the expert cache bookkeeping is inconsistent")
        self.jobs.wait(job)

    def _issue_prefetch(self, target: int, e: int, placed: tuple[int, int | None], distance: int) -> None:
        self._load(target, e, placed, distance)

    def _load(self, layer: int, e: int, placed: tuple[int, int | None], priority: int) -> None:
        slot, evicted = placed
        self.jobs.evicted(layer, evicted)
        self.jobs.submit(layer, e, slot, priority)
        self._log("demand" if priority == DEMAND else "prefetch", layer, e, evicted, priority)

    def _log(self, kind: str, layer: int, e: int, *more) -> None:
        if self.events is not None:
            self.events.append((kind, self.step, layer, e, *more))
