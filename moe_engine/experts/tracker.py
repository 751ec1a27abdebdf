"""Counters of one cache: lookups, loads, prefetch outcomes, stalls, and the routing log for Belady.

Loader threads report finished loads here, so updates take a lock. `sections` renders the
cache / prefetch / io / optimal parts of the stats schema (docs/architecture.md). Definitions: a hit is
a lookup that finds the expert in the table (resident or already being prefetched; waiting for it
counts as stall time); a load is one expert brought into the compute tier (demand or prefetch);
prefetch precision = prefetches used before eviction / issued, recall = prefetches used / (used +
demand misses), also per layer and per lookahead distance; io_seconds is the loader threads' busy time
(it overlaps compute); `optimal` is Belady's minimum loads for the logged routing at the same quotas.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Sequence


LOG_WINDOW = 8192     # steps of routing kept per layer for Belady when quotas are known (see CacheCounters)


class CacheCounters:
    """With `quotas` (the cache's slots per layer) the routing log stays bounded for long-running servers:
    every LOG_WINDOW steps a layer's log is folded into a running Belady total and dropped. Each window then
    starts from an empty cache, so `optimal` may exceed the true minimum by at most the layer's quota per
    window (under 0.1% of a layer's lookups at LOG_WINDOW steps)."""

    def __init__(self, num_layers: int, quotas: Sequence[int] | None = None):
        self._lock = threading.Lock()
        self.num_layers = num_layers
        self.quotas = list(quotas) if quotas is not None else None
        self._belady_folded = [0] * num_layers                # Belady loads of the dropped windows
        self.prefetch_issued = self.prefetch_used = self.prefetch_wasted = 0
        self.demand_loads = 0
        self.loads = self.bytes_loaded = self.bytes_h2d = 0
        self.stall_seconds = 0.0
        self.stall_decode_seconds = 0.0             # the part spent in decode steps (one token per sequence)
        self.io_seconds = self.io_decode_seconds = 0.0    # loader busy time (overlaps compute), all / in decode
        self.decoding = False                       # set at each step by the cache's PredictorFeed
        self._unused: dict[tuple[int, int], int] = {}         # prefetched, not yet needed -> lookahead distance
        self.issued_at: Counter[tuple[int, int]] = Counter()  # (layer, distance) -> prefetches issued
        self.used_at: Counter[tuple[int, int]] = Counter()    # (layer, distance) -> prefetches used
        self.log: list[list[list[int]]] = [[] for _ in range(num_layers)]   # layer -> steps -> experts

    def accessed(self, layer: int, step: int, experts) -> None:
        log = self.log[layer]
        log.append(sorted(experts))
        if self.quotas is not None and len(log) >= LOG_WINDOW:
            self._belady_folded[layer] += belady_loads(log, self.quotas[layer])
            self.log[layer] = []

    def issued(self, layer: int, e: int, prefetch: bool, distance: int = 1) -> None:
        """A load of `e` for `layer` was queued: a demand, or a prefetch `distance` MoE layers ahead."""
        if prefetch:
            self.prefetch_issued += 1
            self.issued_at[layer, distance] += 1
            self._unused[layer, e] = distance
        else:
            self.demand_loads += 1

    def prefetch_hit(self, layer: int, e: int) -> None:
        distance = self._unused.pop((layer, e), None)
        if distance is not None:
            self.prefetch_used += 1
            self.used_at[layer, distance] += 1

    def evicted(self, layer: int, e: int) -> None:
        if self._unused.pop((layer, e), None) is not None:
            self.prefetch_wasted += 1

    def cancelled(self, layer: int, e: int) -> None:
        self.evicted(layer, e)

    def loaded(self, layer: int, nbytes: int, h2d_bytes: int, seconds: float = 0.0) -> None:
        with self._lock:
            self.loads += 1
            self.bytes_loaded += nbytes
            self.bytes_h2d += h2d_bytes
            self.io_seconds += seconds
            if self.decoding:
                self.io_decode_seconds += seconds

    def stall(self, seconds: float) -> None:
        self.stall_seconds += seconds
        if self.decoding:
            self.stall_decode_seconds += seconds

    def sections(self, table, bytes_disk_read: int) -> dict:
        hits, misses = sum(table.hits), sum(table.misses)
        per_layer = [h / (h + m) if h + m else 0.0 for h, m in zip(table.hits, table.misses)]
        issued, used = self.prefetch_issued, self.prefetch_used
        logs = [list(steps) for steps in self.log]      # a copy: the serving loop may append while we read
        per_layer_belady = [self._belady_folded[i] + (belady_loads(logs[i], table.quotas[i]) if logs[i] else 0)
                            for i in range(self.num_layers)]
        belady = sum(per_layer_belady)
        lookups = hits + misses
        return {
            "cache": {"hits": hits, "misses": misses, "hit_rate": hits / lookups if lookups else 0.0,
                      "per_layer_hit_rate": per_layer, "evictions": table.evictions,
                      "capacity_experts": table.capacity, "resident_experts": table.resident,
                      "lookups": lookups, "per_layer_hits": list(table.hits), "per_layer_misses": list(table.misses)},
            "prefetch": {"issued": issued, "used": used, "wasted": self.prefetch_wasted,
                         "precision": used / issued if issued else 0.0,
                         "recall": used / (used + misses) if used + misses else 0.0,
                         **self._prefetch_breakdown(table.misses)},
            "io": {"loads": self.loads, "bytes_loaded": self.bytes_loaded, "bytes_disk_read": bytes_disk_read,
                   "bytes_host_to_device": self.bytes_h2d, "stall_seconds": self.stall_seconds,
                   "stall_decode_seconds": self.stall_decode_seconds, "io_seconds": self.io_seconds,
                   "io_decode_seconds": self.io_decode_seconds},
            "optimal": {"belady_loads": belady, "belady_hit_rate": 1 - belady / lookups if lookups else 0.0,
                        "per_layer_belady_loads": per_layer_belady,
                        "per_layer_belady_hit_rate": [1 - b / (h + m) if h + m else 0.0 for b, h, m in
                                                      zip(per_layer_belady, table.hits, table.misses)]},
        }


    def _prefetch_breakdown(self, misses: Sequence[int]) -> dict:
        """Prefetch counts, precision and recall per layer [L], and per lookahead distance {"d": {...}}."""
        issued_at, used_at = Counter(self.issued_at), Counter(self.used_at)     # copies (see sections)
        iss = [sum(n for (lay, _), n in issued_at.items() if lay == i) for i in range(self.num_layers)]
        use = [sum(n for (lay, _), n in used_at.items() if lay == i) for i in range(self.num_layers)]
        by_d = {}
        for d in sorted({d for _, d in issued_at}):
            n_iss = sum(n for (_, dd), n in issued_at.items() if dd == d)
            n_use = sum(n for (_, dd), n in used_at.items() if dd == d)
            by_d[str(d)] = {"issued": n_iss, "used": n_use, "precision": n_use / n_iss if n_iss else 0.0}
        return {"per_layer_issued": iss, "per_layer_used": use,
                "per_layer_precision": [u / i if i else 0.0 for u, i in zip(use, iss)],
                "per_layer_recall": [u / (u + m) if u + m else 0.0 for u, m in zip(use, misses)],
                "by_lookahead": by_d}


def belady_loads(steps: Sequence[Sequence[int]], capacity: int) -> int:
    """Belady's minimum loads for one layer's recorded steps (each a list of experts used at once).

    A step's experts are never evicted for each other, except when a recorded step (a prefill)
    needs more experts than the layer has slots: then, as the cache does, an expert already
    computed this step may be evicted for one still to come. Victim: the evictable resident whose next use is farthest.
    """
    if capacity <= 0:
        return sum(len(s) for s in steps)
    uses: dict[int, list[int]] = {}
    for t, need in enumerate(steps):
        for e in need:
            uses.setdefault(e, []).append(t)

    def next_use(e: int, t: int) -> int:
        u = uses[e]
        i = bisect.bisect_right(u, t)
        return u[i] if i < len(u) else len(steps)

    resident: set[int] = set()
    loads = 0
    for t, need in enumerate(steps):
        if len(need) > capacity:      # as the cache computes them: resident experts first, then the misses
            need = [e for e in need if e in resident] + [e for e in need if e not in resident]
        for i, e in enumerate(need):
            if e in resident:
                continue
            loads += 1
            if len(resident) >= capacity:
                to_come = set(need) if len(need) <= capacity else set(need[i:])
                victims = [r for r in resident if r not in to_come]
                resident.remove(max(victims, key=lambda r: (next_use(r, t), r)))
            resident.add(e)
    return loads
