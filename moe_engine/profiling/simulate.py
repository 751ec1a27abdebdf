"""Offloading simulator: a routing trace through the engine's own cache controller on a modelled timeline.

    trace row t (one token) --for each layer l-->  predictor.observe/predict (the engine's predictor objects)
        dense part of l: layer_dense_bytes / compute rate
        CacheController.prepare (experts/controller.py: the object the live cache runs): lookup, demand loads,
            deferred misses, hybrid decisions, prefetches --> LinkTransport: one modelled link, demand before
            prefetch, non-preemptive, bytes / bandwidth + latency
        experts of l computed in the controller's order; acquire() waits for a load that is still running
        (compute stalls until it finishes); host experts take the host CPU's time; then lm_head.

The simulator is the live cache's controller with a modelled link instead of loader threads and slots,
so it makes the engine's decisions by construction (slot table, eviction policy, deferred misses,
schedule hints, the prefetch gate, stale-prefetch cancelling, the lookahead rule on modelled times,
counters); what is modelled is time (hardware.py) and one link with the aggregate bandwidth of the
loader threads. tests/test_controller.py replays one routing log through the live cache and through
this simulator and gets the same decisions step by step.

Every trace row is one decode step (batch 1). Rows of a sequence's prompt (`prompt_len` in a trace the
engine recorded, which carries token_ids) are replayed the same way to warm the cache but reported apart,
as the engine's decode tokens/s excludes prefill; a trace without token_ids holds decode rows only. `reset`: every sequence starts with an empty cache, as replay.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from predictors.oracle import OraclePredictor

from ..errors import ConfigError
from ..experts.controller import CacheController
from ..experts.loader import DONE, LoadJob
from ..experts.policies import make_policy
from ..experts.tracker import CacheCounters
from ..runtime.plugins import resolve_predictor
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


class LinkTransport:
    """The cache controller's transport in the simulator (experts/ledger.Transport): loads on one modelled link,
    time from the simulator's timeline. A load counts when submitted and is taken back if it is cancelled
    before it starts; without overlap a load holds compute for its whole time when it is issued."""

    parallelism = 1                                 # one link carries the loader threads' aggregate bandwidth

    def __init__(self, sim: "Simulator"):
        self.sim, self.link = sim, Link()
        self._jobs: dict[LoadJob, Job] = {}
        self._order = 0

    def now(self) -> float:
        return self.sim.now

    def submit(self, job: LoadJob) -> None:
        sim = self.sim
        job.seconds = sim.load_s
        sim.counters.loaded(job.layer, sim.shape.expert_bytes, 0)
        if not sim.hw.overlap:                     # loads serialize with compute: done when issued
            sim.stall += sim.load_s
            sim.now += sim.load_s
            self.link.busy_seconds += sim.load_s
            job.state = DONE
            return
        self._order += 1
        self._jobs[job] = j = Job(job.layer, job.expert, job.priority, self._order, sim.now, sim.load_s, job.prefetch)
        self.link.submit(j)

    def promote(self, job: LoadJob) -> None:
        j = self._jobs.get(job)
        if j is not None and j.start is None:
            j.priority = 0

    def cancel(self, job: LoadJob) -> bool:
        j = self._jobs.get(job)
        if j is None or not self.link.cancel(j):
            return False
        del self._jobs[job]
        self.sim.counters.loads -= 1                  # never moved
        self.sim.counters.bytes_loaded -= self.sim.shape.expert_bytes
        return True

    def busy(self, job: LoadJob) -> bool:
        j = self._jobs.get(job)
        return j is not None and (j.finish is None or j.finish > self.sim.now)

    def wait(self, job: LoadJob) -> None:
        sim, j = self.sim, self._jobs.pop(job)
        done = self.link.finish(j)
        if done > sim.now:
            sim.stall += done - sim.now
            sim.now = done
        job.state = DONE

    def sync(self) -> None:
        """Start every queued load whose start time has come (before a layer's decisions)."""
        self.link.run_until(self.sim.now)


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
    """One cache size: `run` replays the trace and returns a SimResult. events: a list to record the controller's
    decisions in (see experts/controller.py)."""

    def __init__(self, trace: Trace, shape: ModelShape, hw: Hardware, quotas: list[int], policy: str = "default",
                 predictor=None, reset: bool = True, max_lookahead: int = MAX_LOOKAHEAD, events: list | None = None):
        if min(quotas) < trace.top_k:
            raise ValueError(f"per-layer cache size {min(quotas)} is below top_k={trace.top_k}")
        self.trace, self.shape, self.hw, self.quotas = trace, shape, hw, list(quotas)
        self.policy_name, self.predictor, self.reset = policy, predictor, reset
        self.max_lookahead, self.events = max_lookahead, events
        self.expert_s = hw.expert_s(shape.expert_bytes)
        self.host_expert_s = hw.host_expert_s(shape.expert_bytes)
        self.load_s = hw.load_s(shape.expert_bytes)
        self.dense_s = hw.layer_overhead_s + shape.layer_dense_bytes / hw.compute_bytes_per_s
        self.head_s = hw.token_overhead_s + shape.lm_head_bytes / hw.compute_bytes_per_s

    # ---- state of one cache -----------------------------------------------------------------------
    def _new_cache(self) -> None:
        if self.ctl is not None:
            self.hits = [a + b for a, b in zip(self.hits, self.ctl.table.hits)]
            self.misses = [a + b for a, b in zip(self.misses, self.ctl.table.misses)]
        self.ctl = CacheController(self.quotas, int(self.trace.num_experts), make_policy(self.policy_name),
                                   self.trace.top_k, self.transport, self.counters, self._host_decision(),
                                   self.max_lookahead, self.events)

    def _host_decision(self):
        """Hybrid execution when the hardware has a host compute rate: a miss runs on the host when that is
        faster than loading it (the live cost model's rule: the host holds every expert)."""
        if self.host_expert_s is None:
            return None
        return lambda layer, e, tokens: self.hw.host_expert_s(self.shape.expert_bytes, tokens) < self.load_s

    def run(self) -> SimResult:
        tr = self.trace
        self.counters = CacheCounters(tr.num_layers)
        self.now, self.stall, self.compute = 0.0, 0.0, 0.0
        self.transport = LinkTransport(self)
        self.hits, self.misses = [0] * tr.num_layers, [0] * tr.num_layers
        self.ctl = None
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
                         self.transport.link.busy_seconds, self.shape.expert_bytes,
                         {"decode_loads": int(loads[~prompt].sum())})

    def _prompt_mask(self) -> np.ndarray:
        """Rows that fed prompt tokens. Only a trace that records one row per token fed (`moe-engine trace`: it
        carries token_ids) has them: a trace without token_ids (the GPT-OSS routing data) counts its prompt in
        prompt_len but holds decode rows only."""
        mask = np.zeros(self.trace.num_steps, dtype=bool)
        plen = self.trace.extra.get("prompt_len")
        if plen is not None and self.trace.token_ids is not None and len(plen) == self.trace.num_sequences:
            for a, n in zip(self.trace.seq_offsets[:-1], plen):
                mask[int(a):int(a) + int(n)] = True
        return mask

    # ---- one token ------------------------------------------------------------------------------
    def _token(self, row: int, seq: int) -> None:
        for layer in range(self.trace.num_layers):
            self._advance(self.dense_s)
            need = sorted({int(e) for e in self.trace.experts[row, layer]})       # as the MoE block dispatches
            preds = self._forecast(row, seq, layer)
            self.transport.sync()
            for e, on_host in self.ctl.prepare(layer, need, [1] * len(need), preds):
                self.ctl.acquire(layer, e)
                self._advance(self.host_expert_s if on_host else self.expert_s)
        self._advance(self.head_s)

    def _advance(self, seconds: float) -> None:
        self.now += seconds
        self.compute += seconds

    def _forecast(self, row: int, seq: int, layer: int) -> dict[int, torch.Tensor]:
        if self.predictor is None or not self.hw.overlap:
            return {}
        ex = torch.tensor(self.trace.experts[row, layer][None], dtype=torch.long)         # [1, K] router order
        w = torch.from_numpy(np.asarray(self.trace.probs[row, layer], dtype=np.float32))[None]
        tok = None if self.trace.token_ids is None else torch.tensor([int(self.trace.token_ids[row])])
        try:
            self.predictor.observe(layer, None, ex, w, tok, torch.tensor([seq]))
            return self.predictor.predict(layer, self.ctl.lookahead())
        except Exception as e:   # noqa: BLE001 - a predictor that needs hidden states cannot run from routing
            name = getattr(self.predictor, "name", type(self.predictor).__name__)
            raise ConfigError(f"--predictor {name!r} cannot run from a routing trace ({type(e).__name__}: {e}); "
                              f"use none, oracle, or path (trained on routing only)") from None


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
        return OraclePredictor(trace.experts, trace.probs, trace.seq_offsets)
    if spec.partition(":")[0] in NEEDS_HIDDEN_STATES:
        raise ConfigError(f"--predictor {spec!r} reads router inputs (hidden states), which a routing trace does not "
                          f"carry; use none, oracle, or path (trained on routing only)")
    return resolve_predictor(spec, model_dir)


