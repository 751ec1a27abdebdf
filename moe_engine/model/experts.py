"""Packed expert layout, the expert FFN, and the seam through which the MoE block reaches its experts.

One expert is one contiguous 1-D buffer, so moving it between tiers is one copy:

    packed = [ gate  I x D | up  I x D | down  D x I ]      (row-major, the model dtype)
           (+ [ gate bias I | up bias I | down bias D ] when the experts have biases, GPT-OSS)

The MoE block never owns routed experts. It asks an `ExpertProvider` for the packed buffer of
(layer, expert); the provider decides where the bytes live and when they move. This module
defines the protocol only; implementations live in moe_engine/experts/.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def glu(gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """The gated activation of an expert: act(gate) * up for a named activation (str), or GPT-OSS's
    clamped SwiGLU for a spec.ClampedSwiGlu. gate, up [N, I] -> [N, I]."""
    if isinstance(act, str):
        return ACTIVATIONS[act](gate) * up
    gate = gate.clamp(max=act.limit)
    up = up.clamp(-act.limit, act.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))


@dataclass(frozen=True)
class ExpertLayout:
    """Where gate, up and down (and their biases, if any) sit inside one packed expert of hidden size D and FFN width I."""

    hidden_size: int        # D
    intermediate_size: int  # I
    bias: bool = False      # biases appended: gate [I], up [I], down [D]

    @classmethod
    def of(cls, spec) -> "ExpertLayout":
        """The layout of a model.spec.ModelSpec's routed experts."""
        return cls(spec.hidden_size, spec.moe.intermediate_size, spec.moe.expert_bias)

    @property
    def numel(self) -> int:
        d, i = self.hidden_size, self.intermediate_size
        return 3 * d * i + (2 * i + d if self.bias else 0)

    @property
    def section_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the sections in packed order: gate [I, D], up [I, D], down [D, I] (+ biases [I], [I], [D])."""
        d, i = self.hidden_size, self.intermediate_size
        return [(i, d), (i, d), (d, i)] + ([(i,), (i,), (d,)] if self.bias else [])

    def sections(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Views of each section of `packed`, in the order of section_shapes."""
        out, pos = [], 0
        for shape in self.section_shapes:
            n = math.prod(shape)
            out.append(packed[pos:pos + n].view(shape))
            pos += n
        return out

    def biases(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """(gate_up bias [2I], down bias [D]) views, or (None, None) without biases."""
        if not self.bias:
            return None, None
        d, i = self.hidden_size, self.intermediate_size
        start = 3 * d * i
        return packed[start:start + 2 * i], packed[start + 2 * i:start + 2 * i + d]

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * dtype.itemsize

    def gate_up(self, packed: torch.Tensor) -> torch.Tensor:
        """[2I, D] view: gate rows then up rows."""
        d, i = self.hidden_size, self.intermediate_size
        return packed[: 2 * i * d].view(2 * i, d)

    def down(self, packed: torch.Tensor) -> torch.Tensor:
        """[D, I] view."""
        d, i = self.hidden_size, self.intermediate_size
        return packed[2 * i * d:3 * i * d].view(d, i)

    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             out: torch.Tensor | None = None, biases: tuple | None = None) -> torch.Tensor:
        """gate, up [I, D] and down [D, I] (+ biases (gate [I], up [I], down [D])) -> packed (into `out` when given)."""
        if out is None:
            out = torch.empty(self.numel, dtype=gate.dtype, device=gate.device)
        parts = [gate, up, down] + list(biases or ())
        if len(parts) != len(self.section_shapes):
            raise ValueError(f"an expert layout with bias={self.bias} packs {len(self.section_shapes)} tensors, "
                             f"got {len(parts)}")
        for view, t in zip(self.sections(out), parts):
            view.copy_(t)
        return out

    def ffn(self, x: torch.Tensor, packed: torch.Tensor, act="silu", linear=None) -> torch.Tensor:
        """Run the expert stored in `packed` (quant.format.QuantLayout has the same method for quantized buffers);
        linear: the matmul kernel (see linear.py), F.linear if None."""
        return expert_ffn(x, packed, self, act, linear)


def expert_ffn(x: torch.Tensor, packed: torch.Tensor, layout: ExpertLayout, act="silu", linear=None) -> torch.Tensor:
    """SwiGLU-style expert: down(glu(gate(x), up(x))) (+ biases). x [N, D] -> [N, D]; act: see glu;
    linear(x, weight, bias): the matmul (F.linear if None)."""
    linear = linear or F.linear
    b_gate_up, b_down = layout.biases(packed)
    gate_up = linear(x, layout.gate_up(packed), b_gate_up)   # [N, 2I]
    gate, up = gate_up.split(layout.intermediate_size, dim=-1)
    return linear(glu(gate, up, act), layout.down(packed), b_down)


class ExpertProvider(Protocol):
    """What the MoE block needs from whoever holds the routed experts.

    `prepare` announces every expert a layer is about to use and how many tokens each gets (so
    loads can start together) and returns the compute order as (expert, on_host) pairs: on_host
    experts are computed where their bytes are, on the host CPU (hybrid execution); `get`
    returns one expert's packed buffer (on the compute device, or on the host for on_host
    experts), waiting for exactly it. `observe` reports the routing decision (for prediction
    and statistics); it must not change what the block computes.

    Optional attribute `buffers_stable` (default False): True when buffers returned by `get` never move or
    change while the engine runs (every expert resident), so the block may fetch all of a layer's experts
    before computing any; otherwise it uses each buffer right after its `get`, as a cache may reuse a slot for
    the next expert it is asked for.
    """

    def prepare(self, layer: int, experts: Sequence[int],
                counts: Sequence[int] | None = None) -> list[tuple[int, bool]]: ...

    def get(self, layer: int, expert: int) -> torch.Tensor: ...

    def observe(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> None: ...


class ForwardingProvider:
    """An ExpertProvider proxy that passes every call to `inner`; subclasses watch what goes by.

    Recorders (routing traces, calibration, serving forecasts) override `begin_step` / `observe`
    and call super() so the real provider still sees everything; other attributes (stats(),
    nbytes(), capacity_experts, ...) are the inner provider's.
    """

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def begin_step(self, token_ids: torch.Tensor, seq_ids: torch.Tensor) -> None:
        begin = getattr(self.inner, "begin_step", None)
        if begin is not None:
            begin(token_ids, seq_ids)

    def observe(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        self.inner.observe(layer, router_input, experts, weights)

    def prepare(self, layer: int, experts: Sequence[int], counts: Sequence[int] | None = None):
        return self.inner.prepare(layer, experts, counts)

    def get(self, layer: int, expert: int) -> torch.Tensor:
        return self.inner.get(layer, expert)
