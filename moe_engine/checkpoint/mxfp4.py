"""MXFP4 (OCP microscaling FP4), as GPT-OSS checkpoints store their experts: decoded at load.

A matrix W [R, C] is cut into blocks of 32 consecutive columns per row. Each value is an FP4
E2M1 code (1 sign, 2 exponent, 1 mantissa bit), two codes per byte, the even column in the low
nibble; each block has one E8M0 scale byte s (a power of two, 2^(s - 127)):

    blocks [R, C/32, 16] uint8      scales [R, C/32] uint8
    W[r, 32 g + 2 j]     = fp4(blocks[r, g, j] & 0xF) * 2^(scales[r, g] - 127)
    W[r, 32 g + 2 j + 1] = fp4(blocks[r, g, j] >> 4)  * 2^(scales[r, g] - 127)

E2M1 codes: exponent bits 0 are subnormal (0, 0.5); else (1 + m/2) * 2^(e - 1), so the
magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6. Decoding is exact in float32 and bfloat16.

`dequantize_mxfp4` is the vectorized decoder (a 16-entry table); `dequantize_mxfp4_reference`
decodes one value at a time from the bit fields, the readable twin the tests compare it with.
Imports torch only.
"""
from __future__ import annotations

import torch

BLOCK = 32                       # values per scale
SCALE_BIAS = 127                 # E8M0 exponent bias


def fp4_e2m1(code: int) -> float:
    """One FP4 E2M1 code (0..15) -> its value, from the bit fields."""
    sign = -1.0 if code & 0b1000 else 1.0
    exp, mant = (code >> 1) & 0b11, code & 0b1
    if exp == 0:
        return sign * 0.5 * mant                    # subnormal: 0 or 0.5
    return sign * (1.0 + 0.5 * mant) * 2.0 ** (exp - 1)


FP4_TABLE = torch.tensor([fp4_e2m1(c) for c in range(16)], dtype=torch.float32)   # [16]


def check_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} must be scales' shape {list(scales.shape)} "
                         f"+ [{BLOCK // 2}]")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> W [..., G * 32] in `dtype`."""
    check_mxfp4(blocks, scales)
    table = FP4_TABLE.to(blocks.device)
    lo, hi = table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]          # [..., G, 16] each
    values = torch.stack([lo, hi], dim=-1).flatten(-2)                           # [..., G, 32], even col = low
    exponent = scales.to(torch.int32) - SCALE_BIAS                               # [..., G]
    w = torch.ldexp(values, exponent[..., None].float())
    return w.flatten(-2).to(dtype)


def dequantize_mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The same decode, value by value in Python (slow; for tests). -> float32 [..., G * 32]."""
    check_mxfp4(blocks, scales)
    b = blocks.reshape(-1, blocks.shape[-2], blocks.shape[-1]).tolist()         # [rows][G][16]
    s = scales.reshape(-1, scales.shape[-1]).tolist()                           # [rows][G]
    rows = []
    for row_blocks, row_scales in zip(b, s):
        row = []
        for block, scale in zip(row_blocks, row_scales):
            for byte in block:
                row.append(fp4_e2m1(byte & 0x0F) * 2.0 ** (scale - SCALE_BIAS))
                row.append(fp4_e2m1(byte >> 4) * 2.0 ** (scale - SCALE_BIAS))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32).reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)
