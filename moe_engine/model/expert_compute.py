"""How a MoE layer's tokens meet its routed experts: one strategy per block, chosen when the engine is built.

    ids [N, K] --dispatch--> used experts, tokens per expert --source.fetch--> LayerFetch (compute order)
        ExpertLoop     per expert: gather its tokens, run it (dense or quantized layout; on the host CPU for
                       on_host experts), weight, add into a float32 [N, D]        (the readable reference)
        FusedExperts   the decode ops' one call for the layer (bf16 or quantized SwiGLU experts on the CPU, few
                       tokens); larger batches (prefill) go through its ExpertLoop

Both match the definition out = sum_k weight[n, k] * expert_{ids[n, k]}(x[n]) up to float32 summation
order. Which strategy a block gets (runtime/build.py): FusedExperts when the decode ops run and the
experts are SwiGLU without biases, bf16 (ops.moe_experts) or quantized (ops.moe_experts_quant), else an
ExpertLoop with the model's dense layout, the quantized experts' per-expert layouts, or hybrid execution
when a host tier may compute misses. A
strategy holds its ExpertSource; one backed by other processes (expert parallelism) slots in here.
Imports torch only.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .experts import ExpertLayout, ExpertSource, LayerFetch, expert_ffn


def dispatch(ids: torch.Tensor, num_experts: int) -> tuple[list[int], list[int]]:
    """ids [N, K] -> (the experts used, in id order; tokens routed to each)."""
    if ids.numel() <= 64:        # a few tokens (decode): counting in Python beats a bincount
        flat = ids.flatten().tolist()
        used = sorted(set(flat))
        return used, [flat.count(e) for e in used]
    counts = torch.bincount(ids.flatten(), minlength=num_experts).tolist()
    used = [e for e, c in enumerate(counts) if c]
    return used, [counts[e] for e in used]


# ffn(expert, x [c, D], packed buffer) -> [c, D]: one expert over its buffer, on x's device
ExpertFfn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def dense_ffn(layout: ExpertLayout, act, linear=None) -> ExpertFfn:
    """Experts stored in the model dtype (ExpertLayout); linear: the matmul kernel (F.linear if None)."""
    return lambda e, x, packed: expert_ffn(x, packed, layout, act, linear)


class ExpertLoop:
    """One expert at a time, any layout (ffn: dense_ffn, or the quantized experts' ffn the build binds with
    each expert's width), on the device or, for on_host experts, on the host CPU."""

    def __init__(self, source: ExpertSource, num_experts: int, ffn: ExpertFfn):
        self.source, self.num_experts, self.ffn = source, num_experts, ffn

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights [N, K] float32 (scaled), ids [N, K] -> [N, D] in x's dtype."""
        used, counts = dispatch(ids, self.num_experts)
        return self.run(x, weights, ids, self.source.fetch(layer, used, counts), dict(zip(used, counts)))

    def run(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, fetch: LayerFetch,
            counts: dict[int, int]) -> torch.Tensor:
        """The loop over a fetch already made; counts: tokens per used expert (as dispatched)."""
        n, k = ids.shape
        order = ids.flatten().argsort(stable=True)                     # [N*K] slots sorted by expert id
        starts, start = {}, 0
        for e in sorted(counts):
            starts[e], start = start, start + counts[e]
        token_of = order // k                                          # token index of each sorted slot
        weight_of = weights.flatten()[order]                           # [N*K] float32
        x_host = x.cpu() if fetch.on_host else None                    # before device work is queued
        out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
        for e, packed, on_host in fetch:                               # device experts first, host ones overlap
            sel = slice(starts[e], starts[e] + counts[e])
            tok = token_of[sel]
            xe = x_host[tok.cpu()] if on_host else x[tok]
            y = self.ffn(e, xe, packed).to(x.device)                  # [c, D]
            out.index_add_(0, tok, y.float() * weight_of[sel, None])
        return out.to(x.dtype)


# fused(x [N, D], weights, ids, experts, buffers, acc [N, D] float32 | None) -> [N, D] in x's dtype, or acc with
# the experts' weighted outputs added: one C call over a layer's (or one) expert buffers
FusedCall = Callable[..., torch.Tensor]


class FusedExperts:
    """The decode ops' routed experts for up to `max_tokens` tokens on the CPU: one call for the layer when the
    source's buffers never move, else one call per expert right after it is taken (a cache may reuse a slot for
    the next expert); more tokens, and buffers `fits` rejects, go through `loop`."""

    def __init__(self, loop: ExpertLoop, fused: FusedCall, fits: Callable[[torch.Tensor], bool], max_tokens: int):
        self.loop, self.fused, self.fits, self.max_tokens = loop, fused, fits, max_tokens
        self.source = loop.source

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        used, counts = dispatch(ids, self.loop.num_experts)
        fetch = self.source.fetch(layer, used, counts)
        if x.shape[0] > self.max_tokens:
            return self.loop.run(x, weights, ids, fetch, dict(zip(used, counts)))
        experts = [e for e, _ in fetch.order]
        if self.source.buffers_stable:
            packed = [p for _, p, _ in fetch]
            if all(self.fits(p) for p in packed):
                return self.fused(x, weights, ids, experts, packed, None)
            pairs = zip(experts, packed, [False] * len(experts))
        else:
            pairs = iter(fetch)
        acc = torch.zeros(x.shape, dtype=torch.float32)                # [N, D]
        for e, packed, _ in pairs:
            if self.fits(packed):
                self.fused(x, weights, ids, [e], [packed], acc)
            else:
                tok, slot = (ids == e).nonzero(as_tuple=True)
                y = self.loop.ffn(e, x[tok], packed)
                acc.index_add_(0, tok, y.float() * weights[tok, slot, None])
        return acc.to(x.dtype)


def flat_cpu(dtype: torch.dtype) -> Callable[[torch.Tensor], bool]:
    """A FusedExperts `fits` test: a contiguous CPU buffer of `dtype` (bf16 experts; uint8 quantized ones)."""
    return lambda packed: packed.dtype == dtype and packed.is_cpu and packed.is_contiguous()
