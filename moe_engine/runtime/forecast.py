"""Feeding a predictor safely: the engine's side of the ExpertPredictor protocol.

    decoder step --begin_step(token_ids, seq_ids)--> Forecaster
    MoE layer L  --routed(L, router input, experts, weights)--> predictor.observe ; predictor.predict(L, depth)
                 --> checked scores {L+d: [N, E]} --> the cache controller's prefetches and the recall meter

Predictions only steer loading. A predictor that raises or answers with a malformed result
(not a dict of [N, E] tensors for later MoE layers, or non-finite scores) is switched off with
one warning and replaced by the default predictor; if that fails too, prediction stops. The
model's outputs never depend on any of this. Non-finite scores from a non-finite router input
are the model's fault, not the predictor's: that layer gets no forecast, the predictor stays, and
the generation core fails the step naming the layer (runtime/core.py).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from predictors.base import PredictorUnavailable
from predictors.evaluate import RecallMeter

from ..errors import ConfigError

MAX_DEPTH = 4          # the farthest lookahead the engine asks for (and measures recall at)


class PredictorWarning(UserWarning):
    """A predictor misbehaved and was replaced (the message says which and why)."""


class Forecaster:
    def __init__(self, predictor, make_fallback: Callable[[], object] | None, routers: dict[int, torch.Tensor],
                 top_k: int, num_experts: int, depth: int = 1):
        self.layers = sorted(routers)
        self.routers, self.top_k, self.num_experts = routers, top_k, num_experts
        self.make_fallback = make_fallback
        self.depth = depth                          # lookahead asked for; the cache sets it each layer
        self.meter = RecallMeter(self.layers, MAX_DEPTH, (top_k, 2 * top_k))
        self.failures: list[str] = []
        self.predictor = None
        self._install(predictor)
        self._tokens: torch.Tensor | None = None
        self._seqs: torch.Tensor | None = None

    @property
    def name(self) -> str | None:
        return None if self.predictor is None else getattr(self.predictor, "name", type(self.predictor).__name__)

    def _install(self, predictor) -> None:
        self.predictor = predictor
        if predictor is not None:
            try:
                predictor.bind(self.routers, self.top_k, self.num_experts)
            except PredictorUnavailable as e:      # does not fit this model: the user must fix the choice
                raise ConfigError(f"predictor {self.name!r} cannot serve this model: {e}") from None
            except Exception as e:   # a plug-in's bug: same treatment as a failure while running
                self._fail(f"bind() raised {type(e).__name__}: {e}")

    def begin_step(self, token_ids: torch.Tensor | None, seq_ids: torch.Tensor | None) -> None:
        self._tokens, self._seqs = token_ids, seq_ids

    def routed(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor,
               weights: torch.Tensor) -> dict[int, torch.Tensor]:
        """Tell the predictor what layer `layer` chose; returns its checked forecast (empty when there is none)."""
        self.meter.actual(layer, experts)
        while self.predictor is not None:
            pred = self.predictor
            try:
                pred.observe(layer, router_input, experts, weights, self._tokens, self._seqs)
                out = pred.predict(layer, self.depth)
                problem = self._check(layer, out, experts.shape[0])
            except Exception as e:   # noqa: BLE001 - any failure of a plug-in only disables it
                problem = f"raised {type(e).__name__}: {e}"
            if problem is None:
                self.meter.forecast(layer, out)
                return out
            if not bool(torch.isfinite(router_input).all()):
                return {}      # the model's own hidden states are NaN/inf, not the predictor's fault: the core fails
            self._fail(f"at layer {layer}: {problem}")   # the step and names the layer (runtime/core.py)
        return {}

    def _check(self, layer: int, out, n: int) -> str | None:
        if not isinstance(out, dict):
            return f"predict() returned {type(out).__name__}, expected a dict {{layer: scores [N, E]}}"
        for target, scores in out.items():
            if target not in self.routers or target <= layer:
                return f"predict() gave scores for layer {target!r}, which is not a MoE layer after {layer}"
            if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n, self.num_experts):
                shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                return f"predict() gave scores of shape {shape} for layer {target}, expected ({n}, {self.num_experts})"
            if not torch.isfinite(scores).all():
                return f"predict() gave non-finite scores (NaN or inf) for layer {target}"
        return None

    def _fail(self, problem: str) -> None:
        name = self.name
        fallback = self.make_fallback() if self.make_fallback is not None else None
        if fallback is not None and type(fallback) is type(self.predictor):
            fallback = None                          # the default itself failed: stop predicting
        then = (f"switched to the default predictor {getattr(fallback, 'name', '?')!r}" if fallback is not None
                else "prefetching now works without a predictor")
        msg = f"expert predictor {name!r} was disabled: {problem}; {then} (outputs are unaffected)"
        self.failures.append(msg)
        warnings.warn(msg, PredictorWarning, stacklevel=2)
        self.predictor = None
        self._install(fallback)

    def stats(self) -> dict:
        out = {"predictor": self.name, "current_lookahead": self.depth, "failures": list(self.failures)}
        out.update(self.meter.summary())
        return out
