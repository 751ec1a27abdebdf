"""Which predicted experts to prefetch, and when prefetching may evict: decisions only, no bytes moved.

The live cache (cache.OffloadedExperts) and the offloading simulator (profiling/simulate.py) both run
this object, so a simulation makes the engine's prefetch decisions, not a copy of them. The caller
owns the slot table and the loads: `issue` places experts through the table and hands each placement
to the caller's `submit`.

A prefetch that needs an eviction is issued only while the target layer's predictions have been right
at least MIN_PRECISION of the time: a wrong one costs a load and may evict an expert that is used
again (on near-random routing, prefetching with 2 slots per layer quadrupled the loads). Predictions
keep being scored while gated, so prefetching resumes when they improve. Precision starts at
PRIOR_PRECISION, below the gate: a predictor earns evicting prefetches by being right first (starting
at 1.0 let an untried predictor evict from the first step; the scored guesses are only those of experts
not already resident, so a layer with good locality scores few of them and an optimistic start took
most of a run to wear off: on the disk tier at 50% of experts 67 prefetches at 49% precision, with
this prior 28 at 86-89% and 30 -> 35 decode tok/s). Experts prefetched for a layer earlier in the
same step (from a farther lookahead) are not evicted by later, nearer predictions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

PRECISION_DECAY = 0.9          # moving average of per-layer prediction precision
MIN_PRECISION = 0.7            # below it, prefetches that would evict are not issued (tuned: see RESULTS)
PRIOR_PRECISION = 0.65         # before any guess is scored: 2 right guesses pass MIN_PRECISION, a dear read needs more


class PrefetchGate:
    def __init__(self, num_layers: int, top_k: int):
        self.top_k = top_k
        self.precision = [PRIOR_PRECISION] * num_layers  # per layer: moving average of prediction precision
        self._shadow: dict[int, set[int]] = {}           # target layer -> experts last predicted for it
        self._fetched: dict[int, set[int]] = {}          # target layer -> experts prefetched for it this step

    def new_step(self) -> None:
        self._fetched = {}

    def score(self, layer: int, experts: Sequence[int]) -> None:
        """The layer's routing is known: score the last prediction made for it (issued or not)."""
        predicted = self._shadow.pop(layer, None)
        if predicted:
            hit = len(predicted & set(experts)) / len(predicted)
            self.precision[layer] = PRECISION_DECAY * self.precision[layer] + (1 - PRECISION_DECAY) * hit

    def issue(self, layer: int, predictions: dict[int, torch.Tensor], table, step: int,
              inflight: Callable[[int], set[int]], submit: Callable[[int, int, tuple, int], None],
              avoid: Callable[[int], Sequence[int]] = lambda target: (), load_s: float | None = None,
              layer_s: float | None = None) -> None:
        """Prefetch the experts `predictions` (target layer -> scores [N, E]) expect, nearest layer first.

        `submit(target, expert, (slot, evicted), distance)` starts one load; `inflight(target)` lists the
        target's experts still loading (never evicted); `avoid(target)`: residents evicted last. With the
        measured seconds of one load and of one layer's compute, a prefetch that evicts must also pay: see
        `worth_evicting`.
        """
        for distance, (target, probs) in enumerate(sorted(predictions.items()), start=1):
            if target <= layer or not table.quotas[target]:
                continue
            scores, guessed = summed_scores(probs, self.top_k)                     # [E] expected tokens
            k = min(table.quotas[target], probs.shape[-1])
            wanted = sorted(np.flatnonzero(guessed).tolist(), key=lambda e: -scores[e])[:k]
            fresh = {e for e in wanted if not table.contains(target, e)}
            if fresh:           # scored: the step's first (farthest) guess of experts not already resident
                self._shadow.setdefault(target, fresh)
            confident = worth_evicting(self.precision[target], distance, load_s, layer_s)
            fetched = self._fetched.setdefault(target, set())
            for e in wanted:
                if table.contains(target, e):
                    continue
                if not confident and not table.free[target]:
                    break
                keep = inflight(target) | set(wanted) | fetched      # earlier rounds' picks stay
                placed = table.place(target, e, step, protected=keep, scores=scores, avoid=avoid(target))
                if placed is None:
                    break
                submit(target, e, placed, distance)
                fetched.add(e)


def worth_evicting(precision: float, distance: int, load_s: float | None, layer_s: float | None) -> bool:
    """May a prefetch `distance` layers ahead evict a resident, given the target layer's precision p?

    Always p >= MIN_PRECISION. When load and layer times are known, also p x hidden >= (1 - p) x load_s:
    a right guess hides at most min(load_s, distance x layer_s) of stall (the compute before the target
    layer), a wrong one spends a whole read of link time (and evicted an expert for nothing). When a read
    takes far longer than the layers it can overlap (large experts from disk), prefetching that evicts
    costs more than it hides, so only demand loads and free-slot prefetches run.
    """
    if precision < MIN_PRECISION:
        return False
    if not load_s or not layer_s:
        return True
    return precision * min(load_s, distance * layer_s) >= (1.0 - precision) * load_s


def summed_scores(scores: torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictor scores [N, E] -> (expected tokens routed to each expert [E], guessed by some token [E] bool).

    Each token is predicted to use its top_k highest-scored experts (the predictor's guess of its
    routing), so an expert's expectation is the number of tokens whose guess includes it; the
    summed normalized scores (rows with negative entries are treated as logits) break ties.
    """
    s = scores.float()
    neg = (s < 0).any(-1, keepdim=True)
    probs = torch.where(neg, torch.softmax(s, -1), s / s.sum(-1, keepdim=True).clamp_min(1e-12))
    picked = torch.zeros_like(probs).scatter_(1, torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1).indices, 1.0)
    counts = picked.sum(0)
    return (counts + 1e-3 * probs.sum(0)).cpu().numpy(), (counts > 0).cpu().numpy()
