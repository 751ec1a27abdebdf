"""Prometheus metrics of one server: vLLM-style request metrics plus the engine's expert-cache counters.

    loop thread:  observe(event)            -> token counters, TTFT / TPOT / e2e histograms
    scrape:       render() -> queue gauges from EngineLoop.counters(), engine section from engine.stats()

Names follow vLLM's (`vllm:num_requests_running` ...) under the `moe_engine:` prefix. Each app has
its own registry, so several servers in one process (tests) do not share counters.
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
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """Request metrics, updated from the loop's events; engine metrics are read at each scrape."""

    def __init__(self, stats_min_interval: float = 1.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge(P + "num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting to be admitted.", registry=r)
        self.kv_reserved = Gauge(P + "kv_cache_reserved_tokens", "KV cache tokens reserved by admitted "
                                 "requests (prompt + max_tokens each).", registry=r)
        self.kv_capacity = Gauge(P + "kv_cache_capacity_tokens", "KV cache tokens the server reserves.", registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefilled prompt tokens.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", registry=r)
        self.success = Counter(P + "request_success", "Finished requests by finish reason.",
                               ["finished_reason"], registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token (from arrival).",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time per output token after the first.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=E2E_BUCKETS, registry=r)
        self.engine_collector = EngineCollector(stats_min_interval)
        r.register(self.engine_collector)
        self._counters: Callable[[], dict] | None = None
        self._kv_tokens = 0

    def attach(self, engine, loop) -> None:
        """Start reading the engine's stats and the loop's queue counters (once the model is loaded)."""
        self._counters = loop.counters
        self.kv_capacity.set(loop.kv_tokens)
        self.engine_collector.attach(engine)

    def observe(self, event) -> None:
        """One loop event (called on the loop thread; prometheus_client is thread-safe)."""
        self.generation_tokens.inc(len(event.token_ids))
        if event.finish_reason is None:
            return
        self.success.labels(event.finish_reason).inc()
        if event.completion_tokens > 0:           # prefilled (a request cancelled while waiting was not)
            self.prompt_tokens.inc(event.prompt_tokens)
        if event.ttft_s is not None:
            self.ttft.observe(event.ttft_s)
            if event.completion_tokens > 1 and event.e2e_s is not None:
                self.tpot.observe((event.e2e_s - event.ttft_s) / (event.completion_tokens - 1))
        if event.e2e_s is not None and event.finish_reason in ("stop", "length"):
            self.e2e.observe(event.e2e_s)

    def render(self) -> bytes:
        """The exposition text; refreshes the queue gauges first."""
        if self._counters is not None:
            c = self._counters()
            self.running.set(c["running"])
            self.waiting.set(c["waiting"])
            self.kv_reserved.set(c["kv_reserved"])
        return generate_latest(self.registry)


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


__all__ = ["ServerMetrics"]
