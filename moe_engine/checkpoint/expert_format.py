"""How a family stores one routed expert on disk, and how those bytes become the packed layout.

    per-expert tensors   experts.{e}.gate_proj.weight ...      (Mixtral, Qwen, OLMoE)
    stacked tensors      experts.gate_up_proj [E, D, 2I] ...   (GPT-OSS, Granite): a template without {e};
                         expert e is slice e, one contiguous byte range of the tensor

An expert's byte ranges (TensorInfo each, `expert_infos`) are what the direct-IO reader loads.
When those bytes, concatenated, already are the packed buffer in the compute dtype (`to_sections`
is None and the dtypes agree), they are read straight into a cache slot; otherwise they are read
into a staging buffer and `pack` converts them (dtype, transpose, de-interleave, MXFP4 decode).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.experts import ExpertLayout
from ..model.spec import ModelSpec
from .safetensors_index import TensorInfo

Shapes = tuple[tuple[int, ...], ...]


def gate_up_down_shapes(spec: ModelSpec) -> Shapes:
    d, i = spec.hidden_size, spec.moe.intermediate_size
    return (i, d), (i, d), (d, i)


@dataclass(frozen=True)
class ExpertFormat:
    """The checkpoint tensors of one routed expert and how they map onto ExpertLayout's sections."""

    names: tuple[str, ...]                  # templates with {l} and, for per-expert tensors, {e}
    shapes: Callable[[ModelSpec], Shapes] = gate_up_down_shapes   # each tensor's shape for one expert
    # (spec, tensors of one expert in their checkpoint dtype) -> the layout's sections in packed order
    # (gate [I, D], up [I, D], down [D, I], then biases); None: the tensors' bytes in order are the packed buffer
    to_sections: Callable[[ModelSpec, list[torch.Tensor]], list[torch.Tensor]] | None = None
    dtypes: tuple[torch.dtype | None, ...] = ()   # a required dtype per tensor (None or missing: any float)
    description: str = ""                   # for error messages, e.g. "MXFP4 blocks + scales"

    def stacked(self, index: int) -> bool:
        return "{e}" not in self.names[index]

    def tensor_name(self, index: int, layer: int, expert: int) -> str:
        return self.names[index].format(l=layer, e=expert)

    def expected(self, spec: ModelSpec) -> list[tuple[str, tuple[int, ...], torch.dtype | None, bool]]:
        """(template, full tensor shape, required dtype, stacked) per tensor, for validation."""
        out = []
        for j, shape in enumerate(self.shapes(spec)):
            full = (spec.moe.num_experts, *shape) if self.stacked(j) else tuple(shape)
            out.append((self.names[j], full, self.dtypes[j] if j < len(self.dtypes) else None, self.stacked(j)))
        return out


def expert_slice(info: TensorInfo, expert: int) -> TensorInfo:
    """The byte range of slice `expert` of a stacked tensor [E, ...] (contiguous: row-major storage)."""
    per = info.nbytes // info.shape[0]
    return TensorInfo(f"{info.name}[{expert}]", info.path, info.offset + expert * per, per, info.dtype,
                      tuple(info.shape[1:]))


def split_raw(raw: torch.Tensor, infos) -> list[torch.Tensor]:
    """uint8 bytes of an expert's tensors back to back -> one tensor per info, in its dtype and shape."""
    out, pos = [], 0
    for info in infos:
        chunk = raw[pos:pos + info.nbytes]
        if pos % info.dtype.itemsize:          # a dtype view needs an aligned start: copy the odd one
            chunk = chunk.clone()
        out.append(chunk.view(info.dtype).view(info.shape))
        pos += info.nbytes
    return out


def pack(fmt: ExpertFormat, spec: ModelSpec, layout: ExpertLayout, tensors: list[torch.Tensor],
         out: torch.Tensor) -> torch.Tensor:
    """One expert's checkpoint tensors -> its packed buffer `out` [numel] (in out's dtype)."""
    if fmt.to_sections is None:
        flat = torch.cat([t.reshape(-1).to(out.dtype) for t in tensors])
        if flat.numel() != out.numel():
            raise ValueError(f"expert tensors hold {flat.numel()} values, the packed layout {out.numel()}")
        return out.copy_(flat)
    sections = fmt.to_sections(spec, tensors)
    views = layout.sections(out)
    if [tuple(s.shape) for s in sections] != [tuple(v.shape) for v in views]:
        raise ValueError(f"expert conversion gave sections {[tuple(s.shape) for s in sections]}, the packed "
                         f"layout needs {[tuple(v.shape) for v in views]}")
    for view, section in zip(views, sections):
        view.copy_(section)
    return out
