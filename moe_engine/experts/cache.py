"""The offloading expert provider: a fixed set of compute-tier slots fed by a prefetching loader.

    MoE block --prepare(layer, experts)--> slot table lookup (policy) --misses--> demand jobs (priority 0)
              <--order (resident first)--   predictor scores of layer+1.. --> prefetch jobs (priority d)
    MoE block --get(layer, e)-->  wait on exactly e's job event  --> packed view of e's slot

Bookkeeping (which expert is where, who gets evicted) is the id-level SlotTable and its
policy; the bytes move in `work` functions run by the Loader's threads: disk -> slot with the
direct-IO reader (CPU compute), or disk -> host RAM -> device copy (GPU compute, host.py).
A failed or short read never marks an expert ready: its slot is dropped and the request that
needed it gets an ExpertReadError.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from .. import _ops
from ..errors import ExpertReadError
from .loader import DEMAND, FAILED, QUEUED, RUNNING, Loader, LoadJob
from .plan import ALIGN, Placement
from .prefetch_gate import PrefetchGate
from .table import SlotTable, expert_size
from .tracker import CacheCounters


class OffloadedExperts:
    def __init__(self, checkpoint, plan: Placement, dtype: torch.dtype, device: torch.device, policy,
                 forecaster=None, io_threads: int = 2, host=None,
                 cost_model=None, max_lookahead: int = 4):
        self.ckpt, self.dtype, self.device = checkpoint, dtype, device
        self.expert_bytes, self.slot_bytes = plan.expert_bytes, plan.slot_bytes
        self.table = SlotTable(plan.quotas, plan.num_experts, policy)
        self.storage = self._alloc(self.table.capacity * self.slot_bytes)       # [slots * slot_bytes] uint8
        self.forecaster = forecaster                      # runtime.forecast.Forecaster, or None
        self.io_threads, self.max_lookahead = io_threads, max_lookahead
        self.timing = LookaheadClock()
        self.host = host                                  # host RAM tier (GPU compute), or None
        self.cost_model = cost_model                      # hybrid execution of misses (GPU + host tier), or None
        self._on_host: set[int] = set()                   # experts of this layer pass computed on the host
        self._last_slot: int | None = None                # device slot the last get() handed to compute
        self.reader = _ops.DirectReader(num_threads=io_threads) if host is None else None
        self.direct = checkpoint.raw_is_packed(dtype)    # bytes on disk are the packed expert: read into slots
        self.staging = [] if self.direct or host is not None else \
            [_ops.alloc_aligned(plan.slot_bytes) for _ in range(io_threads)]
        self.shift = [0] * self.table.capacity            # where in its slot each expert starts (see _work)
        self.jobs: dict[tuple[int, int], LoadJob] = {}    # loads not yet consumed by compute
        self.counters = CacheCounters(len(plan.quotas), plan.quotas)
        self.step, self._layer = 0, -1
        self._needed: list[int] = []                      # experts of the current layer pass, not yet computed
        self._deferred: list[int] = []                    # misses waiting for a slot (more experts than slots)
        self._predictions: dict[int, torch.Tensor] = {}
        self.gate = PrefetchGate(len(plan.quotas), checkpoint.spec.moe.top_k)   # what to prefetch, when to evict
        self._upcoming: dict[int, frozenset[int]] = {}    # layer -> experts the next scheduled step is forecast to use
        self.loader = Loader(self._work, num_workers=io_threads)

    def _alloc(self, nbytes: int) -> torch.Tensor:
        if self.device.type == "cpu":
            return _ops.alloc_aligned(max(nbytes, 1))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)

    # ---- the ExpertProvider protocol ------------------------------------------------------
    @property
    def capacity_experts(self) -> int:
        return self.table.capacity

    def begin_step(self, token_ids: torch.Tensor, seq_ids: torch.Tensor) -> None:
        self.counters.decoding = len(seq_ids) == len(torch.unique(seq_ids))     # one token per sequence
        if self.forecaster is not None:
            self.forecaster.begin_step(token_ids, seq_ids)

    def observe(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        if self.forecaster is None:
            return
        self.forecaster.depth = self.lookahead()
        self._predictions = self.forecaster.routed(layer, router_input, experts, weights)

    def lookahead(self) -> int:
        """How many layers ahead to prefetch so loads finish just before they are needed.

        A layer's loads take (loads per layer x time per load / IO threads); a layer computes in
        `layer_s`. Prefetching d layers ahead hides the loads when d x layer_s covers their time.
        """
        t = self.timing
        if t.load_s is None or t.layer_s is None:
            return 1
        need = max(t.loads_per_layer, 1.0) * t.load_s / self.io_threads
        return max(1, min(self.max_lookahead, math.ceil(need / max(t.layer_s, 1e-6))))

    def prepare(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None) -> list[tuple[int, bool]]:
        """Look the layer's experts up, start their loads, then prefetch; returns (expert, on_host) in compute order."""
        self._note_last_use()
        if layer <= self._layer:
            self.step += 1
            self.gate.new_step()
        self.timing.layer_start(layer <= self._layer, self.counters.stall_seconds)
        self._layer = layer
        experts = list(experts)
        tokens = dict(zip(experts, counts or [1] * len(experts)))
        self._needed, self._deferred = list(experts), []
        self._cancel_stale(layer, experts)
        self.gate.score(layer, experts)
        self._drop_failed(layer)
        missing = self.table.lookup(layer, experts, self.step)
        self.counters.accessed(layer, self.step, experts)
        for e in experts:
            if e not in missing:
                self._hit(layer, e)
        self._on_host = {e for e in missing if self._compute_on_host(layer, e, tokens[e])}
        for e in missing:
            if e not in self._on_host and not self._demand(layer, e):
                self._deferred.append(e)
        self._prefetch(layer)
        ready = [e for e in experts if e not in missing and (layer, e) not in self.jobs]
        loading = [e for e in experts if e not in missing and (layer, e) in self.jobs]
        demand = [e for e in missing if e not in self._deferred and e not in self._on_host]
        return [(e, False) for e in ready + loading + demand + self._deferred] + [(e, True) for e in self._on_host]

    def _compute_on_host(self, layer: int, e: int, tokens: int) -> bool:
        """Hybrid execution: only with a host tier holding every expert (never evicted under the CPU)."""
        if self.cost_model is None or self.host is None or not self.host.holds_all:
            return False
        return self.cost_model.compute_on_host(tokens, self.ckpt.layout, self.size(layer, e))

    def _note_last_use(self) -> None:
        if self._last_slot is not None and self.host is not None:
            self.host.note_use(self._last_slot)
        self._last_slot = None

    def get(self, layer: int, expert: int) -> torch.Tensor:
        """Packed [3 I D] view of the expert's slot, once its load (if any) has finished."""
        self._note_last_use()
        if expert in self._on_host:
            return self.host.host_view(layer, expert)
        self._drain_deferred(layer, expert)
        job = self.jobs.get((layer, expert))
        if job is not None:
            self._wait(job)
            del self.jobs[(layer, expert)]
            self.timing.loaded(job.seconds)
            if job.state == FAILED:
                self.table.remove(layer, expert)
                raise ExpertReadError(f"loading expert {expert} of layer {layer} failed: {job.error}") from None
            if self.host is not None:
                self.host.wait_device(job)
        if expert in self._needed:
            self._needed.remove(expert)
        slot = self._last_slot = self.table.slot_of[layer][expert]
        start = slot * self.slot_bytes + self.shift[slot]
        return self.storage[start: start + self.size(layer, expert)].view(self.dtype)

    def size(self, layer: int, expert: int) -> int:
        return expert_size(self.ckpt, layer, expert, self.expert_bytes)

    # ---- lookups, loads, prefetches -------------------------------------------------------------
    def _hit(self, layer: int, e: int) -> None:
        self.counters.prefetch_hit(layer, e)
        job = self.jobs.get((layer, e))
        if job is not None and job.state == QUEUED:
            self.loader.promote(job)

    def _protected(self, layer: int) -> set[int]:
        return self._inflight(layer) | set(self._needed)

    def hint_upcoming(self, experts: dict[int, frozenset[int]]) -> None:
        """A batching loop's guess of the next step's experts per layer: evicted only when nothing else can be.

        Replaces the previous hint; an empty dict clears it. Changes which expert is evicted, never what is computed.
        """
        self._upcoming = dict(experts)

    def _avoid(self, layer: int) -> frozenset[int]:
        return self._upcoming.get(layer, frozenset())

    def _demand(self, layer: int, e: int) -> bool:
        placed = self.table.place(layer, e, self.step, protected=self._protected(layer), avoid=self._avoid(layer))
        if placed is None:
            return False
        self._evicted(layer, placed[1])
        self._submit(layer, e, placed[0], DEMAND)
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
            self._evicted(layer, placed[1])
            self._submit(layer, e, placed[0], DEMAND)

    def _wait_for_unneeded_load(self, layer: int) -> None:
        running = [j for (lay, e), j in self.jobs.items()
                   if lay == layer and e not in self._needed and j.state in (QUEUED, RUNNING)]
        if not running:
            raise RuntimeError(f"no slot can be freed in layer {layer} (quota {self.table.quotas[layer]}); "
                               f"the expert cache bookkeeping is inconsistent")
        self._wait(running[0])

    def _submit(self, layer: int, e: int, slot: int, priority: int) -> None:
        self.timing.issued()
        job = LoadJob(layer, e, slot, priority, prefetch=priority != DEMAND)
        self.jobs[(layer, e)] = job
        self.counters.issued(layer, e, job.prefetch, priority)
        self.loader.submit(job)

    def _evicted(self, layer: int, e: int | None) -> None:
        if e is not None:
            self.jobs.pop((layer, e), None)          # a finished load nobody used
            self.counters.evicted(layer, e)

    def _prefetch(self, layer: int) -> None:
        """Load the experts the predictor expects in the next layers (prefetch_gate.PrefetchGate decides)."""
        self.gate.issue(layer, self._predictions, self.table, self.step, self._inflight, self._issue_prefetch,
                        self._avoid, self.timing.load_s, self.timing.layer_s)
        self._predictions = {}

    def _issue_prefetch(self, target: int, e: int, placed: tuple[int, int | None], distance: int) -> None:
        self._evicted(target, placed[1])
        self._submit(target, e, placed[0], distance)

    def _inflight(self, layer: int) -> set[int]:
        """Experts of `layer` whose slot a loader thread may still write: never evicted."""
        return {e for (lay, e), j in self.jobs.items() if lay == layer and j.state in (QUEUED, RUNNING)}

    def _cancel_stale(self, layer: int, needed: Sequence[int]) -> None:
        """Queued prefetches for this layer that it does not need now are stale: drop them."""
        for (lay, e), job in list(self.jobs.items()):
            if lay == layer and e not in needed and job.prefetch and self.loader.cancel(job):
                self._forget(lay, e)

    def _drop_failed(self, layer: int) -> None:
        """Loads that failed earlier (e.g. a prefetch) leave no resident expert behind: they load again."""
        for (lay, e), job in list(self.jobs.items()):
            if lay == layer and job.state == FAILED:
                self._forget(lay, e)

    def _forget(self, layer: int, e: int) -> None:
        """A load that will never complete: its expert leaves the table and its slot is free again."""
        del self.jobs[(layer, e)]
        self.table.remove(layer, e)
        self.counters.cancelled(layer, e)

    def _wait(self, job: LoadJob) -> None:
        if job.state in (QUEUED, RUNNING):
            t0 = time.perf_counter()
            job.done.wait()
            self.counters.stall(time.perf_counter() - t0)

    # ---- the bytes: run on loader threads -------------------------------------------------------
    def _work(self, job: LoadJob, worker: int) -> None:
        t0 = time.perf_counter()
        if self.host is not None:
            self.host.load_to_device(job, self.storage, self.slot_bytes)
            n = self.size(job.layer, job.expert)
            self.counters.loaded(job.layer, n, n if self.device.type == "cuda" else 0, time.perf_counter() - t0)
            return
        start = job.slot * self.slot_bytes
        shift = self._in_place_shift(job, start)
        self.shift[job.slot] = shift
        n = self.size(job.layer, job.expert)
        dest = self.storage[start + shift: start + shift + n]
        read_expert_bytes(self.ckpt, self.reader, job.layer, job.expert, dest, self.dtype,
                          None if self.direct else self.staging[worker])
        self.counters.loaded(job.layer, n, 0, time.perf_counter() - t0)

    def _in_place_shift(self, job: LoadJob, start: int) -> int:
        """Offset within the slot that puts the expert at the same address modulo 4 KiB as its file bytes.

        Direct IO then reads straight into the slot instead of through a bounce buffer (slots have
        4 KiB of slack for this). 0 when the expert is converted or the offset would misalign the dtype.
        """
        if not self.direct or self.host is not None:
            return 0
        shift = (self.ckpt.expert_infos(job.layer, job.expert)[0].offset - start) % ALIGN
        return shift if shift % self.dtype.itemsize == 0 else 0

    # ---- stats and shutdown ---------------------------------------------------------------------
    def nbytes(self) -> int:
        return self.storage.numel() + sum(s.numel() for s in self.staging)

    def stats(self) -> dict:
        disk = (self.host or self.reader).bytes_disk_read         # the reader's own count (threads overlap)
        out = self.counters.sections(self.table, disk)
        if self.forecaster is not None:
            out["prediction"] = {**self.forecaster.stats(), **self.timing.stats(),
                                 "per_layer_precision": [round(p, 4) for p in self.gate.precision]}
        return out

    def close(self) -> None:
        self.loader.close()
        if self.reader is not None:
            self.reader.close()
        if self.host is not None:
            self.host.close()


