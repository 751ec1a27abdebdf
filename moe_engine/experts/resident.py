"""The simplest expert provider: every routed expert resident on the compute device.

Experts of one layer are stored stacked `[E, P]` (E experts, P = 3 I D packed elements), so
each row is one packed expert. Lookups are counted (all are hits) so stats are real numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

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

    @property
    def capacity_experts(self) -> int:
        return len(self.weights) * self.num_experts

    def prepare(self, layer: int, experts: Sequence[int], counts=None) -> list[tuple[int, bool]]:
        """Everything is resident: nothing to start; compute in id order on the device."""
        return [(e, False) for e in experts]

    def get(self, layer: int, expert: int) -> torch.Tensor:
        self.lookups[layer] += 1
        return self.weights[layer][expert]

    def observe(self, layer: int, router_input, experts, weights) -> None:
        """No predictor to feed in the all-resident provider."""

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for ws in self.weights.values()
                   for w in (ws if isinstance(ws, list) else [ws]))
