"""`moe-engine train-predictor`: fit the learned or path predictor on a trace, save it beside the model.

The trace is checked against the model before any training (layers, top-k, experts; router
inputs of the model's hidden size for `learned`), so a mismatch is one clear error.
"""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from predictors.learned import LearnedPredictor
from predictors.path import PathPredictor

from ..checkpoint import Checkpoint
from ..config import check_int
from ..errors import ConfigError
from ..runtime.load import DEFAULT_MODEL_DIR
from .trace import Trace, TraceError, load_trace


def check_trace(trace: Trace, spec, kind: str, path: Path) -> None:
    moe = spec.moe
    layers = len(spec.moe_layers)
    if trace.num_layers != layers or trace.top_k != moe.top_k:
        raise ConfigError(f"--trace {path} has {trace.num_layers} MoE layers x top-{trace.top_k}, but the model has "
                          f"{layers} x top-{moe.top_k}; record a trace of this model with `moe-engine trace`")
    if trace.num_experts > moe.num_experts:
        raise ConfigError(f"--trace {path} uses expert id {trace.num_experts - 1}, but the model has "
                          f"{moe.num_experts} experts per layer")
    if kind == "learned":
        x = trace.extra.get("router_inputs")
        if x is None:
            raise ConfigError(f"--trace {path} has no router inputs; the learned predictor trains on hidden states: "
                              f"record with `moe-engine trace ... --router-inputs`")
        if x.shape != (trace.num_steps, layers, spec.hidden_size):
            raise ConfigError(f"--trace {path}: router_inputs has shape {x.shape}, expected "
                              f"({trace.num_steps}, {layers}, {spec.hidden_size}) for this model")
        if trace.token_ids is None:
            raise ConfigError(f"--trace {path} has no token_ids; record it with `moe-engine trace`")


def train_predictor(model_dir, trace_path, kind: str = "learned", depth: int = 2, epochs: int | None = None,
                    seed: int = 0, out=None, force: bool = False, progress: bool = True) -> Path:
    """Train `kind` on the trace and save it; returns the file written."""
    check_int(depth, "depth", flag="--depth")
    check_int(epochs, "epochs", optional=True, flag="--epochs")
    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    cls = {"learned": LearnedPredictor, "path": PathPredictor}[kind]
    target = Path(out) if out is not None else model_dir / cls.FILENAME
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; pass --force to replace it or --out to write elsewhere")
    ckpt = Checkpoint(model_dir)
    spec = ckpt.spec
    ckpt.close()
    if depth >= len(spec.moe_layers):
        raise ConfigError(f"--depth {depth}: the model has only {len(spec.moe_layers)} MoE layers; use at most "
                          f"{len(spec.moe_layers) - 1}")
    try:
        trace = load_trace(trace_path)
    except TraceError as e:
        raise ConfigError(f"--trace {e}") from None
    check_trace(trace, spec, kind, Path(trace_path))
    kw = {"depth": depth, "seed": seed, **({"epochs": epochs} if epochs is not None else {})}
    with tqdm(total=100, desc=f"training {kind} predictor", unit="%", disable=not progress, leave=False) as bar:
        def report(done: float, message: str = "") -> None:
            bar.n = round(100 * done)
            bar.set_postfix_str(message)
            bar.refresh()
        kw["on_progress"] = report
        if kind == "learned":
            pred = cls.fit(trace.extra["router_inputs"], trace.token_ids, trace.experts, spec.moe.num_experts,
                           spec.vocab_size, layers=list(spec.moe_layers), **kw)
        else:
            pred = cls.fit(trace.experts, trace.probs, trace.seq_offsets, spec.moe.num_experts, **kw)
    pred.save(target)
    return target
