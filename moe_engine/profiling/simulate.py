"""Offloading simulator: a routing trace through the engine's own cache code on a modelled timeline.

    trace row t (one decode token) --for each layer l-->  predictor.observe/predict (the engine's predictor objects)
        dense part of l: layer_dense_bytes / compute rate          SlotTable.lookup + place (the engine's policy)
        misses -> demand jobs (priority 0) --+                     prefetches from the forecast (priority d)
                                             v
                              Link: one queue, demand before prefetch, non-preemptive, bytes / bandwidth + latency
        experts of l computed in the engine's order (ready, loading, demand); one that is still loading
        stalls compute until its job finishes; then lm_head.

What comes from the engine: SlotTable and the eviction policy objects (experts/table.py, policies.py),
CacheCounters (hits, loads, prefetch used/wasted: experts/tracker.py), the prefetch decisions (which
predicted experts to load, the precision gate, protection of the step's prefetches:
experts/prefetch_gate.PrefetchGate, the object OffloadedExperts runs), predictors through the
ExpertPredictor protocol. What is modelled: time (hardware.py), one link with the aggregate bandwidth
of the loader threads, and the cancelling of stale queued prefetches (mirrors
OffloadedExperts._cancel_stale, a method of the provider that owns the loader's jobs).

Every trace row is one decode step (batch 1). Rows of a sequence's prompt (`prompt_len` in the trace,
when present) are replayed the same way to warm the cache but reported apart, as the engine's
decode tokens/s excludes prefill. `reset`: every sequence starts with an empty cache, as replay.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..experts.prefetch_gate import PrefetchGate
from ..experts.policies import make_policy
from ..experts.table import SlotTable
from ..experts.tracker import CacheCounters
from .belady import belady
from .hardware import Hardware
from .shapes import ModelShape
from .trace import Trace

NEEDS_HIDDEN_STATES = ("gate-lookahead", "learned")   # built-ins that cannot run from routing alone
MAX_LOOKAHEAD = 4             # the engine's default max_lookahead


@dataclass(eq=False)
class Job:
    layer: int
    expert: int
    priority: int             # 0 demand, d >= 1 prefetch d layers ahead
    order: int
    submit: float
    seconds: float
    prefetch: bool
    start: float | None = None
    finish: float | None = None
    cancelled: bool = False


class Link:
    """One transfer link: jobs by (priority, submission order), one at a time, never pre-empted."""

    def __init__(self):
        self.free_at = 0.0
        self.queue: list[Job] = []
        self.busy_seconds = 0.0

    def submit(self, job: Job) -> None:
        self.queue.append(job)

    def run_until(self, t: float) -> None:
        """Start every job whose start time is <= t (they may finish after t)."""
        while self.queue and self._next_start() <= t:
            self._run_next()

    def finish(self, job: Job) -> float:
        while job.finish is None:
            self._run_next()
        return job.finish

    def cancel(self, job: Job) -> bool:
        if job.start is not None:
            return False
        self.queue.remove(job)
        job.cancelled = True
        return True

    def _next_start(self) -> float:
        return max(self.free_at, min(j.submit for j in self.queue))

    def _run_next(self) -> None:
        start = self._next_start()
        job = min((j for j in self.queue if j.submit <= start), key=lambda j: (j.priority, j.order))
        self.queue.remove(job)
        job.start, job.finish = start, start + job.seconds
        self.free_at = job.finish
        self.busy_seconds += job.seconds


@dataclass
class SimResult:
    capacity_experts: int
    quotas: list[int]
    counters: CacheCounters
    table_hits: int
    table_misses: int
    belady_loads: int | None
    decode_tokens: int
    decode_seconds: float
    prefill_tokens: int
    prefill_seconds: float
    stall_seconds: float
    decode_stall_seconds: float
    compute_seconds: float
    link_busy_seconds: float
    expert_bytes: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        c, lookups = self.counters, self.table_hits + self.table_misses
        bel = self.belady_loads
        return {
            "cache_experts": self.capacity_experts // max(1, len(self.quotas)), "capacity_experts": self.capacity_experts,
            "loads": c.loads, "demand_loads": c.demand_loads, "hits": self.table_hits, "misses": self.table_misses,
            "hit_rate": self.table_hits / lookups if lookups else 0.0,
            "belady_loads": bel, "belady_hit_rate": None if bel is None else 1 - bel / max(1, lookups),
            "stall_seconds": self.stall_seconds, "decode_stall_seconds": self.decode_stall_seconds,
            "tokens_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0,
            "decode_tokens": self.decode_tokens, "decode_seconds": self.decode_seconds,
            "prefill_tokens": self.prefill_tokens, "prefill_seconds": self.prefill_seconds,
            "compute_seconds": self.compute_seconds, "link_busy_seconds": self.link_busy_seconds,
            "bytes_moved": c.loads * self.expert_bytes, "loads_per_token": c.loads / max(1, self.decode_tokens
                                                                                         + self.prefill_tokens),
            "prefetch": {"issued": c.prefetch_issued, "used": c.prefetch_used, "wasted": c.prefetch_wasted,
                         "precision": c.prefetch_used / c.prefetch_issued if c.prefetch_issued else 0.0,
                         "recall": c.prefetch_used / (c.prefetch_used + self.table_misses)
                         if c.prefetch_used + self.table_misses else 0.0},
            **self.extra,
        }


class Simulator:
    """One cache size: `run` replays the trace and returns a SimResult."""

    def __init__(self, trace: Trace, shape: ModelShape, hw: Hardware, quotas: list[int], policy: str = "default",
                 predictor=None, reset: bool = True, max_lookahead: int = MAX_LOOKAHEAD):
        if min(quotas) < trace.top_k:
            raise ValueError(f"per-layer cache size {min(quotas)} is below top_k={trace.top_k}")
        self.trace, self.shape, self.hw, self.quotas = trace, shape, hw, list(quotas)
        self.policy_name, self.predictor, self.reset = policy, predictor, reset
        self.max_lookahead = max_lookahead
        self.expert_s = hw.expert_s(shape.expert_bytes)
        self.load_s = hw.load_s(shape.expert_bytes)
        self.dense_s = hw.layer_overhead_s + shape.layer_dense_bytes / hw.compute_bytes_per_s
        self.head_s = hw.token_overhead_s + shape.lm_head_bytes / hw.compute_bytes_per_s

    # ---- state of one cache -----------------------------------------------------------------------
    def _new_cache(self) -> None:
        if hasattr(self, "table"):
            self.hits = [a + b for a, b in zip(self.hits, self.table.hits)]
            self.misses = [a + b for a, b in zip(self.misses, self.table.misses)]
        self.table = SlotTable(self.quotas, int(self.trace.num_experts), make_policy(self.policy_name))
        self.jobs: dict[tuple[int, int], Job] = {}
        self.gate = PrefetchGate(len(self.quotas), self.trace.top_k)   # the engine's prefetch decisions
        self.loads_per_layer = 0.0

    def run(self) -> SimResult:
        tr = self.trace
        self.counters = CacheCounters(tr.num_layers)
        self.link, self.now, self.order = Link(), 0.0, 0
        self.stall = self.compute = 0.0
        self.hits, self.misses = [0] * tr.num_layers, [0] * tr.num_layers
        self.__dict__.pop("table", None)
        prompt = self._prompt_mask()
        times = np.zeros(tr.num_steps)
        stalls = np.zeros(tr.num_steps)
        loads = np.zeros(tr.num_steps, dtype=np.int64)
        self._new_cache()
        if self.predictor is not None:
            self.predictor.bind({m: None for m in range(tr.num_layers)}, tr.top_k, int(tr.num_experts))
        for s in range(tr.num_sequences):
            if self.reset and s > 0:
                self._new_cache()
            for row in range(int(tr.seq_offsets[s]), int(tr.seq_offsets[s + 1])):
                t0, st0, l0 = self.now, self.stall, self.counters.loads
                self._token(row, s)
                times[row], stalls[row], loads[row] = self.now - t0, self.stall - st0, self.counters.loads - l0
        self._new_cache()                                 # folds the last table's counts into hits/misses
        bel = belady(tr.experts, self.quotas, tr.seq_offsets, self.reset).total_loads
        hits, misses = sum(self.hits), sum(self.misses)
        return SimResult(sum(self.quotas), self.quotas, self.counters, hits, misses, bel,
                         int((~prompt).sum()), float(times[~prompt].sum()), int(prompt.sum()),
                         float(times[prompt].sum()), self.stall, float(stalls[~prompt].sum()), self.compute,
                         self.link.busy_seconds, self.shape.expert_bytes, {"decode_loads": int(loads[~prompt].sum())})

    def _prompt_mask(self) -> np.ndarray:
        mask = np.zeros(self.trace.num_steps, dtype=bool)
        plen = self.trace.extra.get("prompt_len")
        if plen is not None and len(plen) == self.trace.num_sequences:
            for a, n in zip(self.trace.seq_offsets[:-1], plen):
                mask[int(a):int(a) + int(n)] = True
        return mask

    # ---- one token ------------------------------------------------------------------------------
    def _token(self, row: int, seq: int) -> None:
        tr = self.trace
        step = row
        self.gate.new_step()
        for layer in range(tr.num_layers):
            self._advance(self.dense_s)
            need = [int(e) for e in tr.experts[row, layer]]
            issued0 = self.order
            preds = self._forecast(row, seq, layer, need)
            order = self._prepare(layer, need, step)
            self._prefetch(layer, preds, step)
            self._compute(layer, order)
            self.loads_per_layer = 0.9 * self.loads_per_layer + 0.1 * (self.order - issued0)
        self._advance(self.head_s)

    def _advance(self, seconds: float) -> None:
        self.now += seconds
        self.compute += seconds

    def _forecast(self, row: int, seq: int, layer: int, need: list[int]) -> dict[int, torch.Tensor]:
        if self.predictor is None or not self.hw.overlap:
            return {}
        ex = torch.tensor([need], dtype=torch.long)
        w = torch.from_numpy(np.asarray(self.trace.probs[row, layer], dtype=np.float32))[None]
        tok = None if self.trace.token_ids is None else torch.tensor([int(self.trace.token_ids[row])])
        try:
            self.predictor.observe(layer, None, ex, w, tok, torch.tensor([seq]))
            return self.predictor.predict(layer, self._lookahead())
        except Exception as e:   # noqa: BLE001 - a predictor that needs hidden states cannot run from routing
            from ..errors import ConfigError
            name = getattr(self.predictor, "name", type(self.predictor).__name__)
            raise ConfigError(f"--predictor {name!r} cannot run from a routing trace ({type(e).__name__}: {e}); "
                              f"use none, oracle, or path (trained on routing only)") from None

    def _layer_s(self) -> float:
        """Modelled compute of one layer pass (what the engine's LookaheadClock measures)."""
        return self.dense_s + self.trace.top_k * self.expert_s

    def _lookahead(self) -> int:
        """The engine's rule (OffloadedExperts.lookahead) with the modelled load and layer times."""
        need = max(self.loads_per_layer, 1.0) * self.load_s
        return max(1, min(self.max_lookahead, math.ceil(need / max(self._layer_s(), 1e-9))))

    def _prepare(self, layer: int, need: list[int], step: int) -> list[int]:
        """Lookup, demand loads; returns the compute order (as OffloadedExperts.prepare)."""
        self.link.run_until(self.now)
        self._cancel_stale(layer, need)
        self.gate.score(layer, need)
        missing = self.table.lookup(layer, need, step)
        self.counters.accessed(layer, step, need)
        for e in need:
            if e not in missing:
                self.counters.prefetch_hit(layer, e)
                job = self.jobs.get((layer, e))
                if job is not None and job.start is None:
                    job.priority = 0                      # promoted to a demand load
        for e in missing:
            protected = self._inflight(layer) | set(need)
            placed = self.table.place(layer, e, step, protected=protected)
            if placed is None:
                raise RuntimeError(f"layer {layer}: every slot is held by experts of step {step}")
            self._evicted(layer, placed[1])
            self._submit(layer, e, 0)
        ready = [e for e in need if e not in missing and (layer, e) not in self.jobs]
        loading = [e for e in need if e not in missing and (layer, e) in self.jobs]
        return ready + loading + [e for e in missing]

    def _compute(self, layer: int, order: list[int]) -> None:
        for e in order:
            job = self.jobs.pop((layer, e), None)
            if job is not None:
                done = self.link.finish(job)
                if done > self.now:
                    self.stall += done - self.now
                    self.now = done
            self._advance(self.expert_s)

    def _submit(self, layer: int, e: int, priority: int) -> None:
        self.order += 1
        job = Job(layer, e, priority, self.order, self.now, self.load_s, priority != 0)
        self.counters.issued(layer, e, job.prefetch)
        self.counters.loaded(layer, self.shape.expert_bytes, 0)
        if not self.hw.overlap:                           # loads serialize with compute: done when issued
            self.stall += self.load_s
            self.now += self.load_s
            self.link.busy_seconds += self.load_s
            return
        self.jobs[(layer, e)] = job
        self.link.submit(job)

    def _evicted(self, layer: int, e: int | None) -> None:
        if e is not None:
            self.jobs.pop((layer, e), None)
            self.counters.evicted(layer, e)

    def _inflight(self, layer: int) -> set[int]:
        return {e for (lay, e), j in self.jobs.items()
                if lay == layer and (j.finish is None or j.finish > self.now)}

    def _cancel_stale(self, layer: int, need: list[int]) -> None:
        for (lay, e), job in list(self.jobs.items()):
            if lay == layer and e not in need and job.prefetch and self.link.cancel(job):
                del self.jobs[(lay, e)]
                self.table.remove(lay, e)
                self.counters.cancelled(lay, e)
                self.counters.loads -= 1                  # never moved
                self.counters.bytes_loaded -= self.shape.expert_bytes

    def _prefetch(self, layer: int, preds: dict[int, torch.Tensor], step: int) -> None:
        """OffloadedExperts._prefetch on the modelled link: the same PrefetchGate makes the decisions."""
        self.gate.issue(layer, preds, self.table, step, self._inflight, self._issue_prefetch,
                        load_s=self.load_s, layer_s=self._layer_s())

    def _issue_prefetch(self, target: int, e: int, placed: tuple[int, int | None], distance: int) -> None:
        self._evicted(target, placed[1])
        self._submit(target, e, distance)


def compute_bound_tokens_per_s(shape: ModelShape, hw: Hardware) -> float:
    """Decode tokens/s with every expert resident: no loads, no stalls."""
    layer = hw.layer_overhead_s + shape.layer_dense_bytes / hw.compute_bytes_per_s + shape.top_k * hw.expert_s(
        shape.expert_bytes)
    return 1.0 / (shape.num_layers * layer + hw.token_overhead_s + shape.lm_head_bytes / hw.compute_bytes_per_s)


def make_predictor(spec: str | None, trace: Trace, model_dir=None):
    """A fresh predictor for a replay: none, oracle (the trace itself), or any registered one that works from
    routing alone (path with trained weights: path:FILE or MODEL_DIR/predictor-path.pt)."""
    if spec in (None, "none"):
        return None
    if spec == "oracle":
        from predictors.oracle import OraclePredictor
        return OraclePredictor(trace.experts, trace.probs, trace.seq_offsets)
    from ..errors import ConfigError
    from ..runtime.plugins import resolve_predictor
    if spec.partition(":")[0] in NEEDS_HIDDEN_STATES:
        raise ConfigError(f"--predictor {spec!r} reads router inputs (hidden states), which a routing trace does not "
                          f"carry; use none, oracle, or path (trained on routing only)")
    return resolve_predictor(spec, model_dir)


def simulate(trace: Trace, shape: ModelShape, hw: Hardware, cache_sizes: list[int], policy: str = "default",
             predictor: str | None = None, reset: bool = True, model_dir=None) -> dict:
    """JSON-ready results for each per-layer cache size; the top level repeats the first size's contract keys."""
    from ..errors import ConfigError
    if shape.num_layers != trace.num_layers or shape.top_k != trace.top_k or shape.num_experts < trace.num_experts:
        raise ConfigError(f"the trace has {trace.num_layers} layers x top-{trace.top_k} over {trace.num_experts} "
                          f"experts but the model shape {shape.name!r} has {shape.num_layers} x top-{shape.top_k} "
                          f"over {shape.num_experts}; give the --model-shape / MODEL_DIR the trace was recorded with")
    if isinstance(cache_sizes, int):
        cache_sizes = [cache_sizes]
    for c in cache_sizes:
        if not trace.top_k <= c <= shape.num_experts:
            raise ConfigError(f"--cache-experts {c}: must be between top_k={trace.top_k} and the "
                              f"{shape.num_experts} experts per layer")
    trace = Trace(trace.experts, trace.probs, trace.seq_offsets, trace.token_ids, trace.extra, shape.num_experts)
    results = []
    for c in cache_sizes:
        sim = Simulator(trace, shape, hw, [int(c)] * trace.num_layers, policy, make_predictor(predictor, trace,
                                                                                            model_dir), reset)
        res = sim.run().to_dict()
        res["expert_bytes_resident"] = int(c) * trace.num_layers * shape.expert_bytes
        results.append(res)
    head = {k: results[0][k] for k in ("loads", "hit_rate", "belady_loads", "belady_hit_rate", "stall_seconds",
                                       "tokens_per_s")}
    return {**head, "policy": policy, "predictor": predictor or "none", "reset_per_sequence": reset,
            "compute_bound_tokens_per_s": compute_bound_tokens_per_s(shape, hw),
            "model": shape.to_dict(), "hardware": hw.to_dict(),
            "trace": {"tokens": trace.num_steps, "sequences": trace.num_sequences, "layers": trace.num_layers,
                      "top_k": trace.top_k, "experts": int(trace.num_experts)},
            "results": results}
