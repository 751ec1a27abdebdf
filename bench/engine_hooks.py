"""Benchmark-only wrappers around a built engine (never used by moe_engine itself).

    replay_routing(engine, TRACE.npz)   every MoE block's router stage wrapped so its tokens take the routing
                                        recorded in a trace (expert ids folded onto this model's experts):
                                        offloading runs of a random checkpoint then see real routing locality.
                                        This changes the model's outputs: benchmarks of speed only.
    StepLog                             a routing observer keeping each layer's experts per forward step
                                        (what Belady's bound is computed over)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ReplaySelect:
    """A router stage (MoeBlock.select) that keeps the real router's weights and replays recorded expert ids."""

    def __init__(self, inner, layer: int, experts: np.ndarray, cursor: dict, top_k: int, num_experts: int):
        self.inner, self.layer, self.experts, self.cursor = inner, layer, experts, cursor
        self.top_k, self.num_experts = top_k, num_experts

    def __call__(self, logits: torch.Tensor, bias):
        weights, ids = self.inner(logits, bias)
        n = ids.shape[0]
        start = self.cursor.get(self.layer, 0)
        self.cursor[self.layer] = start + n
        rows = self.experts[np.arange(start, start + n) % len(self.experts), self.layer % self.experts.shape[1]]
        out = torch.empty_like(ids)
        for i, row in enumerate(rows):                             # [K_trace] -> K distinct ids of this model
            picked = list(dict.fromkeys(int(e) % self.num_experts for e in row))[:self.top_k]
            picked += [e for e in range(self.num_experts) if e not in picked][: self.top_k - len(picked)]
            out[i] = torch.tensor(picked)
        return weights, out


def replay_routing(engine, path: Path) -> None:
    """Layer l of the model takes trace layer l (mod the trace's layers), token t trace row t (mod its rows)."""
    experts = np.load(path)["experts"]                               # [T, L_trace, K_trace]
    moe, cursor = engine.spec.moe, {}
    for block in engine.decoder.moe_blocks():
        block.select = ReplaySelect(block.select, block.layer, experts, cursor, moe.top_k, moe.num_experts)


class StepLog:
    """Routing observer: log[layer] = the sorted experts of each forward step, in order."""

    def __init__(self, num_layers: int):
        self.log: list[list[list[int]]] = [[] for _ in range(num_layers)]

    def begin_step(self, token_ids, seq_ids) -> None:
        pass

    def observe(self, layer, router_input, experts, weights) -> None:
        self.log[layer].append(sorted(set(experts.flatten().tolist())))
