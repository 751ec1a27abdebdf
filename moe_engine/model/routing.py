"""Expert selection for every router kind: router logits [N, E] -> (weights [N, K] float32, ids [N, K] int64).

    scores     softmax(logits)                 Mixtral, Qwen, OLMoE, DeepSeek-V2
               sigmoid(logits)                 DeepSeek-V3
    choose     top-k of (scores + correction bias), within the topk_group best of n_group groups
    weigh      the chosen experts' scores (never the bias), optionally renormalized to sum to 1

    sparsemixer (Phi-MoE at inference): K rounds; each picks the best remaining expert and weighs it by a
    softmax over the experts whose logits lie within a relative margin 2 * jitter_eps of it.

All math is float32. The routed scaling factor is not applied here: the MoE block scales the combined
routed output, so the weights reported to the expert provider stay probabilities.
"""
from __future__ import annotations

import torch

from .spec import MoeSpec


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