def read_expert_bytes(ckpt, reader, layer: int, expert: int, dest: torch.Tensor, dtype: torch.dtype,
                      staging: torch.Tensor | None = None) -> None:
    """Read one expert's tensors from disk into `dest` (uint8), packed, in `dtype`.

    When the bytes on disk are not the packed buffer itself (another dtype, or a family whose
    experts are stored stacked, transposed or quantized: `ckpt.raw_is_packed`), they go to
    `staging` first and `ckpt.pack_raw` converts them into `dest`. Sizes are checked: a
    checkpoint that does not match the plan fails.
    """
    infos = ckpt.expert_infos(layer, expert)
    raw = sum(i.nbytes for i in infos)
    direct = ckpt.raw_is_packed(dtype)
    if direct and raw != dest.numel():
        raise ExpertReadError(f"expert {expert} of layer {layer} has {raw} bytes in {infos[0].path}, "
                              f"expected {dest.numel()}; the checkpoint does not match config.json")
    target = dest if direct else (staging if staging is not None and staging.numel() >= raw
                                  else torch.empty(raw, dtype=torch.uint8))
    ranges, offset = [], 0
    for info in infos:
        ranges.append(_ops.ReadRange(info.path, info.offset, info.nbytes, target, offset))
        offset += info.nbytes
    reader.read(ranges)
    if not direct:
        try:
            ckpt.pack_raw(layer, expert, target[:raw], dest, dtype)
        except (ValueError, RuntimeError) as e:
            raise ExpertReadError(f"expert {expert} of layer {layer} in {infos[0].path} cannot be converted to "
                                  f"the packed layout ({e}); the checkpoint does not match config.json") from None


class LookaheadClock:
    """Moving averages of load time, compute time per layer and loads per layer pass (for `lookahead`)."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.load_s: float | None = None          # one expert's load
        self.layer_s: float | None = None         # one layer pass, stalls excluded
        self.loads_per_layer = 0.0
        self._t0: float | None = None
        self._stall0 = 0.0
        self._issued = 0

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def layer_start(self, new_step: bool, stall_total: float) -> None:
        now = time.perf_counter()
        if self._t0 is not None and not new_step:     # the previous layer of this step just ended
            self.layer_s = self._avg(self.layer_s, max(now - self._t0 - (stall_total - self._stall0), 0.0))
        if self._t0 is not None:
            self.loads_per_layer = self._avg(self.loads_per_layer, self._issued)
        self._t0, self._stall0, self._issued = now, stall_total, 0

    def issued(self) -> None:
        self._issued += 1

    def loaded(self, seconds: float) -> None:
        if seconds > 0:
            self.load_s = self._avg(self.load_s, seconds)

    def stats(self) -> dict:
        return {"load_seconds": self.load_s or 0.0, "layer_seconds": self.layer_s or 0.0,
                "loads_per_layer": self.loads_per_layer}
