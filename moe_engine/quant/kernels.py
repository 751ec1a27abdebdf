"""Matmuls against quantized expert matrices: the readable reference and the dispatch to fast paths.

    qlinear(x [N, C], m: QMatrix [R, C]) -> x @ W^T [N, R]

- reference: the twin of the device's kernel: on the CPU _ops/qmatrix.py's qlinear_cpu_reference (4/8-bit
  codes: activations quantized to int8 per block of 32 columns and exact integer dot products, as the C
  kernel; 2/3 bits: dequantize W to x's dtype, then F.linear), on a GPU qlinear_reference (the latter).
- CPU: moe_engine._C's fused kernel through _ops.qlinear (codes unpacked in registers, never a
  dense W in memory); _ops falls back to the twin when the extension is missing.
- CUDA: the Triton kernel of triton_qmatmul.py when triton imports, else the reference.

kernel="reference" forces the reference (the build passes KernelConfig.quant, whose default is
MOE_ENGINE_QUANT_KERNEL: a test hook); results of the fast paths match it to float32 rounding
(tests/test_quant_kernels.py).
"""
from __future__ import annotations

import functools

import torch

from .. import _ops
from .._ops.qmatrix import QMatrix, qlinear_cpu_reference, qlinear_reference
from ..model.experts import glu


@functools.cache
def _triton_qlinear():
    try:
        from .triton_qmatmul import qlinear_triton
    except ImportError:
        return None
    return qlinear_triton


def qlinear(x: torch.Tensor, m: QMatrix, kernel: str = "auto") -> torch.Tensor:
    """x [N, C] -> [N, R]; kernel: "auto" (the fast path of x's device) or "reference" (chosen at build:
    runtime/config.py KernelConfig.quant)."""
    if kernel == "reference":
        return qlinear_reference(x, m) if x.device.type == "cuda" else qlinear_cpu_reference(x, m)
    if x.device.type == "cuda":
        fn = _triton_qlinear()
        return fn(x, m) if fn is not None else qlinear_reference(x, m)
    return _ops.qlinear(x, m)


def quant_expert_ffn(x: torch.Tensor, buf: torch.Tensor, layout, act="silu", kernel: str = "auto") -> torch.Tensor:
    """SwiGLU expert over a quantized buffer (layout: a format.QuantLayout): down(glu(gate(x), up(x))) (+ float32
    biases). x [N, D] -> [N, D]."""
    b1, b2 = layout.biases(buf)
    gate_up = qlinear(x, layout.w1.views(buf), kernel)                 # [N, 2I]
    if b1 is not None:
        gate_up = gate_up + b1.to(gate_up.dtype)
    gate, up = gate_up.split(layout.intermediate_size, dim=-1)
    out = qlinear(glu(gate, up, act), layout.w2.views(buf), kernel)     # [N, D]
    return out if b2 is None else out + b2.to(out.dtype)
