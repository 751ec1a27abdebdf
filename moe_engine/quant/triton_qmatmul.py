"""Triton kernel for x @ W^T against one quantized matrix (format.py), codes unpacked in registers.

    qlinear_triton(x [N, C], m: QMatrix [R, C]) -> y [N, R] in x.dtype, float32 accumulation

What one program computes: a tile y[n0:n0+BN, r0:r0+BR] over a range of K tiles (BK columns each).
Per K tile it loads the packed plane bytes of BR rows x BK columns, unpacks the codes with shifts
and masks (3-bit: low 2 bits from the 2-bit plane, bit 2 from the 1-bit plane), dequantizes
w = (q - zero) * scale in float32, rounds w to x.dtype (as the reference does) and accumulates
x_tile @ w_tile^T in float32:

- N <= 8 (decode): GEMV-style, broadcast-multiply + sum over a [BN, BR, BK] product;
- N > 8 (prefill): tl.dot on [BN, BK] x [BK, BR] tiles (BN >= 16), IEEE float32 for float32 x.

Grid: (R / BR row blocks, N / BN token blocks, SPLIT column splits). With SPLIT > 1 each split
writes float32 partial sums to [SPLIT, N, R] and torch adds them (deterministic; it fills the
GPU when R / BR is small, e.g. decode with one token).

Layout assumptions (format.py): a w-bit plane is uint8 [R, C * w / 8] with unit column stride,
8 / w consecutive columns per byte, lowest column in the lowest bits; scales and zeros are float16
[R, C / G] with unit column stride. BK divides G, so a K tile lies in one group and needs one
scale and one zero per row. C is a multiple of G (check_format), so K tiles are never partial.

Importing this module needs triton (kernels.py falls back to the reference on ImportError).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .format import PLANES, QMatrix

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GEMV_MAX_N = 8                     # up to this many tokens: broadcast-multiply kernel, else tl.dot
SPLIT_TARGET_CPU = 4               # programs aimed for off-GPU (the interpreter): exercises split-K


@triton.jit
def _unpack(plane_ptr, row_off, cols, rmask, W: tl.constexpr):
    """Codes of one w-bit plane: int32 [BR, BK] (row_off [BR, 1] byte offsets, cols [BK])."""
    PER: tl.constexpr = 8 // W
    b = tl.load(plane_ptr + row_off + (cols // PER)[None, :], mask=rmask[:, None], other=0)   # uint8 [BR, BK]
    return (b.to(tl.int32) >> ((cols % PER) * W)[None, :]) & ((1 << W) - 1)


@triton.jit
def _qmatmul_kernel(x_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, out_ptr,
                    N, R, num_tiles, tiles_per_split,
                    stride_xn, stride_xc, stride_p0, stride_p1, stride_s, stride_z,
                    stride_os, stride_on, stride_or,
                    W0: tl.constexpr, W1: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    pid_r, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)                     # [BR]
    toks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                     # [BN]
    rmask, nmask = rows < R, toks < N
    offs_k = tl.arange(0, BLOCK_K)                                     # [BK]
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)               # [BN, BR]
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, num_tiles)
    for t in range(t_start, t_end):
        cols = t * BLOCK_K + offs_k                                    # [BK]
        q = _unpack(p0_ptr, rows[:, None] * stride_p0, cols, rmask, W0)   # [BR, BK] low bits
        if W1 > 0:
            q |= _unpack(p1_ptr, rows[:, None] * stride_p1, cols, rmask, W1) << W0
        g = (t * BLOCK_K) // GROUP
        scale = tl.load(s_ptr + rows * stride_s + g, mask=rmask, other=0).to(tl.float32)   # [BR]
        zero = tl.load(z_ptr + rows * stride_z + g, mask=rmask, other=0).to(tl.float32)    # [BR]
        w = ((q.to(tl.float32) - zero[:, None]) * scale[:, None]).to(x_ptr.dtype.element_ty)  # [BR, BK]
        x = tl.load(x_ptr + toks[:, None] * stride_xn + cols[None, :] * stride_xc,
                    mask=nmask[:, None], other=0)                      # [BN, BK]
        if USE_DOT:
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    out = out_ptr + pid_k * stride_os + toks[:, None] * stride_on + rows[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & rmask[None, :])


def _check(x: torch.Tensor, m: QMatrix) -> None:
    """Raise ValueError naming what was found and what the kernel needs."""
    if x.dim() != 2 or x.shape[1] != m.cols:
        raise ValueError(f"qlinear_triton: x must be [N, {m.cols}] for a [{m.rows}, {m.cols}] matrix; "
                         f"got {list(x.shape)} (flatten leading dims first)")
    if x.dtype not in DTYPES:
        raise ValueError(f"qlinear_triton: x dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    for name, t in (("plane", m.planes[0]), ("scales", m.scales), ("zeros", m.zeros)):
        if t.device != x.device:
            raise ValueError(f"qlinear_triton: {name} on {t.device} but x on {x.device}; move the expert buffer")
        if t.stride(-1) != 1:
            raise ValueError(f"qlinear_triton: {name} needs unit column stride (views of an expert buffer have it)")


def _blocks(n: int, group: int) -> tuple[int, int, int, bool]:
    """(BLOCK_N, BLOCK_R, BLOCK_K, use_dot) for n tokens; BLOCK_K divides the group."""
    if n <= GEMV_MAX_N:            # the [BN, BR, BK] product stays at <= 8K elements (64 per thread at 4 warps)
        bn = triton.next_power_of_2(n)
        return bn, (64 if bn <= 2 else 32), min(group, 64 if bn <= 2 else 32), False
    return min(64, max(16, triton.next_power_of_2(n))), 64, min(group, 64), True


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def _split(programs: int, num_tiles: int, device: torch.device) -> int:
    """Column splits so that about two programs run per SM (never an empty split)."""
    target = 2 * _sm_count(device.index) if device.type == "cuda" else SPLIT_TARGET_CPU
    split = max(1, min(num_tiles, target // programs))
    return triton.cdiv(num_tiles, triton.cdiv(num_tiles, split))


def qlinear_triton(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """x [N, C] -> x @ W^T [N, R] in x.dtype (float32 accumulation), W never dense in memory."""
    _check(x, m)
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(0, m.rows)
    bn, br, bk, use_dot = _blocks(n, m.group)
    widths = PLANES[m.bits]
    p0 = m.planes[0]
    p1 = m.planes[1] if len(widths) > 1 else p0                        # unused when W1 == 0
    num_tiles = m.cols // bk
    grid_rn = triton.cdiv(m.rows, br) * triton.cdiv(n, bn)
    split = _split(grid_rn, num_tiles, x.device)
    tiles_per_split = triton.cdiv(num_tiles, split)
    if split == 1:
        out = torch.empty(1, n, m.rows, dtype=x.dtype, device=x.device)      # [1, N, R]
    else:
        out = torch.empty(split, n, m.rows, dtype=torch.float32, device=x.device)   # [S, N, R] partials
    grid = (triton.cdiv(m.rows, br), triton.cdiv(n, bn), split)
    _qmatmul_kernel[grid](
        x, p0, p1, m.scales, m.zeros, out,
        n, m.rows, num_tiles, tiles_per_split,
        x.stride(0), x.stride(1), p0.stride(0), p1.stride(0), m.scales.stride(0), m.zeros.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, GROUP=m.group,
        BLOCK_N=bn, BLOCK_R=br, BLOCK_K=bk, USE_DOT=use_dot, IEEE=x.dtype == torch.float32,
        num_warps=4)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
