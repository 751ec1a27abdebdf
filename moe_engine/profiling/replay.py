"""Replay a routing trace through the engine's own SlotTable and eviction policy objects.

Demand loading: at each step (token) and layer, the experts the trace routed to are looked up in
the slot table; each miss is one load and takes a slot (the policy picks a victim when the layer
is full; experts of the current step are protected). Optionally every sequence starts with an
empty cache (`reset`), and a scorer supplies predictor-like scores to the policy. The result
carries Belady's loads at the same per-layer quotas, so `ratio` compares like with like.

`ContextScorer` is a stand-in predictor for replays, fitted on a trace (use the dev split): ridge
regressions from the routing history (decayed expert use of all layers, and the current token's
experts at this and earlier layers) to "expert e of layer l is used within the next `horizon`
tokens". It lives here until the predictors/ package has a trace-fitted predictor of its own.
This module moves no bytes and times nothing.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..experts.policies import EvictionPolicy
from ..experts.table import SlotTable
from .belady import BeladyResult, belady
from .trace import Trace


class Scorer(Protocol):
    def reset(self) -> None:
        """A new sequence starts (no history)."""

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        """The current token used `experts` at `layer`."""

    def scores(self, layer: int) -> np.ndarray:
        """[E] estimate that each expert of `layer` is needed soon (higher = sooner), from what was observed."""

    def end_token(self) -> None:
        """The current token has passed every layer."""


@dataclass
class ReplayResult:
    policy: str
    quotas: list[int]
    loads: np.ndarray                    # [L]
    hits: np.ndarray                     # [L]
    belady: BeladyResult | None = None   # at the same quotas

    @property
    def total_loads(self) -> int:
        return int(self.loads.sum())

    @property
    def hit_rate(self) -> float:
        return float(self.hits.sum() / max(1, self.hits.sum() + self.loads.sum()))

    @property
    def per_layer_hit_rate(self) -> list[float]:
        return (self.hits / np.maximum(1, self.hits + self.loads)).tolist()

    @property
    def ratio(self) -> float:
        """Loads as a multiple of Belady's at the same quotas."""
        return self.total_loads / max(1, self.belady.total_loads)

    def to_dict(self) -> dict:
        out = {"policy": self.policy, "quotas": self.quotas, "loads": self.total_loads, "hits": int(self.hits.sum()),
               "hit_rate": self.hit_rate, "per_layer_hit_rate": self.per_layer_hit_rate}
        if self.belady is not None:
            out.update(belady_loads=self.belady.total_loads, belady_hit_rate=self.belady.hit_rate, ratio=self.ratio)
        return out


def replay(trace: Trace, policy: EvictionPolicy, quotas: int | Sequence[int], reset: bool = True,
           scorer: Scorer | None = None, with_belady: bool = True) -> ReplayResult:
    """Demand-load `trace` through a SlotTable with `quotas` slots per layer (int or [L]) and `policy`."""
    quotas = np.broadcast_to(np.asarray(quotas, dtype=np.int64), (trace.num_layers,)).tolist()
    if min(quotas) < trace.top_k:
        raise ValueError(f"per-layer quota {min(quotas)} is below top_k={trace.top_k}")
    loads = np.zeros(trace.num_layers, dtype=np.int64)
    hits = np.zeros(trace.num_layers, dtype=np.int64)
    bounds = trace.seq_offsets if reset else np.array([0, trace.num_steps])
    for a, b in itertools.pairwise(bounds):
        table = SlotTable(quotas, trace.num_experts, policy)
        if scorer is not None:
            scorer.reset()
        _run(table, trace.experts[a:b], int(a), scorer)
        loads += table.misses
        hits += table.hits
    bel = belady(trace.experts, quotas, trace.seq_offsets, reset) if with_belady else None
    return ReplayResult(getattr(policy, "name", type(policy).__name__), quotas, loads, hits, bel)


def _run(table: SlotTable, experts: np.ndarray, step0: int, scorer: Scorer | None) -> None:
    """Serve steps experts [T, L, K] (global step numbers from step0) through `table`."""
    for t, row in enumerate(experts.tolist()):
        step = step0 + t
        for layer, need in enumerate(map(sorted, row)):             # in id order, as the MoE block dispatches
            missing = table.lookup(layer, need, step)
            if scorer is not None:
                scorer.observe(layer, need)
            full = len(table.slot_of[layer]) + len(missing) > table.quotas[layer]
            scores = scorer.scores(layer) if scorer is not None and missing and full else None
            for e in missing:
                if table.place(layer, e, step, protected=need, scores=scores) is None:
                    raise RuntimeError(f"layer {layer}: every slot is held by experts of step {step}")
        if scorer is not None:
            scorer.end_token()


