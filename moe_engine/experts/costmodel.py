"""Hybrid execution of misses (Fiddler, KTransformers): copy the expert, or compute it where it is?

When a GPU computes and a missed expert sits in host RAM, two ways can serve the tokens routed
to it: copy its bytes to the GPU (expert_bytes / host-to-device bandwidth) or run it on the CPU
from host RAM (tokens x 6 D I FLOPs / CPU rate, plus a fixed call overhead). Both rates are
measured at start (`calibrate`). The decision is per expert and per step; it never changes the
result beyond floating-point reassociation, only where the work runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model.experts import ExpertLayout


@dataclass(frozen=True)
class CostModel:
    h2d_bytes_per_s: float        # measured host -> device copy rate
    cpu_flops_per_s: float        # measured CPU expert-FFN rate
    cpu_overhead_s: float = 50e-6  # per CPU expert call (dispatch, activations to and from the host)

    def copy_seconds(self, expert_bytes: int) -> float:
        return expert_bytes / self.h2d_bytes_per_s

    def cpu_seconds(self, tokens: int, layout: ExpertLayout) -> float:
        return self.cpu_overhead_s + tokens * 6 * layout.hidden_size * layout.intermediate_size / self.cpu_flops_per_s

    def compute_on_host(self, tokens: int, layout: ExpertLayout, expert_bytes: int) -> bool:
        """True when the CPU finishes the expert's tokens before its bytes would reach the GPU."""
        return self.cpu_seconds(tokens, layout) < self.copy_seconds(expert_bytes)


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_flops(layout: ExpertLayout, dtype: torch.dtype, tokens: int = 4) -> float:
    """FLOP/s of one expert FFN on the CPU at decode-like token counts, activations in `dtype`.

    A quantized layout (quant.format.QuantLayout: it has `quantize`) runs its own kernel on a
    random expert quantized to it.
    """
    d, i = layout.hidden_size, layout.intermediate_size
    if hasattr(layout, "quantize"):
        packed = layout.quantize(torch.randn(i, d), torch.randn(i, d), torch.randn(d, i))
    else:
        packed = torch.randn(layout.numel).to(dtype)
    x = torch.randn(tokens, d).to(dtype)
    layout.ffn(x, packed)
    seconds = _best_of(lambda: layout.ffn(x, packed))
    return tokens * 6 * layout.hidden_size * layout.intermediate_size / max(seconds, 1e-9)


def measure_h2d(device: torch.device, nbytes: int = 64 << 20) -> float:
    """Bytes/s of a pinned host -> device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
    copy()
    return nbytes / max(_best_of(copy), 1e-9)


def calibrate(layout: ExpertLayout, dtype: torch.dtype, device: torch.device) -> CostModel:
    return CostModel(measure_h2d(device), measure_cpu_flops(layout, dtype))
