"""Group-wise affine quantization of expert matrices and the packed layout of one quantized expert.

A matrix W [R, C] (R output rows, C input columns) is cut into groups of G consecutive columns
per row. Each group has a scale s and an integer zero point z (both stored as float16), and
each weight a code q in [0, 2^b - 1]:

    W[r, c] ~= (q[r, c] - z[r, c // G]) * s[r, c // G]

Codes are stored as bit planes so every width packs without waste: 8 -> one 8-bit plane,
4 -> one 4-bit plane, 3 -> a 2-bit plane (low bits) and a 1-bit plane (high bit), 2 -> one
2-bit plane. A w-bit plane packs 8/w consecutive columns per byte, lowest column in the
lowest bits: plane[r, j] holds columns j*(8/w) .. j*(8/w) + 8/w - 1.

One quantized expert is one contiguous uint8 buffer (so it still moves between tiers in one
copy); every section starts at a multiple of 16 bytes:

    [ gate_up W1 [2I, D]: planes..., scales [2I, D/G], zeros [2I, D/G] |
      down    W2 [D, I]:  planes..., scales [D, I/G],  zeros [D, I/G]
      (+ biases, float32, not quantized: gate_up [2I], down [D], when the experts have biases) ]

This module is the readable reference: quantize and pack. Unpacking, dequantizing and the QMatrix views
live with the kernels that read them (_ops/qmatrix.py); the fast kernels (C++ on CPU, Triton on GPU) read
the same buffers; see kernels.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .._ops.qmatrix import (BITS, GROUP_SIZES, PLANES, SCALE_DTYPE, QMatrix, dequantize_matrix,  # noqa: F401
                           unpack_planes)
from .kernels import quant_expert_ffn

SECTION_ALIGN = 16
BIAS_DTYPE = torch.float32
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)       # range shrink factors tried per group at <= 4 bits


def _align(n: int) -> int:
    return (n + SECTION_ALIGN - 1) // SECTION_ALIGN * SECTION_ALIGN


@dataclass(frozen=True)
class QMatrixLayout:
    """Byte offsets of one quantized [rows, cols] matrix within an expert buffer."""

    rows: int
    cols: int
    bits: int
    group: int
    offset: int                        # where its first plane starts

    @cached_property
    def plane_offsets(self) -> list[int]:
        out, pos = [], self.offset
        for w in PLANES[self.bits]:
            out.append(pos)
            pos = _align(pos + self.rows * self.cols * w // 8)
        return out

    @cached_property
    def scales_offset(self) -> int:
        w = PLANES[self.bits][-1]
        return _align(self.plane_offsets[-1] + self.rows * self.cols * w // 8)

    @cached_property
    def group_bytes(self) -> int:      # bytes of the scales (or of the zeros)
        return self.rows * (self.cols // self.group) * SCALE_DTYPE.itemsize

    @cached_property
    def end(self) -> int:
        return _align(self.scales_offset + 2 * _align(self.group_bytes))

    @cached_property
    def _offsets(self) -> tuple[int, int, int, int]:
        """(low plane, high plane or -1, scales, zeros) byte offsets in the expert buffer."""
        planes = self.plane_offsets
        return (planes[0], planes[1] if len(planes) > 1 else -1, self.scales_offset,
                self.scales_offset + _align(self.group_bytes))

    def pointers(self, base: int) -> tuple:
        """The C kernels' description of this matrix in a contiguous CPU expert buffer at address `base`:
        (bits, group, rows, cols, low plane, high plane or 0, scales, zeros) (csrc/bindings.cpp)."""
        lo, hi, so, zo = self._offsets
        return (self.bits, self.group, self.rows, self.cols, base + lo, base + hi if hi >= 0 else 0, base + so,
                base + zo)

    def views(self, buf: torch.Tensor) -> QMatrix:
        """buf: the expert's uint8 buffer -> QMatrix views (no copy)."""
        planes = tuple(buf[o: o + self.rows * self.cols * w // 8].view(self.rows, self.cols * w // 8)
                       for o, w in zip(self.plane_offsets, PLANES[self.bits]))
        g = self.cols // self.group
        so = self.scales_offset
        zo = so + _align(self.group_bytes)
        scales = buf[so: so + self.group_bytes].view(SCALE_DTYPE).view(self.rows, g)
        zeros = buf[zo: zo + self.group_bytes].view(SCALE_DTYPE).view(self.rows, g)
        return QMatrix(self.rows, self.cols, self.bits, self.group, planes, scales, zeros)


def check_format(bits: int, group: int, hidden: int, inter: int) -> None:
    """Raise ValueError naming the fix when bits/group cannot describe a hidden x inter expert."""
    if bits not in BITS:
        raise ValueError(f"{bits}-bit codes are not supported; use one of {', '.join(map(str, BITS))}")
    if group not in GROUP_SIZES:
        raise ValueError(f"group size {group} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")
    for name, n in (("hidden size", hidden), ("expert FFN size", inter)):
        if n % group:
            ok = [g for g in GROUP_SIZES if n % g == 0 and hidden % g == 0 and inter % g == 0]
            raise ValueError(f"group size {group} does not divide the model's {name} {n}; "
                             f"use a group size of {' or '.join(map(str, ok)) or '(none fits this model)'}")


@dataclass(frozen=True)
class QuantLayout:
    """Where W1 (gate then up rows, [2I, D]) and W2 (down, [D, I]) sit in one quantized expert.

    Duck-types model.experts.ExpertLayout for the MoE block: `ffn(x, buf, act)` runs the expert.
    """

    hidden_size: int        # D
    intermediate_size: int  # I
    bits: int
    group_size: int
    bias: bool = False      # float32 biases (gate_up [2I], down [D]) after W2

    def __post_init__(self):
        check_format(self.bits, self.group_size, self.hidden_size, self.intermediate_size)

    @cached_property
    def w1(self) -> QMatrixLayout:
        return QMatrixLayout(2 * self.intermediate_size, self.hidden_size, self.bits, self.group_size, 0)

    @cached_property
    def w2(self) -> QMatrixLayout:
        return QMatrixLayout(self.hidden_size, self.intermediate_size, self.bits, self.group_size, self.w1.end)

    @cached_property
    def bias_count(self) -> int:
        return 2 * self.intermediate_size + self.hidden_size if self.bias else 0

    @cached_property
    def numel(self) -> int:
        """Bytes of one quantized expert (its buffer is uint8)."""
        return self.w2.end + _align(self.bias_count * BIAS_DTYPE.itemsize)

    def biases(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """(gate_up bias [2I], down bias [D]) float32 views of the expert's buffer, or (None, None)."""
        if not self.bias:
            return None, None
        start, two_i = self.w2.end, 2 * self.intermediate_size
        b = buf[start: start + self.bias_count * BIAS_DTYPE.itemsize].view(BIAS_DTYPE)
        return b[:two_i], b[two_i:]

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        return self.numel

    def quantize(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 out: torch.Tensor | None = None, biases: tuple | None = None) -> torch.Tensor:
        """gate, up [I, D] and down [D, I] (any float dtype) (+ biases (gate [I], up [I], down [D]) when the
        layout has them; zeros if not given) -> the expert's uint8 buffer."""
        if out is None:
            out = torch.zeros(self.numel, dtype=torch.uint8)
        if self.bias:
            b1, b2 = self.biases(out)
            if biases is None:
                b1.zero_()
                b2.zero_()
            else:
                b1.copy_(torch.cat([biases[0], biases[1]]))
                b2.copy_(biases[2])
        for lay, w in ((self.w1, torch.cat([gate, up])), (self.w2, down)):
            codes, scales, zeros = quantize_matrix(w, self.bits, self.group_size)
            v = lay.views(out)
            for dst, src in zip(v.planes, pack_planes(codes, self.bits)):
                dst.copy_(src)
            v.scales.copy_(scales)
            v.zeros.copy_(zeros)
        return out

    def dequantize(self, buf: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert's buffer -> (W1 [2I, D], W2 [D, I]) in `dtype`."""
        return dequantize_matrix(self.w1.views(buf), dtype), dequantize_matrix(self.w2.views(buf), dtype)

    def ffn(self, x: torch.Tensor, buf: torch.Tensor, act="silu", linear=None, kernel: str = "auto") -> torch.Tensor:
        """The expert over its quantized buffer (kernel: see kernels.qlinear); `linear` (a dense-weight matmul
        kernel) is not used here."""
        return quant_expert_ffn(x, buf, self, act, kernel)


def quantize_matrix(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [R, C] -> (codes uint8 [R, C], scales fp16 [R, C/G], zeros fp16 [R, C/G]), min-max per group.

    At <= 4 bits the group's range is also tried shrunk by CLIP_RATIOS and the ratio with the
    smallest squared error is kept (outliers get clipped when that lowers the error).
    """
    r, c = w.shape
    g = w.float().reshape(r, c // group, group)                        # [R, C/G, G]
    qmax = 2 ** bits - 1
    lo, hi = g.amin(-1), g.amax(-1)                                    # [R, C/G]
    best = None
    for ratio in (CLIP_RATIOS if bits <= 4 else (1.0,)):
        scales, zeros = _scale_zero(lo * ratio, hi * ratio, qmax)
        codes = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, qmax)
        err = ((codes - zeros[..., None]) * scales[..., None] - g).square().sum(-1)   # [R, C/G]
        if best is None:
            best = [codes, scales, zeros, err]
            continue
        better = err < best[3]
        best[0] = torch.where(better[..., None], codes, best[0])
        best[1] = torch.where(better, scales, best[1])
        best[2] = torch.where(better, zeros, best[2])
        best[3] = torch.minimum(err, best[3])
    codes, scales, zeros, _ = best
    return codes.reshape(r, c).to(torch.uint8), scales.to(SCALE_DTYPE), zeros.to(SCALE_DTYPE)


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to float16, never 0) and integer zero point of ranges [lo, hi] that include 0."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scales = ((hi - lo) / qmax).to(SCALE_DTYPE).float()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.clamp(torch.round(-lo / scales), 0, qmax)
    return scales, zeros


def pack_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """codes uint8 [R, C] -> one uint8 plane [R, C * w / 8] per width w of PLANES[bits]."""
    out, shift = [], 0
    c = codes.to(torch.int32)
    for w in PLANES[bits]:
        vals = (c >> shift) & ((1 << w) - 1)                           # [R, C] this plane's bits
        per = 8 // w
        vals = vals.reshape(c.shape[0], -1, per)                       # [R, C/per, per]
        weights = torch.tensor([1 << (w * i) for i in range(per)], dtype=torch.int32, device=codes.device)
        out.append((vals * weights).sum(-1).to(torch.uint8))
        shift += w
    return out
