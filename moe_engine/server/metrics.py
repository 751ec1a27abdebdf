"""Prometheus metrics of one server: vLLM's request and scheduler metrics plus the engine's expert-cache counters.

    loop thread:  observe(event)            -> per-token gaps; on a request's last event: success counter,
                                               TTFT / queue / prefill / decode / e2e histograms, lengths
                  observe_step(prompt, gen) -> prompt / generation token counters, tokens per iteration
    scrape:       render() -> queue and KV gauges from EngineLoop.counters(), engine section from engine.stats()

The vLLM metrics (VLLM_METRICS) carry vLLM's names and labels (model_name = the served name, engine = "0")
under `prefix` (`moe_engine` by default; `vllm` gives exactly vLLM's names, so its Grafana dashboards read
them unchanged). Each is measured: what this server does not do (swapping, preemption, prefix caching, a
CPU KV cache, LoRA) is left out rather than reported as zero. Speculative decoding's counters (SPEC_METRICS:
drafts, drafted tokens, accepted tokens, read from the loop's counters at each scrape) are there only when the
server runs with --speculative-config. The engine's own
metrics (expert cache, IO, prefetch) and the KV reserve in tokens are always under `moe_engine:`. Each app
has its own registry, so several servers in one process (tests) do not share counters.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("moe_engine.server")
P = "moe_engine:"
PREFIXES = ("moe_engine", "vllm")
LABELS = ("model_name", "engine")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's metric names (without the prefix) that this server produces; sample names add _total / _bucket ...
VLLM_METRICS = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "gpu_cache_usage_perc",
                "prompt_tokens", "generation_tokens", "request_success", "iteration_tokens_total",
                "time_to_first_token_seconds", "inter_token_latency_seconds", "time_per_output_token_seconds",
                "request_time_per_output_token_seconds", "e2e_request_latency_seconds",
                "request_queue_time_seconds", "request_inference_time_seconds", "request_prefill_time_seconds",
                "request_decode_time_seconds", "request_prompt_tokens", "request_generation_tokens")
# vLLM's speculative decoding counters (sample names add _total), with the loop's counter each reads
SPEC_METRICS = {"spec_decode_num_drafts": ("spec_drafts", "Sequences' verify steps that checked a draft."),
                "spec_decode_num_draft_tokens": ("spec_draft_tokens", "Drafted tokens verified."),
                "spec_decode_num_accepted_tokens": ("spec_accepted_tokens", "Drafted tokens kept.")}


def token_buckets(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50 ... up to `limit` (vLLM's buckets for token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


class ServerMetrics:
    """Request metrics, updated from the loop's events and steps; engine metrics are read at each scrape."""

    def __init__(self, prefix: str = "moe_engine", stats_min_interval: float = 1.0):
        if prefix not in PREFIXES:
            raise ValueError(f"metrics prefix {prefix!r}: use one of {', '.join(PREFIXES)}")
        self.prefix = prefix + ":"
        self.registry = CollectorRegistry()
        self._labels: tuple[str, str] | None = None
        self.running = self._gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = self._gauge("num_requests_waiting", "Requests waiting to be admitted.")
        self.kv_usage = self._gauge("kv_cache_usage_perc", "Fraction of the KV cache reserve held by admitted "
                                    "requests (prompt + max_tokens each); 1 means all of it.")
        self.gpu_kv_usage = self._gauge("gpu_cache_usage_perc", "Older vLLM name of kv_cache_usage_perc (same value).")
        self.prompt_tokens = self._counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = self._counter("generation_tokens", "Generated tokens.")
        self.iteration_tokens = self._histogram("iteration_tokens_total", "Prompt and generated tokens per loop "
                                                "iteration (a prefill and a decode step).", ITERATION_BUCKETS)
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token (from arrival).",
                                    TTFT_BUCKETS)
        self.itl = self._histogram("inter_token_latency_seconds", "Seconds between two tokens of a request.",
                                   TPOT_BUCKETS)
        self.tpot = self._histogram("time_per_output_token_seconds", "Older vLLM name of "
                                    "inter_token_latency_seconds (same observations).", TPOT_BUCKETS)
        self.request_tpot = self._histogram("request_time_per_output_token_seconds", "Mean time per output token "
                                            "after the first, per request.", TPOT_BUCKETS)
        self.e2e = self._histogram("e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS)
        self.queue = self._histogram("request_queue_time_seconds", "Seconds from arrival to admission.", E2E_BUCKETS)
        self.inference = self._histogram("request_inference_time_seconds", "Seconds from admission to the last "
                                         "token.", E2E_BUCKETS)
        self.prefill = self._histogram("request_prefill_time_seconds", "Seconds from admission to the first token.",
                                       E2E_BUCKETS)
        self.decode = self._histogram("request_decode_time_seconds", "Seconds from the first to the last token.",
                                      E2E_BUCKETS)
        self.success = Counter(self.prefix + "request_success", "Finished requests by finish reason.",
                               [*LABELS, "finished_reason"], registry=self.registry)
        self.kv_reserved = Gauge(P + "kv_cache_reserved_tokens", "KV cache tokens reserved by admitted "
                                 "requests (prompt + max_tokens each).", registry=self.registry)
        self.kv_capacity = Gauge(P + "kv_cache_capacity_tokens", "KV cache tokens the server reserves.",
                                 registry=self.registry)
        self.request_prompt = self.request_generation = None      # their buckets depend on the context (attach)
        self.engine_collector = EngineCollector(stats_min_interval)
        self.registry.register(self.engine_collector)
        self._counters: Callable[[], dict] | None = None
        self._kv_tokens = 0

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(self.prefix + name, doc, LABELS, registry=self.registry)

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(self.prefix + name, doc, LABELS, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets) -> Histogram:
        return Histogram(self.prefix + name, doc, LABELS, buckets=buckets, registry=self.registry)

    def attach(self, engine, loop, model_name: str, max_model_len: int) -> None:
        """Start reading the engine's stats and the loop's counters and steps (once the model is loaded)."""
        self._labels = (model_name, "0")
        buckets = token_buckets(max_model_len)
        self.request_prompt = self._histogram("request_prompt_tokens", "Prompt tokens per request.", buckets)
        self.request_generation = self._histogram("request_generation_tokens", "Generated tokens per request.",
                                                  buckets)
        for metric in self._labelled():           # every series exists (at zero) before the first request
            self._m(metric)
        for reason in FINISH_REASONS:
            self.success.labels(*self._labels, reason)
        self._kv_tokens = loop.kv_tokens
        self.kv_capacity.set(loop.kv_tokens)
        self.engine_collector.attach(engine)
        self._counters = loop.counters
        if "spec_drafts" in loop.counters():                  # --speculative-config: the loop verifies drafts
            self.registry.register(SpecCollector(self.prefix, self._labels, loop.counters))
        loop.on_step = self.observe_step

    def _labelled(self) -> list:
        return [self.running, self.waiting, self.kv_usage, self.gpu_kv_usage, self.prompt_tokens,
                self.generation_tokens, self.iteration_tokens, self.ttft, self.itl, self.tpot, self.request_tpot,
                self.e2e, self.queue, self.inference, self.prefill, self.decode, self.request_prompt,
                self.request_generation]

    def _m(self, metric):
        return metric.labels(*self._labels)

    def observe_step(self, prompt_tokens: int, generated_tokens: int) -> None:
        """One loop iteration: the prompt tokens it prefilled and the tokens it generated (loop thread)."""
        self._m(self.prompt_tokens).inc(prompt_tokens)
        self._m(self.generation_tokens).inc(generated_tokens)
        self._m(self.iteration_tokens).observe(prompt_tokens + generated_tokens)

    def observe(self, event) -> None:
        """One loop event (called on the loop thread; prometheus_client is thread-safe)."""
        if self._labels is None:
            return
        for gap in event.itl_s:
            self._m(self.itl).observe(gap)
            self._m(self.tpot).observe(gap)
        if event.finish_reason is None:
            return
        self.success.labels(*self._labels, event.finish_reason).inc()
        if event.finish_reason not in ("stop", "length"):       # aborted or failed: no complete timeline
            return
        self._observe_finished(event)

    def _observe_finished(self, ev) -> None:
        m = self._m
        m(self.e2e).observe(ev.e2e_s)
        m(self.ttft).observe(ev.ttft_s)
        m(self.queue).observe(ev.queue_s)
        m(self.prefill).observe(ev.ttft_s - ev.queue_s)
        m(self.inference).observe(ev.e2e_s - ev.queue_s)
        m(self.decode).observe(ev.e2e_s - ev.ttft_s)
        if ev.completion_tokens > 1:
            m(self.request_tpot).observe((ev.e2e_s - ev.ttft_s) / (ev.completion_tokens - 1))
        m(self.request_prompt).observe(ev.prompt_tokens)
        m(self.request_generation).observe(ev.completion_tokens)

    def render(self) -> bytes:
        """The exposition text; refreshes the queue and KV gauges first."""
        if self._counters is not None:
            c = self._counters()
            self._m(self.running).set(c["running"])
            self._m(self.waiting).set(c["waiting"])
            usage = c["kv_reserved"] / self._kv_tokens if self._kv_tokens else 0.0
            self._m(self.kv_usage).set(usage)
            self._m(self.gpu_kv_usage).set(usage)
            self.kv_reserved.set(c["kv_reserved"])
        return generate_latest(self.registry)


class SpecCollector:
    """The serving loop's speculative decoding counters under vLLM's names (SPEC_METRICS)."""

    def __init__(self, prefix: str, labels: tuple[str, str], counters: Callable[[], dict]):
        self.prefix, self.labels, self.counters = prefix, labels, counters

    def describe(self):
        return []

    def collect(self):
        c = self.counters()
        for name, (key, doc) in SPEC_METRICS.items():
            family = CounterMetricFamily(self.prefix + name, doc, labels=list(LABELS))
            family.add_metric(list(self.labels), c[key])
            yield family


class EngineCollector:
    """engine.stats() as Prometheus families; stats are re-read at most every `min_interval` seconds."""

    def __init__(self, min_interval: float):
        self.engine = None
        self.min_interval = min_interval
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None

    def attach(self, engine) -> None:
        self.engine = engine

    def _stats(self) -> dict | None:
        if self.engine is None:
            return None
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.min_interval:
                try:
                    self._cached = (now, self.engine.stats())
                except Exception:   # noqa: BLE001 -- stats read while the loop runs; keep serving the last ones
                    log.warning("engine.stats() failed during a scrape; serving the previous values", exc_info=True)
                    if self._cached is None:
                        return None
            return self._cached[1]

    def describe(self):
        return []           # families depend on whether the model is loaded; skip the registry's dry run

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        yield from _cache_families(stats["cache"])
        yield from _io_families(stats["io"], stats["prefetch"])
        if "expert_parallel" in stats:
            yield from _rank_families(stats["expert_parallel"])


def _cache_families(cache: dict) -> list:
    hits = CounterMetricFamily(P + "expert_cache_hits", "Expert lookups that found the expert in the tier.",
                               labels=["tier"])
    lookups = CounterMetricFamily(P + "expert_cache_lookups", "Expert lookups per tier.", labels=["tier"])
    hits.add_metric(["compute"], cache["hits"])
    lookups.add_metric(["compute"], cache["hits"] + cache["misses"])
    if "host_lookups" in cache:          # the host tier's own lookups (GPU compute with a --cpu-mem tier)
        hits.add_metric(["host"], cache["host_hits"])
        lookups.add_metric(["host"], cache["host_lookups"])
    evictions = CounterMetricFamily(P + "expert_cache_evictions", "Experts evicted from the compute tier.",
                                    value=cache["evictions"])
    capacity = GaugeMetricFamily(P + "expert_cache_capacity_experts", "Expert slots of the compute tier.",
                                 value=cache["capacity_experts"])
    resident = GaugeMetricFamily(P + "expert_cache_resident_experts", "Experts resident in the compute tier.",
                                 value=cache["resident_experts"])
    return [hits, lookups, evictions, capacity, resident]


def _io_families(io: dict, prefetch: dict) -> list:
    loads = CounterMetricFamily(P + "expert_loads", "Experts brought into the compute tier (demand or prefetch).",
                                value=io["loads"])
    moved = CounterMetricFamily(P + "expert_bytes_moved", "Expert bytes moved, by transfer.", labels=["transfer"])
    moved.add_metric(["disk_read"], io["bytes_disk_read"])
    moved.add_metric(["host_to_device"], io["bytes_host_to_device"])
    stall = CounterMetricFamily(P + "expert_stall_seconds", "Seconds compute waited for experts.",
                                value=io["stall_seconds"])
    issued = CounterMetricFamily(P + "expert_prefetch_issued", "Expert prefetches issued.", value=prefetch["issued"])
    used = CounterMetricFamily(P + "expert_prefetch_used", "Prefetched experts used before eviction.",
                               value=prefetch["used"])
    return [loads, moved, stall, issued, used]


def _rank_families(ep: dict) -> list:
    """An expert-parallel engine (--expert-parallel): each rank's cache and IO, labelled rank, and the time in
    collectives (the families above sum the ranks)."""
    rank_families = [
        (CounterMetricFamily, "rank_expert_cache_hits", "Expert lookups that hit, per rank.", "cache", "hits"),
        (CounterMetricFamily, "rank_expert_cache_misses", "Expert lookups that missed, per rank.", "cache", "misses"),
        (CounterMetricFamily, "rank_expert_loads", "Experts loaded into a rank's compute tier.", "io", "loads"),
        (CounterMetricFamily, "rank_expert_bytes_disk_read", "Expert bytes a rank read from disk.", "io",
         "bytes_disk_read"),
        (CounterMetricFamily, "rank_expert_stall_seconds", "Seconds a rank's compute waited for experts.", "io",
         "stall_seconds"),
    ]
    out = []
    for kind, name, doc, section, key in rank_families:
        family = kind(P + name, doc, labels=["rank"])
        for r in ep["ranks"]:
            family.add_metric([str(r["rank"])], r[section][key] or 0)
        out.append(family)
    out.append(GaugeMetricFamily(P + "expert_parallel_ranks", "Ranks sharing the routed experts.",
                                 value=ep["world_size"]))
    out.append(CounterMetricFamily(P + "expert_parallel_comm_seconds", "Seconds rank 0 spent in collectives with "
                                   "the other ranks (broadcast and all_reduce of MoE layers).", value=ep["comm_seconds"]))
    out.append(GaugeMetricFamily(P + "expert_parallel_comm_seconds_per_step", "Collective seconds per forward "
                                 "step, over the engine's life.", value=ep["comm_seconds_per_step"]))
    return out


__all__ = ["PREFIXES", "SPEC_METRICS", "VLLM_METRICS", "ServerMetrics"]
