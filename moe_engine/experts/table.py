"""The slot table: which (layer, expert) occupies which cache slot, with per-layer quotas.

Ids only: no tensors. Slots of layer L are the global slot ids [base_L, base_L + quota_L),
so a layer can never take another layer's slots (quotas are the per-layer capacity). The
table asks its eviction policy for a victim when a layer is full, and counts hits, misses
and evictions per layer. The live cache (cache.py) and trace replays share this class.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .policies import EvictionPolicy


class SlotTable:
    def __init__(self, quotas: Sequence[int], num_experts: int, policy: EvictionPolicy):
        self.quotas = list(quotas)                       # [L] slots per layer (0 for dense layers)
        self.num_experts = num_experts
        self.base = np.concatenate([[0], np.cumsum(self.quotas)]).astype(int).tolist()
        self.policy = policy
        policy.reset(len(self.quotas), num_experts)
        self.slot_of: list[dict[int, int]] = [{} for _ in self.quotas]      # layer -> {expert: slot}
        self.free: list[list[int]] = [list(range(self.base[i + 1] - 1, self.base[i] - 1, -1))
                                      for i in range(len(self.quotas))]
        self.hits = [0] * len(self.quotas)
        self.misses = [0] * len(self.quotas)
        self.evictions = 0

    @property
    def capacity(self) -> int:
        return self.base[-1]

    @property
    def resident(self) -> int:
        return sum(len(s) for s in self.slot_of)

    def contains(self, layer: int, expert: int) -> bool:
        return expert in self.slot_of[layer]

    def resident_experts(self, layer: int) -> list[int]:
        return list(self.slot_of[layer])

    def lookup(self, layer: int, experts: Sequence[int], step: int) -> list[int]:
        """Count a step's use of `experts` at `layer`; return the ones that are not resident (misses)."""
        missing = [e for e in experts if e not in self.slot_of[layer]]
        self.hits[layer] += len(experts) - len(missing)
        self.misses[layer] += len(missing)
        self.policy.record(layer, experts, step)
        return missing

    def place(self, layer: int, expert: int, step: int, protected: Sequence[int] = (),
              scores: np.ndarray | None = None, avoid: Sequence[int] = ()) -> tuple[int, int | None] | None:
        """Give `expert` a slot of its layer: a free one, else the policy's victim among unprotected residents.

        `avoid`: residents evicted only when every other unprotected one is (soft protection, e.g. the
        experts the next scheduled group is forecast to use). Returns (slot, evicted expert or None),
        or None when every slot of the layer is protected.
        """
        if expert in self.slot_of[layer]:
            raise ValueError(f"expert {expert} of layer {layer} is already resident")
        if self.free[layer]:
            slot, evicted = self.free[layer].pop(), None
        else:
            keep = set(protected)
            candidates = [e for e in self.slot_of[layer] if e not in keep]
            if not candidates:
                return None
            if avoid:
                candidates = [e for e in candidates if e not in avoid] or candidates
            evicted = self.policy.victim(layer, candidates, step, scores)
            slot = self.slot_of[layer].pop(evicted)
            self.evictions += 1
        self.slot_of[layer][expert] = slot
        return slot, evicted

    def remove(self, layer: int, expert: int) -> None:
        """Drop an entry (a load that failed); its slot becomes free."""
        slot = self.slot_of[layer].pop(expert)
        self.free[layer].append(slot)


def expert_size(source, layer: int, expert: int, default: int) -> int:
    """Bytes of one packed expert of `source` (a Checkpoint: all the same; quantized experts may differ)."""
    nbytes_of = getattr(source, "nbytes_of", None)
    return default if nbytes_of is None else nbytes_of(layer, expert)