def simulate(trace: Trace, shape: ModelShape, hw: Hardware, cache_sizes: list, policy: str = "default",
             predictor: str | None = None, reset: bool = True, model_dir=None) -> dict:
    """JSON-ready results for each cache size of the sweep: experts per layer (an int, the same in every layer) or
    a list of experts per MoE layer (the engine's plan for a --gpu-mem); the top level repeats the first size's
    contract keys."""
    if shape.num_layers != trace.num_layers or shape.top_k != trace.top_k or shape.num_experts < trace.num_experts:
        raise ConfigError(f"the trace has {trace.num_layers} layers x top-{trace.top_k} over {trace.num_experts} "
                          f"experts but the model shape {shape.name!r} has {shape.num_layers} x top-{shape.top_k} "
                          f"over {shape.num_experts}; give the --model-shape / MODEL_DIR the trace was recorded with")
    if isinstance(cache_sizes, int):
        cache_sizes = [cache_sizes]
    sweep = [[int(c)] * trace.num_layers if isinstance(c, (int, np.integer)) else [int(q) for q in c]
             for c in cache_sizes]
    for c, quotas in zip(cache_sizes, sweep):
        if len(quotas) != trace.num_layers or not trace.top_k <= min(quotas) <= max(quotas) <= shape.num_experts:
            raise ConfigError(f"--cache-experts {c}: must be between top_k={trace.top_k} and the "
                              f"{shape.num_experts} experts per layer, for each of the {trace.num_layers} MoE layers")
    trace = Trace(trace.experts, trace.probs, trace.seq_offsets, trace.token_ids, trace.extra, shape.num_experts)
    results = []
    for quotas in sweep:
        sim = Simulator(trace, shape, hw, quotas, policy, make_predictor(predictor, trace, model_dir), reset)
        res = sim.run().to_dict()
        uniform = min(quotas) == max(quotas)
        res["cache_experts"] = quotas[0] if uniform else round(sum(quotas) / len(quotas), 2)
        res["quotas"] = quotas
        res["expert_bytes_resident"] = sum(quotas) * shape.expert_bytes
        results.append(res)
    head = {k: results[0][k] for k in ("loads", "hit_rate", "belady_loads", "belady_hit_rate", "stall_seconds",
                                       "tokens_per_s")}
    return {**head, "policy": policy, "predictor": predictor or "none", "reset_per_sequence": reset,
            "compute_bound_tokens_per_s": compute_bound_tokens_per_s(shape, hw),
            "model": shape.to_dict(), "hardware": hw.to_dict(),
            "trace": {"tokens": trace.num_steps, "sequences": trace.num_sequences, "layers": trace.num_layers,
                      "top_k": trace.top_k, "experts": int(trace.num_experts)},
            "results": results}
