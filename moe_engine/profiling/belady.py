"""Belady's offline minimum of expert loads for a routing trace at given per-layer capacities.

Each layer has its own cache of `capacity[l]` experts, filled on demand: a step (token) needs
its K experts of the layer resident at once, so a missing expert is loaded and, when the layer
is full, the resident expert whose next use lies farthest in the future is evicted; experts of
the current step are never evicted for each other. Evicting the farthest next use is optimal
for demand paging (Belady 1966), and keeping the current step's experts does not change that
(they are the nearest uses), so the loads counted here are the fewest any policy can make.

Fast path: next uses come from one stable argsort (O(n log n)); the simulation advances all
caches (sequences x layers) one step at a time with numpy over [rows, E] arrays. `belady_slow`
is the readable twin, one cache at a time, used by the tests.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEVER = np.iinfo(np.int32).max


@dataclass
class BeladyResult:
    loads: np.ndarray        # [L] expert loads per layer
    accesses: np.ndarray     # [L] expert uses per layer (hits + loads)

    @property
    def total_loads(self) -> int:
        return int(self.loads.sum())

    @property
    def hit_rate(self) -> float:
        return 1.0 - self.loads.sum() / max(1, self.accesses.sum())

    @property
    def per_layer_hit_rate(self) -> list[float]:
        return (1.0 - self.loads / np.maximum(1, self.accesses)).tolist()


def next_use(experts: np.ndarray, seg_end: np.ndarray) -> np.ndarray:
    """[T, L, K] step of the next use of experts[t, l, k] at layer l after t, NEVER if none before seg_end[t]."""
    t_steps, n_layers, k = experts.shape
    num_experts = int(experts.max()) + 1 if experts.size else 1
    key = (np.arange(n_layers)[None, :, None] * num_experts + experts).ravel()      # [T*L*K], t-major
    order = np.argsort(key, kind="stable")                                           # by (layer, expert), then t
    t_of = np.repeat(np.arange(t_steps), n_layers * k)[order]
    same = key[order][1:] == key[order][:-1]
    nxt_sorted = np.full(len(order), NEVER, dtype=np.int64)
    nxt_sorted[:-1] = np.where(same, t_of[1:], NEVER)
    nxt = np.empty_like(nxt_sorted)
    nxt[order] = nxt_sorted
    nxt = nxt.reshape(t_steps, n_layers, k)
    nxt[nxt >= seg_end[:, None, None]] = NEVER
    return nxt.astype(np.int32)


def _segments(num_steps: int, seq_offsets: np.ndarray | None, reset: bool) -> np.ndarray:
    """[S+1] offsets of independent runs: the sequences when `reset`, else the whole trace."""
    if reset and seq_offsets is not None:
        return np.asarray(seq_offsets, dtype=np.int64)
    return np.array([0, num_steps], dtype=np.int64)


def _capacities(capacity: int | Sequence[int], n_layers: int, k: int) -> np.ndarray:
    cap = np.broadcast_to(np.asarray(capacity, dtype=np.int64), (n_layers,)).copy()
    if (cap < k).any():
        raise ValueError(f"per-layer capacity {cap.min()} is below top_k={k}: a step needs its {k} experts at once")
    return cap


def belady(experts: np.ndarray, capacity: int | Sequence[int], seq_offsets: np.ndarray | None = None,
           reset: bool = True, batch: int = 128) -> BeladyResult:
    """Belady's loads for `experts` [T, L, K] with `capacity` experts per layer (int or [L]).

    `reset`: every sequence of `seq_offsets` starts with empty caches; otherwise one continuous run.
    """
    t_steps, n_layers, k = experts.shape
    cap = _capacities(capacity, n_layers, k)
    seg = _segments(t_steps, seq_offsets, reset)
    seg_end = np.repeat(seg[1:], np.diff(seg))
    nxt = next_use(experts, seg_end)
    num_experts = int(experts.max()) + 1 if experts.size else 1
    lengths = np.diff(seg)
    by_len = np.argsort(-lengths, kind="stable")                    # longest first: active rows are a prefix
    loads = np.zeros(n_layers, dtype=np.int64)
    for i in range(0, len(by_len), batch):
        segs = by_len[i:i + batch]
        loads += _simulate(experts, nxt, seg[segs], lengths[segs], cap, num_experts)
    accesses = np.full(n_layers, t_steps * k, dtype=np.int64)
    return BeladyResult(loads, accesses)


def _simulate(experts, nxt, starts, lengths, cap, num_experts) -> np.ndarray:
    """Loads per layer [L] of segments (starts, lengths sorted longest first) simulated side by side."""
    n_seg, (_, n_layers, k) = len(starts), experts.shape
    rows_per_step = np.searchsorted(-lengths, -np.arange(lengths[0]), side="right") * n_layers   # active rows
    cap_rows = np.tile(cap, n_seg)                                  # [R]
    res = np.zeros((n_seg * n_layers, num_experts), dtype=bool)     # [R, E] resident
    key = np.zeros((n_seg * n_layers, num_experts), dtype=np.int64)  # [R, E] next use of residents
    loads = np.zeros(n_seg * n_layers, dtype=np.int64)
    idx = starts[:, None] + np.arange(lengths[0])[None, :]          # [S, Tmax] row of each (segment, step)
    idx = np.minimum(idx, starts[:, None] + lengths[:, None] - 1)
    for t in range(lengths[0]):
        r = rows_per_step[t]
        ex = experts[idx[:, t]].reshape(-1, k)[:r].astype(np.int64)  # [r, K]
        nx = nxt[idx[:, t]].reshape(-1, k)[:r]
        loads[:r] += _step(res[:r], key[:r], ex, nx, cap_rows[:r])
    return loads.reshape(n_seg, n_layers).sum(0)


def _step(res, key, ex, nx, cap) -> np.ndarray:
    """Serve one step in place for rows [r]; return loads [r]."""
    rows = np.arange(len(ex))[:, None]
    need = np.zeros_like(res)
    need[rows, ex] = True
    miss = (need & ~res).sum(1)
    n_evict = np.maximum(res.sum(1) + miss - cap, 0)
    if n_evict.any():
        cand = np.where(res & ~need, key, -1)
        order = np.argsort(-cand, axis=1, kind="stable")            # farthest next use first
        take = np.arange(res.shape[1])[None, :] < n_evict[:, None]
        res[np.nonzero(take)[0], order[take]] = False
    res |= need
    key[rows, ex] = nx
    return miss


def belady_slow(steps: Sequence[Sequence[int]], capacity: int) -> int:
    """Readable twin for one layer: `steps` is a list of expert-id lists; returns the loads."""
    resident: set[int] = set()
    loads = 0
    for t, need in enumerate(steps):
        for e in need:
            if e in resident:
                continue
            loads += 1
            if len(resident) == capacity:
                resident.remove(max(resident - set(need), key=lambda x: _next(steps, t, x)))
            resident.add(e)
    return loads


def _next(steps, t, e) -> int:
    return next((u for u in range(t + 1, len(steps)) if e in steps[u]), len(steps))
