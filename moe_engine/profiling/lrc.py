"""Local routing consistency (moe-lrc) of a routing trace: how well a small per-segment cache could serve it.

Metrics of "Not All Models Suit Expert Offloading: On Local Routing Consistency of Mixture-of-Expert
Models" (Liang et al., 2025), per layer and segment length m. A segment is m consecutive tokens of one
sequence; n_e is the number of its tokens routed to expert e at the layer (0 <= n_e <= m, sum_e n_e = k m).

    SCH(m, c) = sum over segments of the c largest n_e / (segments x k x m)
        the hit rate of the best cache of c experts held fixed for a whole segment (an upper bound for a
        cache that may only change between segments; 1 when c >= E).
    SRP(m) = max over thresholds t in 1..m of 2 x matches(t) / (preds(t) + acts)
        with P_t = {e : n_e >= t} per segment, matches = sum of n_e over P_t, preds = m |P_t|, acts = k m,
        each summed over the segments of the layer before the ratio (one threshold per layer and m): the
        best F1 of predicting "expert e is used at every token of the segment" from the segment itself.

Segments never cross a sequence boundary (`seq_offsets`); the partial tail of a sequence (its last
len % m tokens) is dropped, so an m longer than every sequence has no segments and reports None.
Per-layer values are averaged over layers with equal weight (every layer has the same segments).

Suggested cache size (`suggest_cache_experts`): the smallest c >= k whose layer-averaged SCH(m_ref, c)
reaches `target` (default m_ref = 16 tokens, target = 0.9), i.e. the fewest experts per layer that, held
for 16 tokens, could serve 90% of the routing; never below k and never above E. The paper finds about
2 k the sweet spot for models that suit offloading; a suggestion near E means the model's routing has
little locality and offloading will mostly stream experts. The vectorized `lrc_metrics` has a readable
per-segment loop twin, `lrc_slow`, used by the tests. This module reads routing only; it times nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .trace import Trace

SEGMENTS = (4, 16, 64, 256)
RULE = ("smallest c >= k with layer-averaged SCH(m_ref, c) >= target (a cache of c experts held for m_ref tokens "
        "could serve that fraction of the routing); capped at E")


def default_cache_sizes(top_k: int, num_experts: int) -> list[int]:
    """k, 2k, 4k, ... below E, then E."""
    sizes, c = [], top_k
    while c < num_experts:
        sizes.append(c)
        c *= 2
    return [*sizes, num_experts]


def segment_starts(seq_offsets: np.ndarray, m: int) -> np.ndarray:
    """[S_m] first rows of the full m-token segments of every sequence (partial tails dropped)."""
    off = np.asarray(seq_offsets, dtype=np.int64)
    n_full = np.diff(off) // m                                          # [S] full segments per sequence
    if n_full.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    seq_of = np.repeat(np.arange(len(n_full)), n_full)                 # [S_m] sequence of each segment
    first = np.cumsum(n_full) - n_full                                 # [S] index of a sequence's first segment
    return off[seq_of] + m * (np.arange(n_full.sum()) - first[seq_of])


def segment_counts(experts: np.ndarray, starts: np.ndarray, m: int, num_experts: int) -> np.ndarray:
    """n [S_m, L, E]: tokens of each segment routed to each expert, per layer, from experts [T, L, K]."""
    _, n_layers, k = experts.shape
    rows = (starts[:, None] + np.arange(m)[None, :]).ravel()           # [S_m m] rows, segment-major
    seg = np.repeat(np.arange(len(starts)), m * n_layers * k)
    layer = np.tile(np.repeat(np.arange(n_layers), k), len(rows))
    flat = (seg * n_layers + layer) * num_experts + experts[rows].astype(np.int64).ravel()
    counts = np.bincount(flat, minlength=len(starts) * n_layers * num_experts)
    return counts.reshape(len(starts), n_layers, num_experts)


def sch_curve(counts: np.ndarray, top_k: int, m: int) -> np.ndarray:
    """[L, E] SCH(m, c) for c = 1..E per layer from counts [S, L, E]."""
    top = -np.sort(-counts, axis=2)                                    # [S, L, E] largest n_e first
    return np.cumsum(top, axis=2).sum(0) / (counts.shape[0] * top_k * m)


def srp(counts: np.ndarray, top_k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """SRP(m) [L] and its best threshold t [L] from counts [S, L, E], via a histogram of the n_e values."""
    n_seg, n_layers, _ = counts.shape
    hist = np.zeros((n_layers, m + 1), dtype=np.int64)                 # [L, m+1] (segment, expert) pairs with n_e = v
    np.add.at(hist, (np.broadcast_to(np.arange(n_layers)[None, :, None], counts.shape), counts), 1)
    v = np.arange(m + 1)
    n_pred = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]                 # [L, m+1] |P_t| summed over segments
    matches = np.cumsum((hist * v)[:, ::-1], axis=1)[:, ::-1]          # [L, m+1]
    f1 = 2 * matches[:, 1:] / (m * n_pred[:, 1:] + n_seg * top_k * m)  # [L, m] thresholds t = 1..m
    best = np.argmax(f1, axis=1)
    return f1[np.arange(n_layers), best], best + 1


def suggest_cache_experts(sch_mean: np.ndarray, top_k: int, target: float = 0.9) -> int:
    """Smallest c >= k with sch_mean[c - 1] >= target (sch_mean [E]: layer-averaged SCH(m_ref, c = 1..E))."""
    num_experts = len(sch_mean)
    ok = np.nonzero(sch_mean[top_k - 1:] >= target - 1e-12)[0]
    return int(top_k + ok[0]) if len(ok) else num_experts


def lrc_metrics(trace: Trace, segments: Sequence[int] = SEGMENTS, cache_sizes: Sequence[int] | None = None,
                m_ref: int = 16, target: float = 0.9) -> dict:
    """JSON-ready moe-lrc metrics of `trace` (layout in `_per_m` and the module docstring)."""
    k, n_exp = trace.top_k, int(trace.num_experts)
    sizes = sorted({min(int(c), n_exp) for c in (cache_sizes or default_cache_sizes(k, n_exp))})
    if sizes and sizes[0] < 1:
        raise ValueError(f"cache sizes must be >= 1 expert, got {sizes[0]}")
    out = {"num_layers": trace.num_layers, "num_experts": n_exp, "top_k": k, "tokens": trace.num_steps,
           "sequences": trace.num_sequences, "tail": "dropped (segments never cross a sequence boundary)",
           "cache_sizes": sizes, "segments": {}}
    curves = {}
    for m in segments:
        out["segments"][str(m)], curves[m] = _per_m(trace, int(m), sizes)
    m_used = m_ref if curves.get(m_ref) is not None else next((m for m in segments if curves[m] is not None), None)
    suggested = suggest_cache_experts(curves[m_used].mean(0), k, target) if m_used is not None else None
    out.update(suggested_cache_experts=suggested, active_experts=k,
               suggestion={"rule": RULE, "m_ref": m_used, "target": target,
                           "sch_at_suggested": None if suggested is None else float(curves[m_used].mean(0)[suggested - 1]),
                           "ratio_to_active": None if suggested is None else suggested / k})
    return out


def _per_m(trace: Trace, m: int, sizes: list[int]) -> tuple[dict, np.ndarray | None]:
    """Metrics for one m: {"num_segments", "tokens_covered", "srp", "srp_per_layer", "srp_threshold_per_layer",
    "sch": {str(c): mean}, "sch_per_layer": {str(c): [L]}} (values None without segments), and SCH [L, E]."""
    starts = segment_starts(trace.seq_offsets, m)
    entry = {"num_segments": int(len(starts)), "tokens_covered": int(len(starts) * m)}
    if len(starts) == 0:
        entry.update(srp=None, srp_per_layer=None, srp_threshold_per_layer=None,
                     sch={str(c): None for c in sizes}, sch_per_layer={str(c): None for c in sizes})
        return entry, None
    counts = segment_counts(trace.experts, starts, m, int(trace.num_experts))
    curve = sch_curve(counts, trace.top_k, m)                          # [L, E]
    f1, thr = srp(counts, trace.top_k, m)
    entry.update(srp=float(f1.mean()), srp_per_layer=f1.tolist(), srp_threshold_per_layer=thr.tolist(),
                 sch={str(c): float(curve[:, c - 1].mean()) for c in sizes},
                 sch_per_layer={str(c): curve[:, c - 1].tolist() for c in sizes})
    return entry, curve


def lrc_slow(steps: Sequence[Sequence[Sequence[int]]], m: int, c: int, top_k: int) -> tuple[float, float] | None:
    """Readable twin for one layer: `steps` is a list of sequences, each a list of per-token expert-id lists.

    Returns (SCH(m, c), SRP(m)) or None when no sequence has a full segment.
    """
    segs = [seq[i:i + m] for seq in steps for i in range(0, len(seq) - m + 1, m)]
    if not segs:
        return None
    hit, per_seg_counts = 0, []
    for seg in segs:
        n: dict[int, int] = {}
        for token in seg:
            for e in token:
                n[e] = n.get(e, 0) + 1
        hit += sum(sorted(n.values(), reverse=True)[:c])
        per_seg_counts.append(n)
    best = 0.0
    for t in range(1, m + 1):
        matches = sum(v for n in per_seg_counts for v in n.values() if v >= t)
        preds = sum(m for n in per_seg_counts for v in n.values() if v >= t)
        best = max(best, 2 * matches / (preds + top_k * m * len(segs)))
    return hit / (len(segs) * top_k * m), best


def format_lrc(metrics: dict) -> list[list[str]]:
    """Rows of a table: header, then one row per m with SRP and SCH at each cache size (layer averages)."""
    sizes = metrics["cache_sizes"]
    rows = [["m", "segments", "SRP", *[f"SCH c={c}" for c in sizes]]]
    for m, entry in metrics["segments"].items():
        cells = [entry["sch"][str(c)] for c in sizes]
        rows.append([m, str(entry["num_segments"]), _fmt(entry["srp"]), *[_fmt(v) for v in cells]])
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
