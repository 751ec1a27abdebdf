"""The offloading expert cache: a fixed set of compute-tier slots fed by a prefetching loader.

    MoE block --fetch(layer, experts, counts)--> controller.prepare: lookup, demand loads, prefetches
              <--LayerFetch (compute order)--    (predictions: the predictor's forecast from observe())
              --taking expert e-->               controller.acquire: wait on exactly e's load --> e's slot

    OffloadedExperts = CacheController (controller.py: every decision, over ids)
                     + Loader (loader.py: IO threads, the controller's transport)
                     + SlotStorage (storage.py: the slots and the disk -> slot / host -> device work)
                     + PredictorFeed (its routing observer: begin_step / observe drive the Forecaster)

It is both faces of experts/ (see __init__.py): the model's ExpertSource and the runtime's view of a
cache (hints, residency, stats). A failed or short read never marks an expert ready: its slot is
dropped and the request that needed it gets an ExpertReadError.
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from ..model.experts import LayerFetch
from .controller import CacheController
from .loader import FAILED, Loader, LoadJob
from .plan import Placement
from .storage import SlotStorage
from .tracker import CacheCounters


class OffloadedExperts:
    buffers_stable = False      # a slot may be reused for the next expert of the same layer pass
    evicts = True

    def __init__(self, checkpoint, plan: Placement, dtype: torch.dtype, device: torch.device, policy,
                 forecaster=None, io_threads: int = 2, host=None, cost_model=None, max_lookahead: int = 4,
                 clock: Callable[[], float] = time.perf_counter, events: list | None = None):
        self.storage = SlotStorage(checkpoint, plan, dtype, device, io_threads, host)
        self.host, self.cost_model, self.layout = host, cost_model, checkpoint.layout
        self.counters = CacheCounters(len(plan.quotas), plan.quotas)
        self.loader = Loader(self._work, num_workers=io_threads, clock=clock)
        host_compute = self._compute_on_host if host is not None and cost_model is not None else None
        self.controller = CacheController(plan.quotas, plan.num_experts, policy, checkpoint.spec.moe.top_k,
                                          self.loader, self.counters, host_compute, max_lookahead, events)
        self.observer = PredictorFeed(forecaster, self.controller, self.counters)   # registered first at build
        self._last_slot: int | None = None                # device slot the last buffer handed to compute
        self._peeking = False                             # drafting reads ready slots without a lookup (peeking)

    # ---- the model's ExpertSource ---------------------------------------------------------------
    def fetch(self, layer: int, experts: Sequence[int], counts: Sequence[int]) -> LayerFetch:
        if self._peeking:
            return LayerFetch([(e, False) for e in experts], functools.partial(self._peek, layer))
        self._note_last_use()
        order = self.controller.prepare(layer, experts, counts, self.observer.take())
        return LayerFetch(order, functools.partial(self._get, layer))

    def _get(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's packed buffer once its load (if any) has finished: its slot, or host RAM when on_host."""
        self._note_last_use()
        slot, job = self.controller.acquire(layer, expert)
        if slot is None:
            return self.host.host_view(layer, expert)
        if job is not None and self.host is not None:
            self.host.wait_device(job)
        self._last_slot = slot
        return self.storage.view(layer, expert, slot)

    def _note_last_use(self) -> None:
        if self._last_slot is not None and self.host is not None:
            self.host.note_use(self._last_slot)
        self._last_slot = None

    def _compute_on_host(self, layer: int, e: int, tokens: int) -> bool:
        """Hybrid execution: only with a host tier holding every expert (never evicted under the CPU)."""
        return self.host.holds_all and self.cost_model.compute_on_host(tokens, self.layout,
                                                                       self.storage.size(layer, e))

    # ---- the runtime's view ---------------------------------------------------------------------
    @property
    def quotas(self) -> list[int]:
        return list(self.controller.table.quotas)

    @property
    def capacity_experts(self) -> int:
        return self.controller.table.capacity

    @property
    def policy_name(self) -> str:
        return self.controller.table.policy.name

    def residents(self, layer: int) -> frozenset[int]:
        return frozenset(self.controller.table.resident_experts(layer))

    def hint_upcoming(self, experts: dict[int, frozenset[int]]) -> None:
        """The experts the next scheduled step is forecast to use, per layer: evicted last (see the controller)."""
        self.controller.hint_upcoming(experts)

    # ---- speculative drafting (runtime/drafting.py) ---------------------------------------------
    def ready(self, layer: int) -> frozenset[int]:
        """Resident experts of `layer` that no load is writing or about to hand over: readable as they are."""
        ctl = self.controller
        return frozenset(e for e in ctl.table.resident_experts(layer) if self._readable(layer, e))

    def _readable(self, layer: int, e: int) -> bool:
        job = self.controller.jobs.get(layer, e)
        return job is None or (not self.loader.busy(job) and job.state != FAILED)

    @contextlib.contextmanager
    def peeking(self):
        """While it is open, fetch() hands out ready experts' slots as they are: no lookup, load, counter or policy
        update (a cache-restricted draft routes only among ready() experts, so it must not count as use). Asking for
        an expert that is not ready raises: the caller's mask was stale."""
        self._peeking = True
        try:
            yield self
        finally:
            self._peeking = False

    def _peek(self, layer: int, expert: int) -> torch.Tensor:
        ctl = self.controller
        slot = ctl.table.slot_of[layer].get(expert)
        if slot is None or not self._readable(layer, expert):
            raise RuntimeError(f"a cache-restricted draft read expert {expert} of layer {layer}, which is not ready "
                               f"in the expert cache (its routing mask is stale)")
        job = ctl.jobs.get(layer, expert)
        if job is not None and self.host is not None:       # a finished prefetch: its host -> device copy too
            self.host.wait_device(job)
        return self.storage.view(layer, expert, slot)

    def prefetch(self, experts: dict[int, Iterable[int]], keep: dict[int, Iterable[int]] | None = None) -> int:
        """Start loading experts a coming step is forecast to use ({layer: experts}; a speculative verify step's,
        forecast from its drafted tokens), never evicting `keep`; returns the loads started (see
        CacheController.prefetch_forecast)."""
        return self.controller.prefetch_forecast(experts, keep)

    @property
    def load_seconds(self) -> float | None:
        """Link time one expert load costs, the loaders' parallelism shared out (measured; None before any load)."""
        ctl = self.controller
        return None if ctl.clock.load_s is None else ctl.clock.load_s / max(1, ctl.parallelism)

    def nbytes(self) -> int:
        return self.storage.nbytes()

    def stats(self) -> dict:
        ctl = self.controller
        out = self.counters.sections(ctl.table, self.storage.bytes_disk_read)
        if self.host is not None:       # the host tier's own lookups (GPU compute with a --cpu-mem tier)
            out["cache"]["host_hits"] = sum(self.host.table.hits)
            out["cache"]["host_lookups"] = sum(self.host.table.hits) + sum(self.host.table.misses)
        forecaster = self.observer.forecaster
        if forecaster is not None:
            out["prediction"] = {**forecaster.stats(), **ctl.clock.stats(),
                                 "per_layer_precision": [round(p, 4) for p in ctl.gate.precision]}
        return out

    def close(self) -> None:
        self.loader.close()
        self.storage.close()

    # ---- the bytes: run on loader threads -------------------------------------------------------
    def _work(self, job: LoadJob, worker: int) -> None:
        t0 = self.loader.now()
        nbytes, h2d = self.storage.load(job, worker)
        self.counters.loaded(job.layer, nbytes, h2d, self.loader.now() - t0)


class PredictorFeed:
    """The cache's routing observer: counts whether a step decodes (one token per sequence) and feeds the
    predictor (runtime.forecast.Forecaster, or None) each layer's routing, asking it `lookahead` layers ahead;
    the forecast waits for that layer's fetch (take)."""

    def __init__(self, forecaster, controller: CacheController, counters: CacheCounters):
        self.forecaster, self.controller, self.counters = forecaster, controller, counters
        self._predictions: dict[int, torch.Tensor] = {}

    def begin_step(self, token_ids: torch.Tensor, seq_ids: torch.Tensor) -> None:
        self.counters.decoding = len(seq_ids) == len(torch.unique(seq_ids))
        if self.forecaster is not None:
            self.forecaster.begin_step(token_ids, seq_ids)

    def observe(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        if self.forecaster is None:
            return
        self.forecaster.depth = self.controller.lookahead()
        self._predictions = self.forecaster.routed(layer, router_input, experts, weights)

    def take(self) -> dict[int, torch.Tensor]:
        """The forecast made from the layer just routed ({later layer: scores [N, E]}), once."""
        out, self._predictions = self._predictions, {}
        return out
