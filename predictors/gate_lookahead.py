"""gate-lookahead: a training-free cross-layer gate (Fate, AdapMoE, mixtral-offloading).

The hidden state entering layer L's router is a good stand-in for the one that will enter the
routers of layers L+1..L+D (the residual stream changes slowly), so applying those routers to
it now forecasts the next layers' routing before their attention has run.
"""
from __future__ import annotations

import torch


class GateLookahead:
    name = "gate-lookahead"

    def __init__(self) -> None:
        self.routers: dict[int, torch.Tensor] = {}     # layer -> [E, D]
        self.layers: list[int] = []
        self._hidden: torch.Tensor | None = None        # [N, D] router input of the last observed layer
        self._layer = -1

    def bind(self, routers: dict[int, torch.Tensor], top_k: int, num_experts: int) -> None:
        self.routers = dict(routers)
        self.layers = sorted(routers)

    def observe(self, layer, router_input, experts, weights, token_ids=None, seq_ids=None) -> None:
        self._hidden, self._layer = router_input, layer

    @torch.no_grad()
    def predict(self, layer: int, depth: int) -> dict[int, torch.Tensor]:
        if self._hidden is None or layer != self._layer:
            return {}
        ahead = [m for m in self.layers if m > layer][:depth]
        return {m: torch.softmax((self._hidden @ self.routers[m].T).float(), dim=-1) for m in ahead}   # [N, E]
