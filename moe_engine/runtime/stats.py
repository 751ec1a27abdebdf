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


class SpeculationCount:
    """Engine.stats()'s "speculation" section of one call: the drafter's counts, plus what the drafts earned.

    steps(it) passes a driver's steps through (each: every sequence's new tokens; the first step is the prefill's
    first tokens) and counts decode rows (a sequence in a verify step) and the tokens they emitted; report() adds
    tokens_per_step (emitted tokens per sequence per verify step: 1.0 is plain decoding) and loads_per_token
    (expert loads of the whole call, drafts' steps included, per generated token)."""

    def __init__(self, experts, drafter):
        self.experts, self.drafter = experts, drafter
        self.loads_before = experts.stats()["io"]["loads"] if drafter is not None else 0
        self.rows = self.tokens = 0

    def steps(self, steps):
        for i, step in enumerate(steps):
            if i > 0:
                self.rows += sum(1 for new in step if new)
                self.tokens += sum(len(new) for new in step)
            yield step

    def report(self, generated: int) -> dict | None:
        """generated: the call's generated tokens (first tokens included). None without a drafter."""
        if self.drafter is None:
            return None
        out = self.drafter.stats()
        loads = self.experts.stats()["io"]["loads"] - self.loads_before
        out.update(decode_rows=self.rows, decode_tokens=self.tokens,
                   tokens_per_step=self.tokens / self.rows if self.rows else None,
                   expert_loads=loads, loads_per_token=loads / generated if generated else None)
        return out
