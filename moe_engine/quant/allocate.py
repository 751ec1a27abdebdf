"""Bit allocation as in MC-MoE: one width per expert, minimizing importance-weighted error under an average.

For one MoE layer with E experts and candidate widths b_1 < ... < b_m:

    minimize    sum_e sum_j  importance_e * error_e(b_j) * x[e, j]
    subject to  sum_j x[e, j] = 1                    (each expert gets one width)
                sum_e sum_j b_j * x[e, j] <= AVG * E  (average bits)
                x binary

solved exactly with scipy.optimize.milp (HiGHS branch and bound). `importance_e` mixes the share
of calibration tokens routed to e and its share of routing weight; `error_e(b)` is the mean
squared error that quantizing e at b bits causes in its output on the layer's calibration inputs.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError


def importance(token_counts: np.ndarray, weight_sums: np.ndarray, token_share: float = 0.5) -> np.ndarray:
    """[E] routed-token counts and routing-weight sums -> [E] importance (sums to 1; uniform when no data)."""
    def share(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return v / v.sum() if v.sum() > 0 else np.full(len(v), 1.0 / len(v))
    return token_share * share(token_counts) + (1 - token_share) * share(weight_sums)


def allocate_bits(cost: np.ndarray, bits: tuple[int, ...], avg_bits: float) -> list[int]:
    """cost [E, m] (importance x error of expert e at width bits[j]) -> one width per expert."""
    e, m = cost.shape
    if avg_bits < min(bits) - 1e-9:
        raise ConfigError(f"an average of {avg_bits:g} bits cannot be met with widths {list(bits)}; "
                          f"use mixed:AVG_BITS with AVG_BITS >= {min(bits)}")
    c = np.asarray(cost, dtype=np.float64).reshape(-1)                      # x[e, j] at e * m + j
    c = c / max(np.abs(c).max(), 1e-300)                                    # scale for the solver
    one_each = np.kron(np.eye(e), np.ones(m))                               # [E, E*m]
    width = np.tile(np.asarray(bits, dtype=np.float64), e)[None, :]         # [1, E*m]
    budget = avg_bits * e + 1e-9
    from scipy.optimize import Bounds, LinearConstraint, milp   # only --quant mixed needs scipy (~0.3 s, 40 MiB)
    res = milp(c, integrality=np.ones(e * m), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(width, -np.inf, budget)])
    if res.x is None:
        raise ConfigError(f"the bit allocation found no solution ({res.message}) for an average of "
                          f"{avg_bits:g} bits over widths {list(bits)}")
    choice = np.round(res.x).reshape(e, m).argmax(1)
    return [bits[j] for j in choice]


def interleaved_bits(num_experts: int, low: int, high: int, avg_bits: float, seed: int = 0) -> list[int]:
    """The uniform baseline of a fractional average: experts drawn at random to get `high`, the rest `low`."""
    n_high = int(round((avg_bits - low) / (high - low) * num_experts))
    out = np.full(num_experts, low)
    out[np.random.default_rng(seed).permutation(num_experts)[:n_high]] = high
    return out.tolist()
