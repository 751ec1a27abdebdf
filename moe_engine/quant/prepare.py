"""Quantize a checkpoint's experts at load: find the cache entry, or choose widths and write it.

    settings + checkpoint contents -> key -> CACHE/quant/<key> intact? -> open it (fast path)
                                                     | no (missing, stale or corrupt)
                          int: one width | mixed: calibration run + integer program per layer
                                                     v
                                  quantize every expert -> write the entry -> verify -> open it
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, MoeEngineError
from .allocate import allocate_bits, importance
from .calibrate import expert_errors, record_calibration
from .settings import QuantSettings
from .store import (QuantizedExperts, cache_root, cache_write_error, checkpoint_digest, clean_stale, entry_key,
                    verify_entry, write_entry)

log = logging.getLogger("moe_engine")


def quantized_experts(ckpt, settings: QuantSettings, cache_dir=None, progress: bool = True,
                      float_engine: Callable | None = None, bits_table: dict[int, list[int]] | None = None
                      ) -> QuantizedExperts:
    """The opened cache entry for `ckpt` under `settings` (built first when missing or unusable).

    float_engine(): an Engine over the unquantized checkpoint, for the calibration run of mixed.
    bits_table: explicit widths per MoE layer (benchmarks' baselines); overrides the settings' choice.
    """
    if bits_table is None and settings.bits_table is not None:
        bits_table = dict(zip(ckpt.spec.moe_layers, map(list, settings.bits_table)))
    root = cache_root(cache_dir)
    _check_writable(root)
    clean_stale(root)                      # temporary entries of builds that were killed
    calib = _sha256(settings.calibration) if settings.mode == "mixed" and bits_table is None else None
    table = {str(k): v for k, v in bits_table.items()} if bits_table is not None else None
    key = entry_key(checkpoint_digest(ckpt, root, progress), settings, calib, table)
    entry = root / "quant" / key
    if entry.exists():
        manifest, why = verify_entry(entry, key, ckpt)
        if manifest is not None:
            return QuantizedExperts(entry, ckpt, manifest)
        log.warning("the quantized-expert cache %s is stale or corrupt (%s); rebuilding it", entry, why)
        shutil.rmtree(entry, ignore_errors=True)
    bits = bits_table or choose_bits(ckpt, settings, float_engine, progress)
    entry = write_entry(root, key, ckpt, settings, bits, progress)
    manifest, why = verify_entry(entry, key, ckpt)
    if manifest is None:
        raise MoeEngineError(f"the quantized-expert cache {entry} failed its check right after it was written "
                             f"({why}); is the disk full or failing? Try another --quant-cache DIR")
    return QuantizedExperts(entry, ckpt, manifest)


def choose_bits(ckpt, settings: QuantSettings, float_engine: Callable | None, progress: bool) -> dict[int, list[int]]:
    """Width per expert per MoE layer: the setting's one width, or MC-MoE's allocation for mixed."""
    spec = ckpt.spec
    if settings.mode == "int":
        return {m: [settings.bits] * spec.moe.num_experts for m in spec.moe_layers}
    if float_engine is None:
        raise ConfigError("--quant mixed needs a calibration run; no unquantized engine was given to run it")
    eng = float_engine()
    try:
        stats = record_calibration(eng, settings.calibration, settings.calibration_tokens,
                                   settings.samples_per_layer, progress)
    finally:
        eng.close()
    bits = {}
    for m in tqdm(spec.moe_layers, desc="measuring quantization error", unit="layer", disable=not progress,
                  leave=False):
        s = stats[m]
        inputs = torch.stack(s.inputs)                                          # [S, D]
        err = expert_errors(ckpt, m, inputs, settings.candidates, settings.group_size,
                            spec.moe.expert_act or spec.hidden_act)
        cost = importance(s.tokens, s.weights)[:, None] * err                   # [E, widths]
        bits[m] = allocate_bits(cost, settings.candidates, settings.avg_bits)
        log.info("layer %d widths %s (mean %.2f)", m, bits[m], np.mean(bits[m]))
    return bits


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_writable(root) -> None:
    try:
        (root / "quant").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cache_write_error(root, e) from None
