"""The MoE feed-forward block.

    [Router] -> [Dispatch: sort tokens by expert] -> [Experts via provider] -> [Combine: weighted sum]
       (+ shared expert, optionally gated by sigmoid, added on top)

Routing (softmax in float32, top-k, optional renormalization) is done here, other router kinds
(sigmoid, grouped top-k, correction bias, sparsemixer) in routing.py; the expert weights come from
an ExpertProvider. Tokens that are padding are not routed at all.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ACTIVATIONS, ExpertLayout, ExpertProvider
from .linear import Linear, LinearKernel
from .routing import select_experts
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


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, K] float32, expert ids [N, K] int64)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoeBlock(nn.Module):
    """Routed experts of one layer (through `provider`), plus an optional shared expert."""

    def __init__(self, layer: int, hidden: int, spec: MoeSpec, act: str):
        super().__init__()
        self.layer = layer
        self.spec = spec
        self.act = spec.expert_act or act          # a hidden_act name, or spec.ClampedSwiGlu (see experts.glu)
        self.layout = ExpertLayout(hidden, spec.intermediate_size, spec.expert_bias)
        self.expert_layouts: list | None = None    # per-expert layouts (quantized experts, set by the runtime)
        self.router = Linear(hidden, spec.num_experts, bias=spec.router_bias)
        # DeepSeek-V3's selection bias [E]; kept in float32 whatever the model dtype (Decoder.cast)
        self.correction_bias = nn.Parameter(torch.zeros(spec.num_experts)) if spec.correction_bias else None
        self.shared = GatedMlp(hidden, spec.shared_intermediate_size, act) if spec.shared_intermediate_size else None
        self.shared_gate = Linear(hidden, 1, bias=False) if spec.shared_expert_gate else None
        self.provider: ExpertProvider | None = None
        self.linear: LinearKernel | None = None   # the routed experts' matmul (Decoder.set_linear_kernel); F.linear if None
        self.ops = None            # decode ops (Decoder.set_decode_ops): ops.moe_experts runs a few tokens' experts
        self.routing_hook = None   # benchmarks only: (layer, weights, ids) -> (weights, ids) replays recorded routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] (real tokens only) -> [N, D]."""
        weights, ids = self._route(x)                                  # [N, K] each
        if self.routing_hook is not None:    # changes the model's outputs: never set outside benchmarks
            weights, ids = self.routing_hook(self.layer, weights, ids)
        self.provider.observe(self.layer, x, ids, weights)
        scale = self.spec.routed_scaling_factor
        out = self._routed(x, weights if scale == 1.0 else weights * scale, ids)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        if spec.router_fp32:
            bias = self.router.bias.float() if self.router.bias is not None else None
            logits = F.linear(x.float(), self.router.weight.float(), bias)          # [N, E]
        else:
            logits = self.router(x)
        if spec.scoring == "softmax" and spec.n_group == 1 and self.correction_bias is None:
            if self.ops is not None and logits.dtype == torch.bfloat16 and logits.is_cpu:
                return self.ops.route(logits, spec.top_k, spec.norm_topk_prob)
            return route(logits, spec.top_k, spec.norm_topk_prob)
        return select_experts(logits, spec, self.correction_bias)

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() <= 64:        # a few tokens (decode): counting in Python beats a bincount
            flat = ids.flatten().tolist()
            used = sorted(set(flat))
            counts = [flat.count(e) for e in used]
        else:
            counts = torch.bincount(ids.flatten(), minlength=self.spec.num_experts).tolist()
            used = [e for e, c in enumerate(counts) if c]
            counts = [counts[e] for e in used]
        plan = self.provider.prepare(self.layer, used, counts)        # [(expert, on_host)]
        get = functools.partial(self.provider.get, self.layer)
        if self._fusable(x, plan):
            return self._routed_fused(x, weights, ids, [e for e, _ in plan], get)
        return self._routed_loop(x, weights, ids, plan, get, dict(zip(used, counts)))

    def _fusable(self, x: torch.Tensor, plan) -> bool:
        """The decode ops take this layer's experts: plain SwiGLU bf16 experts on the CPU, few tokens, none on
        the host."""
        return (self.ops is not None and x.shape[0] <= self.ops.max_expert_tokens and self.expert_layouts is None
                and not self.layout.bias and self.act in ("silu", "swish") and x.dtype == torch.bfloat16
                and x.is_cpu and not any(on_host for _, on_host in plan))

    def _routed_fused(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: list[int],
                      get) -> torch.Tensor:
        """The experts through the decode ops: one call for the layer when the provider's buffers never move
        (`buffers_stable`), else one call per expert right after its get(), as the loop does (a cache may reuse a
        slot for the next expert it is asked for)."""
        inter = self.spec.intermediate_size
        if getattr(self.provider, "buffers_stable", False):
            packed = [get(e) for e in experts]
            if all(_flat_bf16(p) for p in packed):
                return self.ops.moe_experts(x, weights, ids, experts, packed, inter)
            get = dict(zip(experts, packed)).__getitem__
        acc = torch.zeros(x.shape, dtype=torch.float32)                # [N, D]
        for e in experts:
            packed = get(e)
            if _flat_bf16(packed):
                self.ops.moe_experts(x, weights, ids, [e], [packed], inter, acc)
            else:
                tok, slot = (ids == e).nonzero(as_tuple=True)
                y = self.layout.ffn(x[tok], packed, self.act, linear=self.linear)
                acc.index_add_(0, tok, y.float() * weights[tok, slot, None])
        return acc.to(x.dtype)

    def _routed_loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, plan, get,
                     counts: dict[int, int]) -> torch.Tensor:
        """counts: tokens per used expert (as _routed counted them for prepare)."""
        n, k = ids.shape
        order = ids.flatten().argsort(stable=True)                     # [N*K] slots sorted by expert id
        starts, start = {}, 0
        for e in sorted(counts):
            starts[e], start = start, start + counts[e]
        token_of = order // k                                          # token index of each sorted slot
        weight_of = weights.flatten()[order]                           # [N*K] float32
        x_host = x.cpu() if any(on_host for _, on_host in plan) else None   # before device work is queued
        out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
        for e, on_host in sorted(plan, key=lambda p: p[1]):           # device experts first, host ones overlap
            sel = slice(starts[e], starts[e] + counts[e])
            tok = token_of[sel]
            packed = get(e)
            xe = x_host[tok.cpu()] if on_host else x[tok]
            layout = self.layout if self.expert_layouts is None else self.expert_layouts[e]
            y = layout.ffn(xe, packed, self.act, linear=self.linear).to(x.device)   # [c, D]
            out.index_add_(0, tok, y.float() * weight_of[sel, None])
        return out.to(x.dtype)


def _flat_bf16(packed: torch.Tensor) -> bool:
    return packed.dtype == torch.bfloat16 and packed.is_cpu and packed.is_contiguous()
