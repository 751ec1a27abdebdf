"""The ExpertPredictor protocol: what the engine tells a predictor and what it asks of it.

Predictions only steer loading (which experts to prefetch and which to keep); they never change
which experts the model uses or what it computes. Scores are per token in flight: higher means
the token is more likely to be routed to that expert.
"""
from __future__ import annotations

from typing import Protocol

import torch


class ExpertPredictor(Protocol):
    name: str

    def bind(self, routers: dict[int, torch.Tensor], top_k: int, num_experts: int) -> None:
        """Called once: router weights [E, D] of every MoE layer (by layer index)."""

    def observe(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                token_ids: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None) -> None:
        """Layer `layer` routed its tokens: router input [N, D], chosen experts [N, K] and weights [N, K]."""

    def predict(self, layer: int, depth: int) -> dict[int, torch.Tensor]:
        """Scores [N, E] for the MoE layers after `layer`, up to `depth` of them, for the tokens just observed."""
