"""The decoder's linear layer: nn.Linear with an injectable matmul kernel. Imports torch only.

    y [..., R] = kernel(x [..., C], weight [R, C], bias [R] | None)      (F.linear when no kernel is set)

The model never chooses a kernel itself: the runtime injects one (Decoder.set_linear_kernel), e.g. a fast
bf16 GEMV for decode on the CPU. A kernel must compute F.linear's result up to floating-point rounding and
fall back to F.linear for inputs it does not take. State-dict names are nn.Linear's (`weight`, `bias`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LinearKernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class Linear(nn.Linear):
    """nn.Linear whose forward calls `self.kernel(x, weight, bias)` when one is set."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.kernel: LinearKernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        return F.linear(x, self.weight, self.bias) if kernel is None else kernel(x, self.weight, self.bias)
