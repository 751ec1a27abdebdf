"""Packed expert layout, the expert FFN, and the seam through which the MoE block reaches its experts.

One expert is one contiguous 1-D buffer, so moving it between tiers is one copy:

    packed = [ gate  I x D | up  I x D | down  D x I ]      (row-major, the model dtype)

The MoE block never owns routed experts. It asks an `ExpertProvider` for the packed buffer of
(layer, expert); the provider decides where the bytes live and when they move. This module
defines the protocol only; implementations live in moe_engine/experts/.
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class ExpertLayout:
    """Where gate, up and down sit inside one packed expert of hidden size D and FFN width I."""

    hidden_size: int        # D
    intermediate_size: int  # I

    @property
    def numel(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * dtype.itemsize

    def gate_up(self, packed: torch.Tensor) -> torch.Tensor:
        """[2I, D] view: gate rows then up rows."""
        d, i = self.hidden_size, self.intermediate_size
        return packed[: 2 * i * d].view(2 * i, d)

    def down(self, packed: torch.Tensor) -> torch.Tensor:
        """[D, I] view."""
        d, i = self.hidden_size, self.intermediate_size
        return packed[2 * i * d:].view(d, i)

    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """gate, up [I, D] and down [D, I] -> packed [3 I D] (into `out` when given)."""
        d, i = self.hidden_size, self.intermediate_size
        if out is None:
            out = torch.empty(self.numel, dtype=gate.dtype, device=gate.device)
        out[: i * d].view(i, d).copy_(gate)
        out[i * d: 2 * i * d].view(i, d).copy_(up)
        out[2 * i * d:].view(d, i).copy_(down)
        return out

    def ffn(self, x: torch.Tensor, packed: torch.Tensor, act: str = "silu") -> torch.Tensor:
        """Run the expert stored in `packed` (quant.format.QuantLayout has the same method for quantized buffers)."""
        return expert_ffn(x, packed, self, act)


def expert_ffn(x: torch.Tensor, packed: torch.Tensor, layout: ExpertLayout, act: str = "silu") -> torch.Tensor:
    """SwiGLU-style expert: down(act(gate(x)) * up(x)). x [N, D] -> [N, D]."""
    gate_up = F.linear(x, layout.gate_up(packed))             # [N, 2I]
    gate, up = gate_up.split(layout.intermediate_size, dim=-1)
    return F.linear(ACTIVATIONS[act](gate) * up, layout.down(packed))


class ExpertProvider(Protocol):
    """What the MoE block needs from whoever holds the routed experts.

    `prepare` announces every expert a layer is about to use and how many tokens each gets (so
    loads can start together) and returns the compute order as (expert, on_host) pairs: on_host
    experts are computed where their bytes are, on the host CPU (hybrid execution); `get`
    returns one expert's packed buffer (on the compute device, or on the host for on_host
    experts), waiting for exactly it. `observe` reports the routing decision (for prediction
    and statistics); it must not change what the block computes.
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
