"""Engine.stats(): the stats schema of ARCHITECTURE.md, filled from what this run measured."""
from __future__ import annotations

from .generation import Timings


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def resident_sections(provider, num_layers: int) -> dict:
    """All experts resident: every lookup is a hit and nothing is loaded after start-up."""
    lookups = sum(provider.lookups)
    per_layer = [1.0 if provider.lookups[i] else 0.0 for i in range(num_layers)]
    return {
        "cache": {"hits": lookups, "misses": 0, "hit_rate": 1.0 if lookups else 0.0,
                  "per_layer_hit_rate": per_layer, "evictions": 0,
                  "capacity_experts": provider.capacity_experts, "resident_experts": provider.capacity_experts,
                  "lookups": lookups, "per_layer_hits": list(provider.lookups), "per_layer_misses": [0] * num_layers},
        "prefetch": {"issued": 0, "used": 0, "wasted": 0, "precision": 0.0, "recall": 0.0,
                     "per_layer_issued": [0] * num_layers, "per_layer_used": [0] * num_layers,
                     "per_layer_precision": [0.0] * num_layers, "per_layer_recall": [0.0] * num_layers,
                     "by_lookahead": {}},
        "io": {"loads": 0, "bytes_loaded": 0, "bytes_disk_read": 0, "bytes_host_to_device": 0,
               "stall_seconds": 0.0, "stall_decode_seconds": 0.0, "io_seconds": 0.0, "io_decode_seconds": 0.0},
        "optimal": {"belady_loads": 0, "belady_hit_rate": 1.0 if lookups else 0.0,
                    "per_layer_belady_loads": [0] * num_layers, "per_layer_belady_hit_rate": per_layer},
    }


def build_stats(timings: Timings, provider, num_layers: int, device_budget: int | None, device_peak: int,
                host_budget: int | None, host_peak: int) -> dict:
    """The provider's cache / prefetch / io / optimal / prediction sections plus memory and latency.

    prediction: the predictor in use, its lookahead, failures, and recall@k per lookahead (overall and per
    MoE layer, see predictors/evaluate.py); {"predictor": None} when nothing predicts.
    """
    sections = provider.stats() if hasattr(provider, "stats") else resident_sections(provider, num_layers)
    return {
        "cache": sections["cache"],
        "prefetch": sections["prefetch"],
        "io": sections["io"],
        "memory": {"device_budget_bytes": device_budget or 0, "device_peak_bytes": device_peak,
                   "host_budget_bytes": host_budget or 0, "host_peak_bytes": host_peak},
        "latency": {"prefill_tokens_per_s": _rate(timings.prompt_tokens, timings.prefill_s),
                    "decode_tokens_per_s": _rate(timings.decode_tokens, timings.decode_s),
                    "ttft_s": timings.ttft_s, "tpot_s": _rate(timings.decode_s, max(timings.steps - 1, 0))},
        "optimal": sections["optimal"],
        "prediction": sections.get("prediction") or {"predictor": None},
    }
