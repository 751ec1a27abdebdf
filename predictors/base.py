"""The ExpertPredictor protocol: what the engine tells a predictor and what it asks of it.

Predictions only steer loading (which experts to prefetch and which to keep); they never change
which experts the model uses or what it computes. A predictor that raises or answers with the
wrong shape or non-finite scores is switched off by the engine (one warning) and replaced by
the default predictor.

Calls, per forward step of the engine (a prefill of N prompt tokens, or a decode step of one
token per running sequence), for each MoE layer in order:

    observe(layer, router_input [N, D], experts [N, K], weights [N, K], token_ids [N], seq_ids [N])
    predict(layer, depth) -> {later MoE layer: scores [N, E]}      (up to `depth` layers ahead)

`layer` is the decoder layer index; `bind` receives the router weights keyed by those indices,
so `sorted(routers)` lists the MoE layers. Scores are per token in flight: higher means the
token is more likely to be routed to that expert (probabilities are fine, so are logits). Seq
ids are unique per sequence for the engine's lifetime. When a trace is replayed
(`predictors.evaluate.replay`) layers are trace positions 0..L-1, router weights and router
inputs may be None, and each step is one decode token per sequence.

Construction: built-ins and plug-ins are classes (or factories). If the class has a
`from_model_dir(model_dir)` classmethod the engine calls it (trained predictors read their
weights stored beside the model); otherwise it calls the class with no arguments.
"""
from __future__ import annotations

from typing import Protocol

import torch


class PredictorUnavailable(ValueError):
    """A predictor cannot be built for this model (e.g. not trained yet); the message says how to fix it."""


class ExpertPredictor(Protocol):
    name: str

    def bind(self, routers: dict[int, torch.Tensor | None], top_k: int, num_experts: int) -> None:
        """Called once: router weights [E, D] of every MoE layer (by layer index)."""

    def observe(self, layer: int, router_input: torch.Tensor | None, experts: torch.Tensor, weights: torch.Tensor,
                token_ids: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None) -> None:
        """Layer `layer` routed its tokens: router input [N, D], chosen experts [N, K] and weights [N, K]."""

    def predict(self, layer: int, depth: int) -> dict[int, torch.Tensor]:
        """Scores [N, E] for the MoE layers after `layer`, up to `depth` of them, for the tokens just observed."""
