"""Expert-path predictors (torch/numpy only; never imports moe_engine).

`ExpertPredictor` is the protocol (predictors/base.py); built-ins are registered by name in
BUILTIN. The learned, path and oracle predictors and the plug-in routes land with the
predictor issue.
"""
from .base import ExpertPredictor
from .gate_lookahead import GateLookahead

BUILTIN = {"gate-lookahead": GateLookahead}

__all__ = ["BUILTIN", "ExpertPredictor", "GateLookahead"]
