"""How good is a predictor: recall@k per layer and lookahead, live or by replaying a trace.

recall@k at lookahead d for layer m = the share of the experts layer m actually used that were
among the k highest-scored experts predicted for layer m when layer m - d ran (in MoE-layer
positions), over the same tokens. k = top_k and 2 x top_k by default.

`RecallMeter` is fed what a predictor forecast and what then happened; the engine uses it live,
`replay` drives a predictor over a recorded trace (decode-style: every sequence advances one
token per step, the sequences of the trace run side by side as one batch).
"""
from __future__ import annotations

import numpy as np
import torch


class RecallMeter:
    def __init__(self, layers: list[int], depth: int, ks: tuple[int, ...]):
        self.layers = list(layers)                    # MoE layer ids in order (decoder indices or trace positions)
        self.pos = {m: i for i, m in enumerate(self.layers)}
        self.depth, self.ks = depth, tuple(ks)
        self.hits = np.zeros((len(self.layers), depth, len(self.ks)), dtype=np.int64)    # [L, D, k]
        self.total = np.zeros((len(self.layers), depth), dtype=np.int64)                 # used experts counted
        self._pending: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def forecast(self, layer: int, predictions: dict[int, torch.Tensor]) -> None:
        """Scores [N, E] the predictor gave at `layer` for later layers (same N tokens as `layer`)."""
        src = self.pos[layer]
        for target, scores in predictions.items():
            d = self.pos.get(target, -1) - src
            if 1 <= d <= self.depth:
                k = min(max(self.ks), scores.shape[-1])
                top = torch.topk(scores.float(), k, dim=-1).indices          # [N, k], best first
                self._pending.setdefault(target, []).append((d, top))

    def actual(self, layer: int, experts: torch.Tensor) -> None:
        """Experts [N, K] layer `layer` used; settles the forecasts made for it."""
        pending = self._pending.pop(layer, [])
        li = self.pos[layer]
        experts = experts.long()
        for d, top in pending:
            if top.shape[0] != experts.shape[0]:
                continue                                  # a different set of tokens: not comparable
            self.total[li, d - 1] += experts.numel()
            for j, k in enumerate(self.ks):
                hit = (experts[:, :, None] == top[:, None, :k]).any(-1)          # [N, K]
                self.hits[li, d - 1, j] += int(hit.sum())

    def recall(self) -> np.ndarray:
        """[L, D, len(ks)] recall (NaN where nothing was forecast)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits / self.total[:, :, None]

    def summary(self) -> dict:
        """JSON-ready: overall and per-layer recall per lookahead and k."""
        rec = self.recall()
        out = {"ks": list(self.ks), "lookahead": list(range(1, self.depth + 1)), "recall": {}, "per_layer_recall": {}}
        for j, k in enumerate(self.ks):
            for d in range(self.depth):
                key = f"k{k}_d{d + 1}"
                tot = self.total[:, d].sum()
                out["recall"][key] = float(self.hits[:, d, j].sum() / tot) if tot else None
                out["per_layer_recall"][key] = [None if np.isnan(v) else float(v) for v in rec[:, d, j]]
        return out


def replay(predictor, experts: np.ndarray, probs: np.ndarray, seq_offsets: np.ndarray, depth: int,
           ks: tuple[int, ...] | None = None, token_ids: np.ndarray | None = None,
           router_inputs: np.ndarray | None = None, routers: dict | None = None,
           num_experts: int | None = None, batch: int = 256) -> RecallMeter:
    """Drive `predictor` over a trace decode-style and measure its recall.

    experts/probs [T, L, K]; router_inputs [T, L, D] when the predictor needs hidden states
    (then `routers` {position: [E, D]} too). Layers are trace positions 0..L-1. Sequences run
    `batch` at a time; at each step every live sequence feeds one token through all layers.
    """
    _, n_layers, top_k = experts.shape
    num_experts = num_experts or int(experts.max()) + 1
    ks = ks or (top_k, 2 * top_k)
    predictor.bind(routers if routers is not None else {m: None for m in range(n_layers)}, top_k, num_experts)
    meter = RecallMeter(list(range(n_layers)), depth, ks)
    n_seq = len(seq_offsets) - 1
    for first in range(0, n_seq, batch):
        seqs = np.arange(first, min(first + batch, n_seq))
        starts, lens = seq_offsets[seqs], seq_offsets[seqs + 1] - seq_offsets[seqs]
        for t in range(int(lens.max(initial=0))):
            live = t < lens
            rows = starts[live] + t
            sid = torch.from_numpy(seqs[live].astype(np.int64))
            tok = None if token_ids is None else torch.from_numpy(token_ids[rows].astype(np.int64))
            for m in range(n_layers):
                ex = torch.from_numpy(experts[rows, m].astype(np.int64))
                w = torch.from_numpy(probs[rows, m].astype(np.float32))
                h = None if router_inputs is None else torch.from_numpy(router_inputs[rows, m].astype(np.float32))
                meter.actual(m, ex)
                predictor.observe(m, h, ex, w, tok, sid)
                meter.forecast(m, predictor.predict(m, depth))
    return meter
