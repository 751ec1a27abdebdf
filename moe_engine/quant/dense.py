"""--quant-scope all: the dense (non-expert) matmul weights quantized like the experts, at load.

    quantized:   attention projections (q|k|v as one matrix, o; MLA's q / q_a / q_b / kv_a / o), shared experts
                 and dense MLP layers (gate, up, down), lm_head
    kept as is:  embeddings (a lookup, not a matmul: keeping them costs memory only), norms, routers and the
                 shared expert's sigmoid gate (routing stays exact), biases, MLA's kv_b_proj (the absorbed
                 attention reads its weight per head, never multiplies x by it)

Each target becomes a QuantLinear: the format of the experts (_ops/qmatrix.py: bit planes, float16 scales and
zero points per group of input columns) at the settings' dense width (QuantSettings.dense_bits) and group, the
same matmul kernels (kernels.qlinear: C on the CPU, Triton on GPUs, the reference when KernelConfig.quant is
"reference"), the bias added in the model dtype. The dense tensors are dropped, so their memory is freed.
With tied embeddings lm_head gets a quantized copy beside the embedding (memory grows by that copy, compute
reads the narrow one, as llama.cpp's output matmul does).

Dense weights are not cached (quant/store.py holds experts only): they are quantized at every load, with
a progress bar when it takes over a second. `DenseQuant` is the arithmetic (on a meta-device decoder, for the
placement plan and the stats); `quantize_dense` does it on the built decoder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .._ops.qmatrix import GROUP_SIZES, PLANES, SCALE_DTYPE, QMatrix
from ..config import format_size
from ..errors import ConfigError
from ..model.attention import Attention
from ..model.decoder import Decoder
from ..model.linear import Linear
from ..model.mla import MlaAttention
from ..model.moe import GatedMlp
from .format import pack_planes, quantize_matrix
from .kernels import qlinear

MLA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")
CHUNK_ELEMENTS = 1 << 24       # weights quantized per pass (bounds the float32 temporaries of quantize_matrix)


class QuantLinear(nn.Module):
    """y [..., R] = x [..., C] @ W^T (+ bias) for a quantized W [R, C]; y in `dtype` (the model's).

    Buffers: plane0 (, plane1) uint8, scales and zeros float16 (a QMatrix's tensors); bias: the dense one.
    kernel: kernels.qlinear's ("auto", or "reference": the device kernel's torch twin)."""

    def __init__(self, m: QMatrix, bias: torch.Tensor | None, dtype: torch.dtype, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = m.cols, m.rows, m.bits, m.group
        self.dtype, self.kernel = dtype, kernel
        self.num_planes = len(m.planes)
        for i, plane in enumerate(m.planes):
            self.register_buffer(f"plane{i}", plane)
        self.register_buffer("scales", m.scales)
        self.register_buffer("zeros", m.zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def qmatrix(self) -> QMatrix:
        planes = tuple(getattr(self, f"plane{i}") for i in range(self.num_planes))
        return QMatrix(self.out_features, self.in_features, self.bits, self.group, planes, self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = qlinear(x.reshape(-1, self.in_features), self.qmatrix, self.kernel)          # [N, R]
        y = y.view(*x.shape[:-1], self.out_features)
        if y.dtype != self.dtype:
            y = y.to(self.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, bias={self.bias is not None}, kernel={self.kernel}")


@dataclass(frozen=True)
class Target:
    """One matrix to quantize: the Linears `attrs` of `module` (several: stacked by rows, e.g. q|k|v)."""

    name: str                  # the module's path in the decoder's state dict ("" for the decoder itself)
    module: nn.Module
    attrs: tuple[str, ...]

    @property
    def linears(self) -> list[Linear]:
        return [getattr(self.module, a) for a in self.attrs]

    @property
    def rows(self) -> int:
        return sum(lin.out_features for lin in self.linears)

    @property
    def cols(self) -> int:
        return self.linears[0].in_features

    @property
    def weight_names(self) -> list[str]:
        return [f"{self.name}.{a}.weight" if self.name else f"{a}.weight" for a in self.attrs]

    @property
    def label(self) -> str:
        return (f"{self.name}." if self.name else "") + "|".join(self.attrs)


def targets(decoder: Decoder) -> list[Target]:
    """The decoder's matrices quantized under --quant-scope all, in module order (works on the meta device)."""
    out = []
    for name, module in decoder.named_modules():
        if isinstance(module, Attention):
            out += [Target(name, module, ("q_proj", "k_proj", "v_proj")), Target(name, module, ("o_proj",))]
        elif isinstance(module, MlaAttention):
            out += [Target(name, module, (a,)) for a in MLA_TARGETS if hasattr(module, a)]
        elif isinstance(module, GatedMlp):
            out += [Target(name, module, (a,)) for a in ("gate", "up", "down")]
    out.append(Target("", decoder, ("lm_head",)))
    return out


def qmatrix_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    """Bytes of a quantized [rows, cols] matrix: its codes plus float16 scales and zero points per group."""
    return rows * cols * bits // 8 + 2 * rows * (cols // group) * SCALE_DTYPE.itemsize


def check_dense(spec, group: int) -> None:
    """Raise ConfigError naming the fix when `group` does not divide some dense matrix's input size."""
    with torch.device("meta"):
        ts = targets(Decoder(spec))
    for t in ts:
        if t.cols % group:
            ok = [g for g in GROUP_SIZES if all(u.cols % g == 0 for u in ts)]
            fix = (f"use --quant-group {' or '.join(map(str, ok))}" if ok else
                   "no supported group size fits every dense matrix of this model; use --quant-scope experts")
            raise ConfigError(f"--quant-scope all --quant-group {group}: {t.label} has {t.cols} input columns, not a "
                              f"multiple of {group}; {fix}")


@dataclass(frozen=True)
class DenseQuant:
    """What --quant-scope all does to a model's non-expert bytes (computed on the meta device)."""

    name: str                  # --quant's setting
    bits: int
    group: int
    dtype: torch.dtype         # the model dtype the dense weights had
    matrices: int              # quantized matrices (q|k|v counts once)
    kinds: tuple[str, ...]     # what they are, for describe()
    dense_bytes: int           # their dense weights in `dtype`
    freed_bytes: int           # of which no longer held (all but a tied lm_head, which is the embedding)
    quant_bytes: int           # their quantized size

    @classmethod
    def of(cls, spec, dtype: torch.dtype, settings) -> DenseQuant:
        with torch.device("meta"):
            decoder = Decoder(spec).cast(dtype)
        ts = targets(decoder)
        bits, group, size = settings.dense_bits, settings.group_size, dtype.itemsize
        dense = sum(t.rows * t.cols * size for t in ts)
        tied = spec.tie_word_embeddings * spec.vocab_size * spec.hidden_size * size
        kinds = [k for k, hit in (("attention", any(isinstance(t.module, (Attention, MlaAttention)) for t in ts)),
                                  ("shared experts", any(".shared" in t.name for t in ts)),
                                  ("dense MLPs", any(t.name.endswith(".mlp") for t in ts)), ("lm_head", True)) if hit]
        return cls(settings.name, bits, group, dtype, len(ts), tuple(kinds), dense, dense - tied,
                   sum(qmatrix_bytes(t.rows, t.cols, bits, group) for t in ts))

    def non_expert_bytes(self, dense_non_expert_bytes: int) -> int:
        """The non-expert bytes after quantization, from their dense total (runtime/build.non_expert_bytes)."""
        return dense_non_expert_bytes - self.freed_bytes + self.quant_bytes

    def summary(self) -> dict:
        """The stats' "quant" entries of the scope."""
        return {"scope": "all", "dense_bits": self.bits, "dense_group_size": self.group, "dense_matrices": self.matrices,
                "dense_bytes": self.quant_bytes, "unquantized_dense_bytes": self.dense_bytes}

    def describe(self) -> str:
        """One line for the placement plan."""
        dt = str(self.dtype).removeprefix("torch.")
        why = "" if self.name == f"int{self.bits}" else f" (experts {self.name}: 8 bits above an average of 4, else 4)"
        return (f"  dense weights quantized to {self.bits} bits{why}, group {self.group}: {self.matrices} matrices "
                f"({', '.join(self.kinds)}) {format_size(self.dense_bytes)} {dt} -> "
                f"{format_size(self.quant_bytes)}; embeddings, norms, routers and biases stay {dt}"
                + ("; lm_head is tied to the embedding, so its quantized copy is held beside it"
                   if self.dense_bytes != self.freed_bytes else ""))


def quantize_weight(w: torch.Tensor, bits: int, group: int) -> QMatrix:
    """W [R, C] (any float dtype and device) -> a QMatrix on W's device, a chunk of rows at a time (rows are
    quantized independently, so the result is that of format.quantize_matrix on the whole matrix)."""
    r, c = w.shape
    planes = tuple(torch.empty(r, c * pw // 8, dtype=torch.uint8, device=w.device) for pw in PLANES[bits])
    scales = torch.empty(r, c // group, dtype=SCALE_DTYPE, device=w.device)
    zeros = torch.empty_like(scales)
    step = max(1, CHUNK_ELEMENTS // c)
    for r0 in range(0, r, step):
        rows = slice(r0, min(r, r0 + step))
        codes, s, z = quantize_matrix(w[rows], bits, group)
        for dst, src in zip(planes, pack_planes(codes, bits)):
            dst[rows].copy_(src)
        scales[rows].copy_(s)
        zeros[rows].copy_(z)
    return QMatrix(r, c, bits, group, planes, scales, zeros)


@torch.no_grad()
def quantize_dense(decoder: Decoder, bits: int, group: int, kernel: str = "auto", progress: bool = True) -> int:
    """Replace every target (see targets) of a built decoder by a QuantLinear at `bits` / `group`, dropping the
    dense weights; returns the number of matrices quantized. q|k|v become one matrix (Attention.set_qkv_proj)."""
    dtype = decoder.embed.weight.dtype
    ts = targets(decoder)
    for t in tqdm(ts, desc="quantizing dense weights", unit="matrix", disable=not progress, leave=False, delay=1.0):
        lins = t.linears
        if len(lins) == 1:
            weight, bias = lins[0].weight, lins[0].bias
        else:
            fused = getattr(t.module, "qkv_weight", None)
            weight = fused if fused is not None else torch.cat([lin.weight for lin in lins])
            if lins[0].bias is None:
                bias = None
            else:
                fb = getattr(t.module, "qkv_bias", None)
                bias = fb if fb is not None else torch.cat([lin.bias for lin in lins])
        q = QuantLinear(quantize_weight(weight, bits, group), None if bias is None else bias.detach(), dtype, kernel)
        if len(lins) == 1:
            setattr(t.module, t.attrs[0], q)
        else:
            t.module.set_qkv_proj(q)
    return len(ts)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (views of one tensor counted by their own size)."""
    return sum(math.prod(t.shape) * t.element_size() for t in (*module.parameters(), *module.buffers()))
