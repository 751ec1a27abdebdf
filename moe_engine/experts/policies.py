"""Eviction policies: plain objects over (layer, expert) ids and predictor scores.

A policy never sees tensors, slots, files or streams. The slot table (table.py) tells it what
each step used (`record`) and asks it, when a layer has no free slot, which resident expert
to give up (`victim`). The same objects drive the live cache and trace replays
(moe_engine/profiling/replay.py), so a replay measures exactly the engine's own policy code.

Conventions: `step` is a monotonically increasing counter of forward steps (one decode step
of the batch, or one prefill); `scores` is None or a float array [E] for the layer, higher =
more likely to be needed soon (from the predictor); candidates are never empty.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class EvictionPolicy(Protocol):
    name: str

    def reset(self, num_layers: int, num_experts: int) -> None:
        """Forget all history (a new cache)."""

    def record(self, layer: int, experts: Sequence[int], step: int) -> None:
        """`experts` of `layer` were used at `step` (hits and misses alike)."""

    def victim(self, layer: int, candidates: Sequence[int], step: int, scores: np.ndarray | None) -> int:
        """One of `candidates` (resident, evictable experts of `layer`) to evict."""


class LRU:
    """Evict the expert of the layer whose last use is oldest (ties: lowest id)."""

    name = "lru"

    def reset(self, num_layers: int, num_experts: int) -> None:
        self.last = np.full((num_layers, num_experts), -1, dtype=np.int64)    # [L, E] last step used

    def record(self, layer: int, experts: Sequence[int], step: int) -> None:
        self.last[layer, list(experts)] = step

    def victim(self, layer: int, candidates: Sequence[int], step: int, scores=None) -> int:
        return min(candidates, key=lambda e: (self.last[layer, e], e))


class LFU:
    """Evict the least frequently used expert of the layer (ties: least recently used)."""

    name = "lfu"

    def reset(self, num_layers: int, num_experts: int) -> None:
        self.count = np.zeros((num_layers, num_experts), dtype=np.int64)      # [L, E] uses so far
        self.last = np.full((num_layers, num_experts), -1, dtype=np.int64)

    def record(self, layer: int, experts: Sequence[int], step: int) -> None:
        idx = list(experts)
        self.count[layer, idx] += 1
        self.last[layer, idx] = step

    def victim(self, layer: int, candidates: Sequence[int], step: int, scores=None) -> int:
        return min(candidates, key=lambda e: (self.count[layer, e], self.last[layer, e], e))


POLICIES = {"lru": LRU, "lfu": LFU}
DEFAULT_POLICY = "lru"


def layer_quotas(total_slots: int, weights: Sequence[float], min_slots: int, max_slots: int) -> list[int]:
    """Split `total_slots` over layers in proportion to `weights` (largest remainder), each in [min, max]."""
    n = len(weights)
    quotas = [min(min_slots, max_slots)] * n
    spare = total_slots - sum(quotas)
    w = np.maximum(np.asarray(weights, dtype=float), 1e-9)
    while spare > 0:
        room = [i for i in range(n) if quotas[i] < max_slots]
        if not room:
            break
        share = w[room] / w[room].sum() * spare
        add = np.minimum(np.floor(share).astype(int), [max_slots - quotas[i] for i in room])
        if add.sum() == 0:          # the remainder: one slot each to the largest fractions
            add[np.argsort(-(share - np.floor(share)), kind="stable")[:spare]] = 1
        for i, a in zip(room, add):
            quotas[i] += int(a)
        spare = total_slots - sum(quotas)
    return quotas


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy object by name; unknown names list what exists."""
    from ..errors import ConfigError
    if name not in POLICIES:
        raise ConfigError(f"cache policy {name!r} is unknown; available: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()
