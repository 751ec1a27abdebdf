"""Packed expert layout, the expert FFN, and the seam through which the MoE block reaches its experts.

One expert is one contiguous 1-D buffer, so moving it between tiers is one copy:

    packed = [ gate  I x D | up  I x D | down  D x I ]      (row-major, the model dtype)
           (+ [ gate bias I | up bias I | down bias D ] when the experts have biases, GPT-OSS)

The MoE block never owns routed experts. Two seams connect it to whoever does, both set once when the
engine is built (runtime/build.py) and never replaced:

    ExpertSource      fetch(layer, experts, counts) -> LayerFetch: the layer's experts in compute order,
                      each with its packed buffer and where it is computed (implementations: experts/)
    RoutingObserver   begin_step(token ids, seq ids) and observe(layer, router input, experts, weights):
                      what each step routed; any number stack in one `Observers` (the cache's predictor
                      feed, trace recorders, the profiler, calibration, the serving loop's forecasts)

Observers only watch: nothing they do changes what the block computes. The block's expert-compute
strategy (expert_compute.py) is the one caller of `fetch`; a strategy backed by other processes
(expert parallelism) replaces it without touching the model.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
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


class LayerFetch:
    """One layer's routed experts as a source hands them to the MoE block.

    Iterating yields (expert, packed buffer, on_host) in compute order, device experts first; on_host
    experts (hybrid execution) are computed on the host CPU from their bytes in host RAM. `on_host` is
    known before any buffer is taken, so the block can copy those experts' tokens to the host before it
    queues device work. A buffer is valid until the next one is taken unless the source's buffers are
    stable (`ExpertSource.buffers_stable`): a cache may reuse a slot for the next expert.
    """

    __slots__ = ("order", "_get")

    def __init__(self, order: list[tuple[int, bool]], get: Callable[[int], torch.Tensor]):
        self.order = order                    # [(expert, on_host)] in compute order
        self._get = get                       # expert -> packed buffer (waits for exactly that expert)

    @property
    def on_host(self) -> bool:
        return any(host for _, host in self.order)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, bool]]:
        for e, host in self.order:
            yield e, self._get(e), host


class ExpertSource(Protocol):
    """What the MoE block needs from whoever holds the routed experts.

    `fetch` announces every expert a layer is about to use and how many tokens each gets (so loads can
    start together) and returns them in compute order (LayerFetch). `buffers_stable`: True when buffers
    never move or change while the engine runs (every expert resident), so a layer's experts may be
    taken together before any is computed.
    """

    buffers_stable: bool

    def fetch(self, layer: int, experts: Sequence[int], counts: Sequence[int]) -> LayerFetch: ...


class RoutingObserver(Protocol):
    """Told what each forward step routes. Must not change what the model computes."""

    def begin_step(self, token_ids: torch.Tensor, seq_ids: torch.Tensor) -> None:
        """A step starts: its real tokens' ids [N] and their sequences' ids [N], in the order the MoE blocks see them."""

    def observe(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """Layer `layer` routed the step's tokens: router input [N, D], experts [N, K], weights [N, K] (float32)."""


class Observers:
    """The routing observers of one decoder, called in the order they were added (they stack).

    The engine's build registers the expert cache's own observer first (it feeds the predictor that
    steers prefetching); recorders add themselves for as long as they record and remove themselves after.
    """

    def __init__(self, items: Sequence[RoutingObserver] = ()):
        self._items: list[RoutingObserver] = list(items)

    def add(self, observer: RoutingObserver) -> RoutingObserver:
        if any(o is observer for o in self._items):
            raise ValueError(f"{type(observer).__name__} is already observing this model")
        self._items = [*self._items, observer]          # copied, never mutated: a step may be iterating it
        return observer

    def remove(self, observer: RoutingObserver) -> None:
        """Stop calling `observer` (a no-op when it is not observing)."""
        self._items = [o for o in self._items if o is not observer]

    def __bool__(self) -> bool:
        return bool(self._items)

    @contextlib.contextmanager
    def muted(self):
        """No observer hears of the steps run inside (a speculative draft's restricted routing is not the model's);
        observers added meanwhile are kept."""
        items, self._items = self._items, []
        try:
            yield
        finally:
            self._items = items + self._items

    def __len__(self) -> int:
        return len(self._items)

    def begin_step(self, token_ids: torch.Tensor, seq_ids: torch.Tensor) -> None:
        for o in self._items:
            o.begin_step(token_ids, seq_ids)

    def observe(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        for o in self._items:
            o.observe(layer, router_input, experts, weights)
