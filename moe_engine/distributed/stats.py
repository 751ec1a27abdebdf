"""Figures of an expert-parallel engine: each rank's own, and the sections of Engine.stats() over all ranks.

    rank_figures(shard, sections)   one rank's cache and IO figures (sent to rank 0 with its full sections)
    merge_sections(per_rank)        cache / prefetch / io / optimal of every rank: counts summed, rates recomputed
                                    from the sums; prediction and other ratios are rank 0's (it forecasts)
"""
from __future__ import annotations

import copy

# per section, the numbers (or per-layer lists of numbers) that add up over ranks
COUNTS = {
    "cache": ("hits", "misses", "evictions", "capacity_experts", "resident_experts", "lookups", "per_layer_hits",
              "per_layer_misses", "host_hits", "host_lookups"),
    "prefetch": ("issued", "used", "wasted", "per_layer_issued", "per_layer_used"),
    "io": ("loads", "bytes_loaded", "bytes_disk_read", "bytes_host_to_device", "stall_seconds",
           "stall_decode_seconds", "io_seconds", "io_decode_seconds"),
    "optimal": ("belady_loads", "per_layer_belady_loads"),
}


def rank_figures(shard, sections: dict) -> dict:
    """What a rank reports to rank 0: its id, device, the headline cache and IO numbers, and every section."""
    cache, io = sections.get("cache", {}), sections.get("io", {})
    return {"rank": shard.rank, "device": str(shard.device), "expert_bytes": shard.cache.nbytes(),
            "cache": {k: cache.get(k) for k in ("hits", "misses", "hit_rate", "evictions", "capacity_experts")},
            "io": {k: io.get(k) for k in ("loads", "bytes_loaded", "bytes_disk_read", "stall_seconds", "io_seconds")},
            "sections": sections}


def _add(a, b):
    if isinstance(a, list):
        return [x + y for x, y in zip(a, b)]
    return a + b


def merge_sections(per_rank: list[dict]) -> dict:
    out = copy.deepcopy(per_rank[0])
    for section, keys in COUNTS.items():
        if section not in out:
            continue
        for key in keys:
            if key in out[section]:
                for other in per_rank[1:]:
                    value = other.get(section, {}).get(key)
                    if value is not None:
                        out[section][key] = _add(out[section][key], value)
    _rates(out)
    return out


def _ratio(a, b) -> float:
    return a / b if b else 0.0


def _rates(out: dict) -> None:
    c = out.get("cache")
    if c and "hits" in c:
        c["hit_rate"] = _ratio(c["hits"], c["hits"] + c["misses"])
        if "per_layer_hits" in c:
            c["per_layer_hit_rate"] = [_ratio(h, h + m) for h, m in zip(c["per_layer_hits"], c["per_layer_misses"])]
    p = out.get("prefetch")
    if p and "issued" in p and c:
        p["precision"] = _ratio(p["used"], p["issued"])
        p["recall"] = _ratio(p["used"], p["used"] + c["misses"])
    o = out.get("optimal")
    if o and "belady_loads" in o and c:
        o["belady_hit_rate"] = 1 - _ratio(o["belady_loads"], c["lookups"]) if c.get("lookups") else 0.0
        if "per_layer_hits" in c:
            o["per_layer_belady_hit_rate"] = [1 - _ratio(b, h + m) if h + m else 0.0 for b, h, m in
                                              zip(o["per_layer_belady_loads"], c["per_layer_hits"],
                                                  c["per_layer_misses"])]
