"""Resolving `--predictor` / `predictor=` to a predictor object.

Accepted, in this order:
  None or "none"             no predictor (demand loading only)
  an object / a class         used as is / instantiated (anything with bind, observe and predict)
  "NAME" or "NAME:FILE"      a built-in (predictors.BUILTIN) or a plug-in registered under the entry point
                             group `moe_engine.predictors`; FILE is passed to the class's `load(FILE)`
                             (a trained predictor file, or a trace for `oracle`)
  "pkg.module:Class"         imported from an installed or importable module
A class with a `from_model_dir(model_dir)` classmethod is built with it (trained predictors keep
their weights beside the model); otherwise it is called with no arguments.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path

from predictors import BUILTIN
from predictors.base import PredictorUnavailable

from ..errors import ConfigError

ENTRY_POINT_GROUP = "moe_engine.predictors"
DEFAULT_PREDICTOR = "gate-lookahead"
REQUIRED_METHODS = ("bind", "observe", "predict")


def registered() -> dict[str, object]:
    """Name -> class (or entry point, loaded on use) of every predictor available by name."""
    names: dict[str, object] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(ep.name, ep)
    names.update(BUILTIN)                  # built-ins win over a plug-in of the same name
    return names


def _available() -> str:
    return ", ".join(sorted(registered())) + ", none, or 'pkg.module:Class'"


def resolve_predictor(spec, model_dir: Path | None):
    """A fresh predictor object for `spec`, or None; every problem is a ConfigError naming the fix."""
    if spec is None or spec == "none":
        return None
    try:
        return _build(spec, model_dir)
    except PredictorUnavailable as e:
        raise ConfigError(f"predictor={spec!r}: {e}") from None


def _build(spec, model_dir: Path | None):
    if not isinstance(spec, str):
        obj = _instantiate(spec, model_dir, spec) if isinstance(spec, type) else spec
        return _checked(obj, spec)
    names = registered()
    name, _, arg = spec.partition(":")
    if name in names:
        factory = names[name]
        if isinstance(factory, metadata.EntryPoint):
            factory = _load_entry_point(factory, spec)
        if arg:
            if not hasattr(factory, "load"):
                raise ConfigError(f"predictor={spec!r}: {name} takes no file argument; use predictor={name!r}")
            return _checked(factory.load(arg), spec)
        return _checked(_instantiate(factory, model_dir, spec), spec)
    if arg:
        return _checked(_instantiate(_import(name, arg, spec), model_dir, spec), spec)
    raise ConfigError(f"predictor={spec!r} is unknown; available: {_available()}")


def _load_entry_point(ep: metadata.EntryPoint, spec: str):
    try:
        return ep.load()
    except Exception as e:
        raise ConfigError(f"predictor={spec!r}: the plug-in registered as {ep.value!r} (entry point group "
                          f"{ENTRY_POINT_GROUP}) failed to import ({type(e).__name__}: {e})") from None


def _import(module: str, attr: str, spec: str):
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise ConfigError(f"predictor={spec!r}: module {module!r} could not be imported ({type(e).__name__}: {e}); "
                          f"install it or put it on PYTHONPATH (registered predictors: {_available()})") from None
    if not hasattr(mod, attr):
        raise ConfigError(f"predictor={spec!r}: module {module!r} has no attribute {attr!r}")
    return getattr(mod, attr)


def _instantiate(factory, model_dir: Path | None, spec):
    from_dir = getattr(factory, "from_model_dir", None)
    if from_dir is not None and model_dir is not None:
        return from_dir(Path(model_dir))
    try:
        return factory()
    except TypeError as e:
        raise ConfigError(f"predictor={spec!r}: {factory!r} could not be created without arguments ({e}); "
                          f"give it a no-argument constructor or a from_model_dir(model_dir) classmethod") from None


def _checked(obj, spec):
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(f"predictor={spec!r}: {type(obj).__name__} is not an ExpertPredictor (missing "
                          f"{', '.join(missing)}); see predictors/base.py")
    return obj


def default_predictor():
    """The fallback when a predictor misbehaves at run time."""
    return BUILTIN[DEFAULT_PREDICTOR]()
