"""The quantized matrix format the kernels read: code widths, bit planes, group scales and zero points.

    W[r, c] ~= (q[r, c] - z[r, c // G]) * s[r, c // G]        q stored as bit planes (PLANES), s and z float16

quant/format.py quantizes and packs experts into this format (its docstring draws the whole expert
buffer); this module holds what the kernels and their torch twins need to read it: the constants,
the `QMatrix` views, unpacking and the reference dequantization. It imports torch only, so the
quantized matmul's twin (`qlinear_reference`) lives beside the C kernel in _ops without _ops
importing quant/.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BITS = (2, 3, 4, 8)                                    # supported code widths
PLANES = {8: (8,), 4: (4,), 3: (2, 1), 2: (2,)}        # plane widths, low bits first
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class QMatrix:
    """Views of one quantized matrix inside an expert buffer."""

    rows: int
    cols: int
    bits: int
    group: int
    planes: tuple[torch.Tensor, ...]   # uint8 [rows, cols * w / 8] per plane width w of PLANES[bits]
    scales: torch.Tensor               # float16 [rows, cols / group]
    zeros: torch.Tensor                # float16 [rows, cols / group] (integers)


def unpack_planes(planes: tuple[torch.Tensor, ...] | list[torch.Tensor], bits: int, cols: int) -> torch.Tensor:
    """The inverse of pack_planes: planes -> codes int32 [R, C]."""
    codes, shift = None, 0
    for plane, w in zip(planes, PLANES[bits]):
        per = 8 // w
        shifts = torch.arange(per, dtype=torch.int32, device=plane.device) * w
        vals = (plane.to(torch.int32)[..., None] >> shifts) & ((1 << w) - 1)   # [R, C/per, per]
        vals = vals.reshape(plane.shape[0], cols) << shift
        codes = vals if codes is None else codes | vals
        shift += w
    return codes


def dequantize_matrix(m: QMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QMatrix -> W [R, C] in `dtype` (computed in float32)."""
    codes = unpack_planes(m.planes, m.bits, m.cols).float().reshape(m.rows, -1, m.group)   # [R, C/G, G]
    w = (codes - m.zeros.float()[..., None]) * m.scales.float()[..., None]
    return w.reshape(m.rows, m.cols).to(dtype)


def qlinear_reference(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """x [N, C] -> [N, R] through a dense dequantized copy of W: what the GPU kernel computes, and the CPU
    kernel for 2/3-bit codes (qlinear_cpu_reference picks the CPU kernel's twin)."""
    return F.linear(x, dequantize_matrix(m, x.dtype))


ACT_BLOCK = 32                                         # columns per activation scale of the integer path
INT_PATH_BITS = (4, 8)                                 # code widths the CPU kernel multiplies as integers


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C] float32 -> (codes [N, C/32, 32] float32 holding integers in [-127, 127], scales d [N, C/32]):
    per block of 32 columns d = max|x| / 127 and codes = round-half-even(x * (1 / d)) (0 where d = 0), as the
    C kernel computes them (bit for bit: the same float32 operations)."""
    n, c = x.shape
    blocks = x.float().reshape(n, c // ACT_BLOCK, ACT_BLOCK)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    return torch.round(blocks * inv[..., None]).clamp(-127, 127), d


def qlinear_int8_reference(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """The twin of the CPU kernel's integer path (4/8-bit codes): x [N, C] -> [N, R] in x.dtype, computed as

        y[t, r] = sum_b s[r, g(b)] * d[t, b] * isum[t, r, b]  -  sum_g s[r, g] * z[r, g] * xz[t, g]

    with isum the integer dot of a block's codes and activation codes (exact in float32: |isum| < 2^24) and
    xz[t, g] = sum over group g's blocks of d * (sum of the block's activation codes)."""
    lead = x.shape[:-1]
    xf = x.reshape(-1, m.cols).float()
    q, d = quantize_activations(xf)                                          # [N, B, 32], [N, B]
    nb, per_group = m.cols // ACT_BLOCK, m.group // ACT_BLOCK
    codes = unpack_planes(m.planes, m.bits, m.cols).float().reshape(m.rows, nb, ACT_BLOCK)
    isum = torch.einsum("tbc,rbc->trb", q, codes)                          # [N, R, B], exact integers
    s = m.scales.float()                                                     # [R, G]
    s_block = s.repeat_interleave(per_group, dim=1)                          # [R, B]
    xz = (d * q.sum(-1)).reshape(-1, m.cols // m.group, per_group).sum(-1)   # [N, G]
    y = (isum * s_block[None] * d[:, None, :]).sum(-1) - xz @ (s * m.zeros.float()).T
    return y.reshape(*lead, m.rows).to(x.dtype)


INT8_ACT_DTYPES = (torch.bfloat16, torch.float16)      # activations the CPU kernel may quantize to int8


def int8_acts(x: torch.Tensor, m: QMatrix) -> bool:
    """Whether the CPU kernel takes the integer path: 4/8-bit codes and 16-bit float activations, whose own
    precision (2^-8 relative) int8 per block of 32 about keeps; float32 activations keep the exact float path."""
    return m.bits in INT_PATH_BITS and x.dtype in INT8_ACT_DTYPES


def qlinear_cpu_reference(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """The torch twin of the CPU kernel (_ops.qlinear): the integer path where int8_acts(x, m), else the float
    one."""
    return qlinear_int8_reference(x, m) if int8_acts(x, m) else qlinear_reference(x, m)
