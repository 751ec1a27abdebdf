"""The MoE feed-forward block.

    [Router: logits -> select] -> observers -> [Experts: dispatch -> fetch -> compute -> combine] (+ shared)

Each stage is an object chosen once, when the engine is built, never per call: `select` (routing.py:
softmax top-k, the decode ops' fused one, or every other router kind) and `experts` (expert_compute.py:
the per-expert loop or the fused decode op, over the expert source the runtime binds). Routing
observers (experts.py) are told every routing decision before the experts run. Tokens that are
padding are not routed at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ACTIVATIONS, ExpertLayout, Observers
from .linear import Linear, LinearKernel
from .routing import make_selector
from .spec import MoeSpec


class GatedMlp(nn.Module):
    """Dense SwiGLU MLP (dense layers and the shared expert). Weights: gate/up [I, D], down [D, I]."""

    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.gate = Linear(hidden, inter, bias=False)
        self.up = Linear(hidden, inter, bias=False)
        self.down = Linear(inter, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def _unbound(layer: int, x, weights, ids):
    raise RuntimeError(f"the MoE block of layer {layer} has no experts: build the model with moe_engine.load() "
                       f"(runtime/build.py binds each block's expert source once)")


class MoeBlock(nn.Module):
    """Routed experts of one layer (through the `experts` strategy), plus an optional shared expert."""

    def __init__(self, layer: int, hidden: int, spec: MoeSpec, act: str):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.act = spec.expert_act or act          # a hidden_act name, or spec.ClampedSwiGlu (see experts.glu)
        self.layout = ExpertLayout(hidden, spec.intermediate_size, spec.expert_bias)
        self.router = Linear(hidden, spec.num_experts, bias=spec.router_bias)
        # DeepSeek-V3's selection bias [E]; kept in float32 whatever the model dtype (Decoder.cast)
        self.correction_bias = nn.Parameter(torch.zeros(spec.num_experts)) if spec.correction_bias else None
        self.shared = GatedMlp(hidden, spec.shared_intermediate_size, act) if spec.shared_intermediate_size else None
        self.shared_gate = Linear(hidden, 1, bias=False) if spec.shared_expert_gate else None
        self.select = make_selector(spec)          # logits, bias -> (weights, ids); Decoder.set_decode_ops may fuse it
        self.experts = _unbound                    # (layer, x, weights, ids) -> [N, D]: bound once by the build
        self.observers = Observers()               # the decoder's (Decoder.__init__ shares one object)
        self.linear: LinearKernel | None = None   # the routed experts' matmul (Decoder.set_linear_kernel); F.linear if None
        self.restrict: torch.Tensor | None = None # bool [E]: route only among these (speculative drafting); None: all
        self.unrestricted: list | None = None     # while restricted: each pass's (exact top-k, restricted ids) [N, K]

    @property
    def bound(self) -> bool:
        """The build has given the block its experts (Decoder.bind_experts)."""
        return self.experts is not _unbound

    def set_decode_ops(self, ops) -> None:
        """Routing through the decode ops' fused softmax top-k where it applies (None: torch)."""
        self.select = make_selector(self.spec, None if ops is None else ops.route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] (real tokens only) -> [N, D]."""
        logits = self._logits(x)                                             # [N, E]
        exact = None
        if self.restrict is not None:          # a cache-restricted draft: the others are out (weights renormalize)
            if self.unrestricted is not None:  # what the exact router would pick: the verify step's forecast
                biased = logits if self.correction_bias is None else logits.float() + self.correction_bias
                exact = torch.topk(biased, self.spec.top_k, dim=-1).indices
            logits = logits.masked_fill(~self.restrict.to(logits.device), float("-inf"))
        weights, ids = self.select(logits, self.correction_bias)             # [N, K] each
        if exact is not None:
            self.unrestricted.append((exact.cpu(), ids.cpu()))
        self.observers.observe(self.layer, x, ids, weights)
        scale = self.spec.routed_scaling_factor
        out = self.experts(self.layer, x, weights if scale == 1.0 else weights * scale, ids)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E]: in float32 when the spec says so (the router's weights upcast), else in x's dtype."""
        if self.spec.router_fp32:
            bias = self.router.bias.float() if self.router.bias is not None else None
            return F.linear(x.float(), self.router.weight.float(), bias)
        return self.router(x)
