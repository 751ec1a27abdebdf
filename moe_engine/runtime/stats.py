"""Engine.stats(): the stats schema of docs/architecture.md, filled from what this run measured."""
from __future__ import annotations

import resource

import psutil

from .generation import Timings


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def host_memory() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process: psutil's RSS, and the kernel's high-water mark
    (ru_maxrss; psutil reports no peak on Linux)."""
    rss = psutil.Process().memory_info().rss
    return rss, max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def build_stats(timings: Timings, sections: dict, device_budget: int | None, device_peak: int,
                host_budget: int | None) -> dict:
    """The expert cache's cache / prefetch / io / optimal / prediction sections plus memory and latency.

    prediction: the predictor in use, its lookahead, failures, and recall@k per lookahead (overall and per
    MoE layer, see predictors/evaluate.py); {"predictor": None} when nothing predicts.
    """
    host_rss, host_peak = host_memory()
    return {
        "cache": sections["cache"],
        "prefetch": sections["prefetch"],
        "io": sections["io"],
        "memory": {"device_budget_bytes": device_budget or 0, "device_peak_bytes": device_peak,
                   "host_budget_bytes": host_budget or 0, "host_peak_bytes": host_peak, "host_rss_bytes": host_rss},
        "latency": {"prefill_tokens_per_s": _rate(timings.prompt_tokens, timings.prefill_s),
                    "decode_tokens_per_s": _rate(timings.decode_tokens, timings.decode_s),
                    "ttft_s": timings.ttft_s, "tpot_s": _rate(timings.decode_s, max(timings.steps - 1, 0))},
        "optimal": sections["optimal"],
        "prediction": sections.get("prediction") or {"predictor": None},
    }
