"""oracle: replays a recorded routing trace as its forecast (an upper bound for profiling).

Run the same prompts, in the same order and with the same generation settings as when the
trace was recorded (`moe-engine trace`), and every forecast is exactly the routing that will
happen. The n-th sequence the engine shows it (by first appearance of its seq id) is the n-th
sequence of the trace; each step advances that sequence by the tokens it fed. Past the end of
a trace sequence, or for sequences beyond the trace, it forecasts nothing.

`predictor="oracle:TRACE.npz"` selects it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import PredictorUnavailable


class OraclePredictor:
    name = "oracle"

    def __init__(self, experts: np.ndarray, probs: np.ndarray, seq_offsets: np.ndarray):
        self.experts = np.asarray(experts, dtype=np.int64)          # [T, L, K]
        self.probs = np.asarray(probs, dtype=np.float32)            # [T, L, K]
        self.seq_offsets = np.asarray(seq_offsets, dtype=np.int64)  # [S+1]
        self.layers: list[int] = []
        self.num_experts = int(self.experts.max()) + 1 if self.experts.size else 0
        self._trace_seq: dict[int, int] = {}     # engine seq id -> trace sequence
        self._fed: dict[int, int] = {}           # trace sequence -> tokens consumed so far
        self._rows: np.ndarray | None = None     # trace row of each token in flight (-1: none)

    @classmethod
    def load(cls, path: str | Path) -> OraclePredictor:
        path = Path(path)
        if not path.is_file():
            raise PredictorUnavailable(f"oracle needs a routing trace; {path} does not exist "
                                       f"(record one with `moe-engine trace MODEL_DIR --prompts FILE --out {path.name}`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["experts"], z["probs"], z["seq_offsets"])
        except (KeyError, ValueError, OSError) as e:
            raise PredictorUnavailable(f"{path} is not a routing trace ({type(e).__name__}: {e}); it needs "
                                       f"experts, probs and seq_offsets arrays") from None

    @classmethod
    def from_model_dir(cls, model_dir) -> OraclePredictor:
        raise PredictorUnavailable("oracle replays a recorded trace: select it as predictor='oracle:TRACE.npz' "
                                   "(--predictor oracle:TRACE.npz)")

    def bind(self, routers, top_k: int, num_experts: int) -> None:
        self.layers = sorted(routers)
        if len(self.layers) != self.experts.shape[1] or top_k != self.experts.shape[2] \
                or self.num_experts > num_experts:
            raise PredictorUnavailable(
                f"the trace has {self.experts.shape[1]} layers x top-{self.experts.shape[2]} over "
                f"{self.num_experts} experts, the model {len(self.layers)} MoE layers x top-{top_k} over "
                f"{num_experts}; record the trace with this model")
        self.num_experts = num_experts
        self._pos = {m: i for i, m in enumerate(self.layers)}

    def observe(self, layer, router_input, experts, weights, token_ids=None, seq_ids=None) -> None:
        if layer != self.layers[0]:
            return
        seqs = np.zeros(experts.shape[0], dtype=np.int64) if seq_ids is None else seq_ids.cpu().numpy()
        rows = np.full(len(seqs), -1, dtype=np.int64)
        for i, s in enumerate(seqs.tolist()):
            t = self._trace_seq.setdefault(s, len(self._trace_seq))
            if t + 1 >= len(self.seq_offsets):
                continue
            k = self._fed.get(t, 0)
            self._fed[t] = k + 1
            row = self.seq_offsets[t] + k
            if row < self.seq_offsets[t + 1]:
                rows[i] = row
        self._rows = rows

    def predict(self, layer: int, depth: int) -> dict[int, torch.Tensor]:
        if self._rows is None:
            return {}
        pos = self._pos[layer]
        out = {}
        known = self._rows >= 0
        for target in self.layers[pos + 1: pos + 1 + depth]:
            scores = np.zeros((len(self._rows), self.num_experts), dtype=np.float32)
            r = self._rows[known]
            idx = np.nonzero(known)[0]
            scores[idx[:, None], self.experts[r, self._pos[target]]] = self.probs[r, self._pos[target]]
            out[target] = torch.from_numpy(scores)
        return out
