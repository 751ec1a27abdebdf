"""Engine.stats(): the stats schema of ARCHITECTURE.md, filled from what this run measured."""
from __future__ import annotations

from .generation import Timings


def _rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0


def build_stats(timings: Timings, sections: dict, device_budget: int | None, device_peak: int,
                host_budget: int | None, host_peak: int) -> dict:
    """The expert cache's cache / prefetch / io / optimal / prediction sections plus memory and latency.

    prediction: the predictor in use, its lookahead, failures, and recall@k per lookahead (overall and per
    MoE layer, see predictors/evaluate.py); {"predictor": None} when nothing predicts.
    """
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
