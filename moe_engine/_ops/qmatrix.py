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
        shifts = torch.arange(per, dtype=torch.int32) * w
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
    """x [N, C] -> [N, R] through a dense dequantized copy of W (the twin of _ops.qlinear)."""
    return F.linear(x, dequantize_matrix(m, x.dtype))
