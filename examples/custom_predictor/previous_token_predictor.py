"""An example plug-in predictor: "the next token will use the experts this sequence's last token used".

Temporal reuse is the simplest expert-path signal (consecutive tokens of a sequence often share
experts). This file shows everything a plug-in needs: a class with `bind`, `observe` and
`predict` (see predictors/base.py in moe-engine), importable by the engine.

Use it in any of three ways:
    moe-engine generate --predictor previous_token_predictor:PreviousTokenPredictor ...   (on PYTHONPATH)
    pip install examples/custom_predictor  ->  --predictor previous-token                  (entry point)
    moe_engine.load(predictor=PreviousTokenPredictor())                                     (an object)
"""
from __future__ import annotations

import torch


class PreviousTokenPredictor:
    name = "previous-token"

    def __init__(self, max_sequences: int = 1024):
        self.max_sequences = max_sequences
        self.layers: list[int] = []
        self.num_experts = 0
        self.last: dict[int, dict[int, torch.Tensor]] = {}   # seq id -> layer -> experts [K] of its last token
        self._seqs: list[int] = []

    def bind(self, routers, top_k: int, num_experts: int) -> None:
        self.layers, self.num_experts = sorted(routers), num_experts

    def observe(self, layer, router_input, experts, weights, token_ids=None, seq_ids=None) -> None:
        seqs = [0] * experts.shape[0] if seq_ids is None else seq_ids.tolist()
        self._seqs = seqs
        for row, s in enumerate(seqs):                        # the last row of a sequence is its latest token
            self.last.setdefault(s, {})[layer] = experts[row]
        while len(self.last) > self.max_sequences:            # forget the oldest sequences
            self.last.pop(next(iter(self.last)))

    def predict(self, layer: int, depth: int) -> dict[int, torch.Tensor]:
        ahead = [m for m in self.layers if m > layer][:depth]
        out = {}
        for m in ahead:
            scores = torch.zeros(len(self._seqs), self.num_experts)          # [N, E]
            for row, s in enumerate(self._seqs):
                used = self.last.get(s, {}).get(m)
                if used is not None:
                    scores[row, used] = 1.0
            out[m] = scores
        return out
