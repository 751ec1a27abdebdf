"""Expert selection for every router kind: router logits [N, E] -> (weights [N, K] float32, ids [N, K] int64).

    scores     softmax(logits)                 Mixtral, Qwen, OLMoE, DeepSeek-V2
               sigmoid(logits)                 DeepSeek-V3
    choose     top-k of (scores + correction bias), within the topk_group best of n_group groups
    weigh      the chosen experts' scores (never the bias), optionally renormalized to sum to 1

    sparsemixer (Phi-MoE at inference): K rounds; each picks the best remaining expert and weighs it by a
    softmax over the experts whose logits lie within a relative margin 2 * jitter_eps of it.

All math is float32. The routed scaling factor is not applied here: the MoE block scales the combined
routed output, so the weights reported to routing observers stay probabilities.

`make_selector` picks the rule of a spec once, when the model is built: plain softmax top-k (the fused C
op of the decode ops for a bf16 model on the CPU, else torch), or `select_experts` for every other kind.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .spec import MoeSpec

# logits [N, E], correction bias [E] or None -> (weights [N, K] float32, ids [N, K] int64)
Selector = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def softmax_top_k(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, K] float32, expert ids [N, K] int64): softmax in float32, top-k,
    optionally renormalized (Mixtral, Qwen, OLMoE)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def make_selector(spec: MoeSpec, fused_route=None) -> Selector:
    """The selection rule of `spec`. fused_route(logits, k, normalize): the decode ops' softmax top-k, taken
    for plain softmax routers whose logits are not computed in float32 (a bf16 model's)."""
    if spec.scoring == "softmax" and spec.n_group == 1 and not spec.correction_bias:
        if fused_route is not None and not spec.router_fp32:
            return lambda logits, bias: fused_route(logits, spec.top_k, spec.norm_topk_prob)
        return lambda logits, bias: softmax_top_k(logits, spec.top_k, spec.norm_topk_prob)
    return functools.partial(_select, spec=spec)


def _select(logits: torch.Tensor, bias: torch.Tensor | None, spec: MoeSpec):
    return select_experts(logits, spec, bias)


def select_experts(logits: torch.Tensor, spec: MoeSpec,
                   correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, K] float32, expert ids [N, K] int64), per `spec`."""
    logits = logits.float()
    if spec.scoring == "sparsemixer":
        return sparsemixer(logits, spec.top_k, spec.jitter_eps)
    scores = torch.sigmoid(logits) if spec.scoring == "sigmoid" else torch.softmax(logits, dim=-1)   # [N, E]
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if spec.n_group > 1:
        choice = mask_groups(choice, spec.n_group, spec.topk_group, spec.group_score_top)
    ids = torch.topk(choice, spec.top_k, dim=-1).indices                                            # [N, K]
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def mask_groups(choice: torch.Tensor, n_group: int, topk_group: int, score_top: int) -> torch.Tensor:
    """choice [N, E] -> the same with every expert outside the topk_group best groups set to -inf.

    A group's score is the sum of its best `score_top` choice values (1: its maximum, DeepSeek-V2;
    2: DeepSeek-V3).
    """
    n, e = choice.shape
    grouped = choice.view(n, n_group, e // n_group)                                  # [N, G, E/G]
    group_scores = grouped.topk(score_top, dim=-1).values.sum(dim=-1)                # [N, G]
    best = torch.topk(group_scores, topk_group, dim=-1).indices                      # [N, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [N, G]
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)


def sparsemixer(logits: torch.Tensor, top_k: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-MoE's inference routing. logits [N, E] float32 -> (weights [N, K], ids [N, K]).

    Round r takes the best expert not yet chosen (logit m); its weight is its softmax probability
    among the remaining experts whose logits x satisfy (m - x) / max(|x|, m) <= 2 * jitter_eps.
    """
    remaining = logits
    weights, ids = [], []
    for _ in range(top_k):
        top, idx = remaining.max(dim=-1, keepdim=True)                              # [N, 1] each
        factor = logits.abs().clamp(min=top)
        outside = (top - logits) / factor > 2 * jitter_eps                          # [N, E]
        gates = torch.softmax(remaining.masked_fill(outside, float("-inf")), dim=-1)
        weights.append(gates.gather(-1, idx))
        ids.append(idx)
        remaining = remaining.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)
