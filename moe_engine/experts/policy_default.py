"""The default eviction policy: a learned hazard of reuse over recency, frequency and predictor scores.

For each resident candidate e of a layer the policy estimates the log-odds that e is used again
within the next HORIZON steps, and evicts the candidate with the lowest estimate (an online stand-in
for Belady's "farthest next use"). The estimate is a logistic model over a few features of the
layer's history since the last reset:

    log1p(age)           age = steps since e's last use (>= 1 for candidates)
    log1p(count)         uses of e since reset
    rate                 count / steps seen by the layer, relative to K/E (the rate of uniform routing)
    decayed[h]           uses decayed with half-lives HALF_LIVES (steps), relative to K/E
    p, log(p + 0.02)     the predictor's score clipped to [0, 1] (only when scores are given): read as
                         the chance the expert is needed within the next few steps; expected token
                         counts above 1 (a batch) count as certain

Rates are relative to K/E so one set of coefficients serves models with different expert counts.
Two coefficient sets are shipped, with and without predictor scores, fitted by `fit_hazard` on the
dev split of the GPT-OSS-20B routing traces (bench/bench_policies.py --fit prints them).
This module holds no per-model statistics; quotas per layer are the slot table's business.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

HALF_LIVES = (1.0, 4.0, 16.0, 64.0)       # steps
HORIZON = 8                               # "used again within HORIZON steps" is the fitted event
SCORE_FLOOR = 0.02
# Printed by bench/bench_policies.py --fit (dev split only): without scores on gptoss20b_dev sequences
# 100-606; with scores on sequences 100-299, scores from a ContextScorer fitted on 300-606 (held out).
# Order: the features above, then the bias.
COEF_NO_SCORES = np.array([-0.5906, 0.2044, 0.3391, -0.1648, -0.1155, 0.5506, -0.0041, -0.0025])
COEF_SCORES = np.array([-0.5373, 0.1757, 0.1988, -0.1524, -0.107, 0.491, -0.0179, 1.1741, 0.1974, 0.1569])


def decay_factors(half_lives: Sequence[float] = HALF_LIVES) -> np.ndarray:
    return 2.0 ** (-1.0 / np.asarray(half_lives, dtype=np.float64))          # [H]


def hazard_features(age, count, steps, decayed, k_over_e, scores=None) -> np.ndarray:
    """Features [..., F] from arrays of one shape [...] (decayed: [..., H]); the same code serves fit and policy."""
    age, count = np.asarray(age, dtype=np.float64), np.asarray(count, dtype=np.float64)
    rate = count / np.maximum(steps, 1) / k_over_e
    lam = decay_factors()
    dec = np.asarray(decayed, dtype=np.float64) * (1.0 - lam) / k_over_e                # [..., H]
    cols = [np.log1p(age), np.log1p(count), rate, *np.moveaxis(dec, -1, 0)]
    if scores is not None:
        p = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
        cols += [p, np.log(p + SCORE_FLOOR)]
    return np.stack(cols, axis=-1)


class DefaultPolicy:
    """Evict the candidate least likely to be used within HORIZON steps (see the module docstring).

    Log-odds of a layer are computed once per (layer, step, scores) and reused by the further
    victims of the same step, whose candidates only shrink.
    """

    name = "default"
    max_gap = 4096                         # decay factors beyond this many steps are taken as 0

    def __init__(self, coef_no_scores: np.ndarray = COEF_NO_SCORES, coef_scores: np.ndarray = COEF_SCORES):
        self.coef_no_scores = np.asarray(coef_no_scores, dtype=np.float64)
        self.coef_scores = np.asarray(coef_scores, dtype=np.float64)
        self.lam_pow = decay_factors()[None, :] ** np.arange(self.max_gap + 1)[:, None]   # [G+1, H]

    def reset(self, num_layers: int, num_experts: int) -> None:
        self.num_experts = num_experts
        self.last = np.full((num_layers, num_experts), -1, dtype=np.int64)        # [L, E] last step used
        self.count = np.zeros((num_layers, num_experts), dtype=np.int64)          # [L, E] uses since reset
        self.decayed = np.zeros((num_layers, num_experts, self.lam_pow.shape[1]))  # [L, E, H] as of `updated`
        self.updated = np.zeros((num_layers, num_experts), dtype=np.int64)        # [L, E]
        self.first = np.full(num_layers, -1, dtype=np.int64)                      # [L] first step recorded
        self.uses = np.zeros(num_layers, dtype=np.int64)                          # [L] expert uses recorded
        self._cached = (None, None, None)                                         # (key, scores, logits list)

    def record(self, layer: int, experts: Sequence[int], step: int) -> None:
        idx = np.asarray(experts if len(set(experts)) == len(experts) else sorted(set(experts)), dtype=np.int64)
        if self.first[layer] < 0:
            self.first[layer] = step
        self.decayed[layer, idx] = self._decayed(layer, idx, step) + 1.0
        self.updated[layer, idx] = step
        self.last[layer, idx] = step
        self.count[layer, idx] += 1
        self.uses[layer] += len(idx)
        self._cached = (None, None, None)

    def victim(self, layer: int, candidates: Sequence[int], step: int, scores: np.ndarray | None = None) -> int:
        key, cached_scores, logit = self._cached
        if key != (layer, step) or cached_scores is not scores:
            logit = self.logits(layer, step, scores).tolist()
            self._cached = ((layer, step), scores, logit)
        return min(candidates, key=logit.__getitem__)

    def logits(self, layer: int, step: int, scores: np.ndarray | None = None) -> np.ndarray:
        """[E] log-odds that each expert of `layer` is used within HORIZON steps after `step`.

        Fast twin of `hazard_features(...) @ coef`: the same sum, term by term, without the [E, F] matrix.
        """
        steps = max(1, step - self.first[layer] + 1)
        k_over_e = max(self.uses[layer] / steps, 1.0) / self.num_experts
        last, count = self.last[layer], self.count[layer]
        age = np.where(last < 0, steps + 1, np.maximum(step - last, 1))
        coef = self.coef_no_scores if scores is None else self.coef_scores
        dec_w = coef[3:3 + self.lam_pow.shape[1]] * (1.0 - self.lam_pow[1]) / k_over_e            # [H]
        out = coef[0] * np.log1p(age) + coef[1] * np.log1p(count) + (coef[2] / steps / k_over_e) * count
        out += self._decayed(layer, slice(None), step) @ dec_w + coef[-1]
        if scores is not None:
            p = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
            out += coef[-3] * p + coef[-2] * np.log(p + SCORE_FLOOR)
        return out

    def _decayed(self, layer: int, idx: np.ndarray, step: int) -> np.ndarray:
        """[n, H] decayed counts of experts `idx` brought forward to `step`."""
        gap = np.minimum(step - self.updated[layer, idx], self.max_gap)
        return self.decayed[layer, idx] * self.lam_pow[gap]


def history_states(experts: np.ndarray, num_experts: int):
    """Policy state after each step of one sequence, vectorized over time.

    experts [T, L, K] -> (used [T, L, E], age [T, L, E], count [T, L, E], decayed [T, L, E, H],
    next_gap [T, L, E]: steps to the next use after t, or a large number when none).
    """
    from scipy.signal import lfilter
    t_steps, n_layers, _ = experts.shape
    used = np.zeros((t_steps, n_layers, num_experts), dtype=np.float64)
    used[np.arange(t_steps)[:, None, None], np.arange(n_layers)[None, :, None], experts] = 1.0
    t = np.arange(t_steps, dtype=np.float64)[:, None, None]
    last = np.maximum.accumulate(np.where(used > 0, t, -1.0), axis=0)
    age = np.where(last >= 0, t - last, t + 2)
    decayed = np.stack([lfilter([1.0], [1.0, -lam], used, axis=0) for lam in decay_factors()], axis=-1)
    nxt = np.minimum.accumulate(np.where(used > 0, t, np.inf)[::-1], axis=0)[::-1]
    next_gap = np.concatenate([nxt[1:], np.full((1, n_layers, num_experts), np.inf)]) - t
    return used, age, np.cumsum(used, axis=0), decayed, next_gap


def fit_hazard(experts: np.ndarray, seq_offsets: np.ndarray, num_experts: int, scores_fn=None,
               sample: float = 0.05, seed: int = 0, l2: float = 1e-3) -> np.ndarray:
    """Logistic coefficients [F + 1] for "used again within HORIZON steps" on a trace (one row per sampled
    resident-like (step, layer, expert): used before, not used at the step). `scores_fn(experts [T, L, K])
    -> [T, L, E]` adds the predictor features."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    k_over_e = experts.shape[2] / num_experts
    for a, b in itertools.pairwise(seq_offsets):
        ex = experts[a:b].astype(np.int64)
        used, age, count, decayed, gap = history_states(ex, num_experts)
        keep = (used == 0) & (count > 0) & (rng.random(used.shape) < sample)
        steps = np.arange(1, b - a + 1, dtype=np.float64)[:, None, None] + np.zeros_like(used)
        sc = None if scores_fn is None else scores_fn(ex)[keep]
        xs.append(hazard_features(age[keep], count[keep], steps[keep], decayed[keep], k_over_e, sc))
        ys.append(gap[keep] <= HORIZON)
    return _logistic(np.concatenate(xs), np.concatenate(ys).astype(np.float64), l2)


def _logistic(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 25) -> np.ndarray:
    """Newton's method (IRLS) for L2-regularized logistic regression; returns [F + 1] (bias last)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    reg = 2 * l2 * np.diag(np.r_[np.ones(x.shape[1]), 0.0])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xb @ w)))
        grad = xb.T @ (p - y) / len(y) + reg @ w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / len(y) + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w
