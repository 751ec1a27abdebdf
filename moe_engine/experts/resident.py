"""The simplest expert cache: every routed expert resident on the compute device.

Experts of one layer are stored stacked `[E, P]` (E experts, P = 3 I D packed elements), so
each row is one packed expert. Lookups are counted (all are hits) so stats are real numbers.
It implements the same two faces as the offloading cache (see experts/__init__.py): the model's
ExpertSource (`fetch`) and the runtime's view (hints, residency, stats), with nothing to steer.
"""
from __future__ import annotations

import contextlib

import functools
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..model.experts import LayerFetch
from .table import expert_size


class ResidentExperts:
    buffers_stable = True     # get() returns views that never move or change: a layer's experts may be used together

    def __init__(self, checkpoint, dtype: torch.dtype, device: torch.device, progress: bool = True):
        spec = checkpoint.spec
        self.num_layers = spec.num_layers
        self.num_experts = spec.moe.num_experts
        self.weights: dict[int, torch.Tensor] = {}
        self.lookups = [0] * spec.num_layers
        total = len(spec.moe_layers) * spec.moe.num_experts
        with tqdm(total=total, desc="loading experts", unit="expert", disable=not progress, leave=False) as bar:
            for layer in spec.moe_layers:
                sizes = [expert_size(checkpoint, layer, e, checkpoint.layout.numel) for e in range(self.num_experts)]
                if len(set(sizes)) == 1:
                    stack = torch.empty(self.num_experts, sizes[0], dtype=dtype)   # [E, P]
                else:                           # mixed-precision experts differ in size: one buffer each
                    stack = [torch.empty(n, dtype=dtype) for n in sizes]
                for e in range(self.num_experts):
                    checkpoint.read_expert(layer, e, dtype, out=stack[e])
                    bar.update()
                self.weights[layer] = stack.to(device) if isinstance(stack, torch.Tensor) else \
                    [w.to(device) for w in stack]

    observer = None           # no predictor to feed: nothing is ever loaded
    policy_name = None        # nothing is ever evicted
    evicts = False

    @property
    def capacity_experts(self) -> int:
        return len(self.weights) * self.num_experts

    @property
    def quotas(self) -> list[int]:
        return [self.num_experts if layer in self.weights else 0 for layer in range(self.num_layers)]

    def fetch(self, layer: int, experts: Sequence[int], counts: Sequence[int]) -> LayerFetch:
        """Everything is resident: nothing to start; compute in id order on the device."""
        return LayerFetch([(e, False) for e in experts], functools.partial(self._get, layer))

    def _get(self, layer: int, expert: int) -> torch.Tensor:
        self.lookups[layer] += 1
        return self.weights[layer][expert]

    def residents(self, layer: int) -> frozenset[int]:
        return frozenset(range(self.num_experts)) if layer in self.weights else frozenset()

    def hint_upcoming(self, experts: dict[int, frozenset[int]]) -> None:
        """Nothing is evicted, so a forecast of the next step changes nothing."""

    def ready(self, layer: int) -> frozenset[int]:
        return self.residents(layer)

    def peeking(self):
        """Reads are never counted here: drafting needs no special mode."""
        return contextlib.nullcontext(self)

    def prefetch(self, experts, keep=None) -> int:
        """Everything is resident: nothing to load."""
        return 0

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for ws in self.weights.values()
                   for w in (ws if isinstance(ws, list) else [ws]))

    def stats(self) -> dict:
        """All experts resident: every lookup is a hit and nothing is loaded after start-up."""
        n = self.num_layers
        lookups = sum(self.lookups)
        per_layer = [1.0 if self.lookups[i] else 0.0 for i in range(n)]
        return {
            "cache": {"hits": lookups, "misses": 0, "hit_rate": 1.0 if lookups else 0.0,
                      "per_layer_hit_rate": per_layer, "evictions": 0,
                      "capacity_experts": self.capacity_experts, "resident_experts": self.capacity_experts,
                      "lookups": lookups, "per_layer_hits": list(self.lookups), "per_layer_misses": [0] * n},
            "prefetch": {"issued": 0, "used": 0, "wasted": 0, "precision": 0.0, "recall": 0.0,
                         "per_layer_issued": [0] * n, "per_layer_used": [0] * n,
                         "per_layer_precision": [0.0] * n, "per_layer_recall": [0.0] * n, "by_lookahead": {}},
            "io": {"loads": 0, "bytes_loaded": 0, "bytes_disk_read": 0, "bytes_host_to_device": 0,
                   "stall_seconds": 0.0, "stall_decode_seconds": 0.0, "io_seconds": 0.0, "io_decode_seconds": 0.0},
            "optimal": {"belady_loads": 0, "belady_hit_rate": 1.0 if lookups else 0.0,
                        "per_layer_belady_loads": [0] * n, "per_layer_belady_hit_rate": per_layer},
        }

    def close(self) -> None:
        """Nothing to stop: the weights go with the object."""