class ContextScorer:
    """Ridge regressions from routing history to "expert e of layer l is used within `horizon` tokens".

    Inputs for layer l at token t (F = 3 L E + (l + 1) E + 1): expert use of all layers decayed over
    earlier tokens at DECAYS (0: the previous token only), the current token's experts at layers <= l
    (known when layer l runs), and a bias. `predict` is the vectorized twin of reset/observe/scores/end_token.
    """

    DECAYS = (0.0, 2 ** (-1 / 8), 2 ** (-1 / 64))

    def __init__(self, w_hist: np.ndarray, w_cur: np.ndarray, bias: np.ndarray):
        self.w_hist = w_hist            # [L, 3 L E, E]
        self.w_cur = w_cur              # [L, L E, E], rows of layers > l are zero
        self.bias = bias                # [L, E]
        self.num_layers, self.num_experts = bias.shape
        self.lam = np.asarray(self.DECAYS, dtype=np.float32)[:, None]
        self.reset()

    @classmethod
    def fit(cls, trace: Trace, horizon: int = 3, ridge: float = 1.0) -> ContextScorer:
        n_layers, n_exp = trace.num_layers, trace.num_experts
        nh, width = len(cls.DECAYS) * n_layers * n_exp, n_layers * n_exp
        xtx, xty = 0.0, 0.0
        for a, b in zip(trace.seq_offsets[:-1], trace.seq_offsets[1:]):
            x, used = cls._inputs(trace.experts[a:b], n_exp)                      # [T, F], [T, L E]
            y = _within(used, horizon)
            xtx, xty = xtx + x.T @ x, xty + x.T @ y
        xtx, xty = np.asarray(xtx, dtype=np.float64), np.asarray(xty, dtype=np.float64)
        w = np.zeros((n_layers, nh + width + 1, n_exp), dtype=np.float32)
        for layer in range(n_layers):
            cols = np.r_[np.arange(nh + (layer + 1) * n_exp), nh + width]
            a_mat = xtx[np.ix_(cols, cols)] + ridge * np.eye(len(cols))
            w[layer, cols] = np.linalg.solve(a_mat, xty[cols, layer * n_exp:(layer + 1) * n_exp])
        return cls(w[:, :nh], w[:, nh:nh + width], w[:, -1])

    @classmethod
    def _inputs(cls, experts: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """experts [T, L, K] -> inputs [T, F] for all layers (current token: every layer) and use [T, L E]."""
        t_steps, n_layers, _ = experts.shape
        used = np.zeros((t_steps, n_layers, num_experts), dtype=np.float32)
        used[np.arange(t_steps)[:, None, None], np.arange(n_layers)[None, :, None], experts] = 1.0
        used = used.reshape(t_steps, -1)
        hist = [np.zeros_like(used) for _ in cls.DECAYS]
        from scipy.signal import lfilter
        for h, lam in zip(hist, cls.DECAYS):
            h[1:] = lfilter([1.0 - lam], [1.0, -lam], used, axis=0)[:-1]
        return np.concatenate([*hist, used, np.ones((t_steps, 1), np.float32)], axis=1), used

    def predict(self, experts: np.ndarray) -> np.ndarray:
        """[T, L, E] scores of every layer at every token of one sequence experts [T, L, K]."""
        x, _ = self._inputs(experts, self.num_experts)
        nh = self.w_hist.shape[1]
        out = np.einsum("tf,lfe->tle", x[:, :nh], self.w_hist)
        return out + np.einsum("tf,lfe->tle", x[:, nh:-1], self.w_cur) + self.bias[None]

    def reset(self) -> None:
        self.hist = np.zeros((len(self.DECAYS), self.num_layers * self.num_experts), dtype=np.float32)
        self.cur = np.zeros(self.num_layers * self.num_experts, dtype=np.float32)

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        self.cur[layer * self.num_experts + np.asarray(experts)] = 1.0

    def scores(self, layer: int) -> np.ndarray:
        end = (layer + 1) * self.num_experts
        return self.hist.ravel() @ self.w_hist[layer] + self.cur[:end] @ self.w_cur[layer, :end] + self.bias[layer]

    def end_token(self) -> None:
        self.hist = self.lam * self.hist + (1.0 - self.lam) * self.cur
        self.cur = np.zeros_like(self.cur)


def _within(used: np.ndarray, horizon: int) -> np.ndarray:
    """[T, N] 1 where the column is used at one of the next `horizon` rows (not this one)."""
    out = np.zeros_like(used)
    for k in range(1, horizon + 1):
        out[:-k] = np.maximum(out[:-k], used[k:])
    return out
