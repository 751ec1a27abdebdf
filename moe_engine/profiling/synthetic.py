"""Routing for `moe-engine simulate` when no trace of the model itself is at hand.

    synthetic_trace(L, E, K)        random routing of a model shape (not real routing): for each sequence and
                                    layer, expert popularities drawn from a Dirichlet(ALPHA) (some experts busier
                                    than others within a sequence, as trained routers are), then each token's K
                                    distinct experts drawn from them (Gumbel top-k); tokens are independent, so
                                    there is no token-to-token locality beyond the popularity skew
    fold_trace(trace, L, E, K)      another model's recorded routing put onto this shape, as bench_offload's
                                    replayed routing does: layer l takes trace layer l mod L_trace, token t keeps
                                    its row, expert ids are taken mod E, the first K distinct kept (the lowest
                                    unused ids fill a row that has fewer); the locality is real, the model is not
    BUNDLED_TRACE                   the bundled tiny-moe model's own routing (real), shipped with the package

Both describe themselves in one line (`describe_synthetic`, `describe_fold`) that simulate prints, so a
result is never read as a measurement of real routing by mistake.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .trace import Trace

ALPHA = 0.5                     # Dirichlet concentration of the per-sequence expert popularity
SEQUENCES, TOKENS = 8, 64       # default synthetic size: 512 decode steps
SEED = 0
# `moe-engine trace --prompts moe_engine/profiling/prompts.txt --out moe_engine/profiling/tiny-moe-trace.npz
#  --max-new-tokens 48` on the bundled model (bf16, CPU)
BUNDLED_TRACE = Path(__file__).resolve().parent / "tiny-moe-trace.npz"


def synthetic_trace(num_layers: int, num_experts: int, top_k: int, sequences: int = SEQUENCES,
                    tokens: int = TOKENS, seed: int = SEED, alpha: float = ALPHA) -> Trace:
    """[sequences * tokens, L, K] random routing with a per-(sequence, layer) popularity skew (see the module doc)."""
    rng = np.random.default_rng(seed)
    rows, weights = [], []
    for _ in range(sequences):
        pop = rng.dirichlet(np.full(num_experts, alpha), size=num_layers).astype(np.float32)     # [L, E]
        logp = np.log(np.maximum(pop, 1e-30))
        gumbel = -np.log(-np.log(rng.random((tokens, num_layers, num_experts), dtype=np.float32) + 1e-12) + 1e-12)
        ids = np.argsort(-(logp[None] + gumbel), axis=-1)[..., :top_k]                           # [T, L, K]
        w = np.take_along_axis(np.broadcast_to(pop, (tokens, *pop.shape)), ids, axis=-1)
        rows.append(ids)
        weights.append(w / w.sum(-1, keepdims=True))
    dtype = np.uint8 if num_experts <= 256 else np.int16
    experts = np.concatenate(rows).astype(dtype)
    offsets = np.arange(0, sequences * tokens + 1, tokens, dtype=np.int64)
    return Trace(experts, np.concatenate(weights).astype(np.float32), offsets, num_experts=num_experts)


def describe_synthetic(name: str, trace: Trace, seed: int = SEED, alpha: float = ALPHA) -> str:
    return (f"no --trace: synthetic routing for {name} ({trace.num_sequences} sequences x "
            f"{trace.num_steps // max(1, trace.num_sequences)} tokens, seed {seed}; per sequence and layer expert "
            f"popularity ~ Dirichlet({alpha}), each token's top-{trace.top_k} drawn from it). It is not real routing: "
            f"record a trace of the model (`moe-engine trace`) or pass another model's with --trace")


def needs_fold(trace: Trace, num_layers: int, num_experts: int, top_k: int) -> bool:
    return trace.num_layers != num_layers or trace.top_k != top_k or int(trace.num_experts) > num_experts


def fold_trace(trace: Trace, num_layers: int, num_experts: int, top_k: int) -> Trace:
    """`trace` on a shape of L layers x top-K of E experts (see the module doc); probs follow the kept ids."""
    layers = np.arange(num_layers) % trace.num_layers
    src = trace.experts[:, layers].astype(np.int64) % num_experts                       # [T, L, K_trace]
    probs = trace.probs[:, layers].astype(np.float32)
    k = min(top_k, trace.top_k)
    out = np.zeros((trace.num_steps, num_layers, top_k), dtype=np.int64)
    w = np.zeros(out.shape, dtype=np.float32)
    out[..., :k], w[..., :k] = src[..., :k], probs[..., :k]
    first = np.sort(src[..., :k], axis=-1)
    slow = (np.diff(first, axis=-1) == 0).any(-1) | (top_k > trace.top_k)              # [T, L] rows to redo
    for t, layer in zip(*np.nonzero(slow)):
        row = src[t, layer].tolist()
        picked = list(dict.fromkeys(row))[:top_k]
        fill = [e for e in range(num_experts) if e not in picked][: top_k - len(picked)]
        out[t, layer] = picked + fill
        w[t, layer] = [float(probs[t, layer, row.index(e)]) for e in picked] + [0.0] * len(fill)
    w /= np.maximum(w.sum(-1, keepdims=True), 1e-12)
    dtype = np.uint8 if num_experts <= 256 else np.int16
    extra = {key: v for key, v in trace.extra.items() if key == "prompt_len"}     # router inputs are the other model's
    return Trace(out.astype(dtype), w, trace.seq_offsets, trace.token_ids, extra, num_experts)


def describe_fold(trace: Trace, name: str, num_layers: int, num_experts: int, top_k: int) -> str:
    return (f"warning: the trace ({trace.num_layers} MoE layers x top-{trace.top_k} of {trace.num_experts} experts) "
            f"is not {name}'s shape ({num_layers} x top-{top_k} of {num_experts}); folded onto it (layer l takes trace "
            f"layer l mod {trace.num_layers}, expert ids mod {num_experts}, the first {top_k} distinct): real "
            f"locality, but not this model's routing")
