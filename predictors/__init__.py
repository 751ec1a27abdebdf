"""Expert-path predictors (torch/numpy only; never imports moe_engine).

`ExpertPredictor` is the protocol (predictors/base.py); built-ins are registered by name in
BUILTIN; plug-ins register under the entry point group `moe_engine.predictors` or are named
as "pkg.module:Class" (resolution: moe_engine/runtime/plugins.py). `evaluate` measures recall.
"""
from .base import ExpertPredictor
from .gate_lookahead import GateLookahead
from .learned import LearnedPredictor
from .oracle import OraclePredictor
from .path import PathPredictor

BUILTIN = {"gate-lookahead": GateLookahead, "learned": LearnedPredictor, "oracle": OraclePredictor, "path": PathPredictor}

__all__ = ["BUILTIN", "ExpertPredictor", "GateLookahead", "LearnedPredictor", "OraclePredictor", "PathPredictor"]
