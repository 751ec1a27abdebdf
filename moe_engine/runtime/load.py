"""moe_engine.load(): resolve device and dtype, read the checkpoint, build decoder and experts."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..config import parse_size
from ..errors import ConfigError, MoeEngineError
from ..experts.plan import make_plan
from ..quant.prepare import quantized_experts
from ..quant.settings import parse_quant
from .build import build_decoder, build_provider, non_expert_bytes, set_expert_layouts
from .engine import Engine
from .plugins import resolve_predictor

log = logging.getLogger("moe_engine")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny-moe"   # bundled (package data)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for CUDA but torch sees no GPU; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported")
    return dev


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None) -> torch.dtype | None:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype == "auto":
        return checkpoint_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: Path):
    """AutoTokenizer from the model directory, or None when it has no tokenizer files."""
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:   # surface as one line that names the directory
        raise MoeEngineError(f"tokenizer files in {model_dir} could not be loaded ({type(e).__name__}: {e})") from None


def load(model_dir: str | Path | None = None, device: str = "auto", dtype: str = "auto",
         gpu_mem=None, cpu_mem=None, predictor="gate-lookahead", quant=None, seed: int | None = None,
         progress: bool = True, policy: str | None = None, max_kv_tokens: int | None = None, io_threads: int = 2,
         prefetch: bool = True, quant_group: int | None = None, calibration=None, quant_cache=None) -> Engine:
    """Load a Hugging Face MoE checkpoint directory (None: the bundled tiny-moe) and return an Engine.

    gpu_mem / cpu_mem ("8G" or bytes) bound the compute tier and the host tier; with neither, every
    expert is resident. policy: expert-cache eviction (None: the default policy; lru, lfu); max_kv_tokens: the KV
    reserve counted against gpu_mem (default: min(context, 4096) tokens). predictor: a registered name
    ("gate-lookahead", "learned", "path", "oracle:TRACE.npz", a plug-in's), "pkg.module:Class", a predictor
    object, or None; it only steers prefetching (see predictors/base.py). quant: None/"none", "int8", "int4",
    "int3", "int2" or "mixed:AVG_BITS" (experts quantized at load, cached under quant_cache, default
    $MOE_ENGINE_CACHE or ~/.cache/moe-engine); quant_group: columns per scale (64); calibration: text file for mixed.
    """
    if model_dir is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ConfigError(f"no model directory given and the bundled default model is missing from "
                              f"{DEFAULT_MODEL_DIR} (a broken install?); reinstall moe-engine or pass MODEL_DIR")
        model_dir = DEFAULT_MODEL_DIR
    pred = resolve_predictor(predictor, model_dir)      # a bad name or an untrained predictor fails now
    from ..experts.policies import DEFAULT_POLICY, make_policy
    policy = policy or DEFAULT_POLICY
    make_policy(policy)                      # a bad name fails before any work
    qs = parse_quant(quant, quant_group, calibration)     # bad bits, group or calibration file fail now
    gpu_bytes, cpu_bytes = parse_size(gpu_mem, "gpu_mem"), parse_size(cpu_mem, "cpu_mem")
    if max_kv_tokens is not None and (isinstance(max_kv_tokens, bool) or not isinstance(max_kv_tokens, int)
                                      or max_kv_tokens < 1):
        raise ConfigError(f"max_kv_tokens={max_kv_tokens!r} is invalid: use a positive integer")
    if isinstance(io_threads, bool) or not isinstance(io_threads, int) or not 1 <= io_threads <= 64:
        raise ConfigError(f"io_threads={io_threads!r} is invalid: use an integer from 1 to 64")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, None)   # None for "auto": the checkpoint's dtype, known once config.json is read
    if seed is not None:
        torch.manual_seed(seed)
    ckpt = Checkpoint(model_dir)
    try:
        dt = dt or ckpt.dtype
        tokenizer = load_tokenizer(ckpt.model_dir)
        if qs is not None:
            qs.check_model(ckpt.spec)
            if qs.mode == "mixed" and tokenizer is None:
                raise ConfigError(f"--quant {qs.name} needs a calibration run over text, and {ckpt.model_dir} has no "
                                  f"tokenizer files; add them or use --quant int8 / int4")
        experts, expert_dt = ckpt, dt
        if qs is not None:
            def float_engine():
                return load(model_dir, device=device, dtype=dtype, gpu_mem=gpu_mem, cpu_mem=cpu_mem, predictor=None,
                            progress=progress, policy=policy, max_kv_tokens=max_kv_tokens, io_threads=io_threads)
            experts = quantized_experts(ckpt, qs, quant_cache, progress, float_engine)
            expert_dt = torch.uint8
        plan = None
        if gpu_bytes is not None or cpu_bytes is not None:
            staging = 0 if qs is not None or ckpt.raw_is_packed(dt) else io_threads
            plan = make_plan(ckpt.spec, dev, dt, non_expert_bytes(ckpt, dt), gpu_bytes, cpu_bytes,
                             max_kv_tokens, io_threads, staging,
                             expert_bytes=experts.max_expert_bytes if qs is not None else None,
                             expert_lines=tuple(experts.describe()) if qs is not None else ())
            if progress:
                print(plan.describe(), file=sys.stderr)
        elif qs is not None and progress:
            print("\n".join(experts.describe()), file=sys.stderr)
        decoder = build_decoder(ckpt, dt, dev, progress)
        if qs is not None:
            set_expert_layouts(decoder, experts)
        provider = build_provider(experts, decoder, plan, expert_dt, dev, policy, pred, prefetch, io_threads,
                                  progress)
    except BaseException:
        ckpt.close()
        raise
    eng = Engine(ckpt, decoder, provider, tokenizer, dev, dt, gpu_bytes, cpu_bytes, plan)
    eng.quant = experts.summary() if qs is not None else None
    return eng
