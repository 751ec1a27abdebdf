"""moe_engine.load(): resolve device and dtype, read the checkpoint, build decoder and experts."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..config import parse_size
from ..errors import ConfigError, MoeEngineError
from ..experts import ResidentExperts
from .build import build_decoder
from .engine import Engine

log = logging.getLogger("moe_engine")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
PREDICTORS = ("gate-lookahead",)   # all experts are resident in this build: predictions steer nothing yet
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
         gpu_mem=None, cpu_mem=None, predictor: str = "gate-lookahead", quant=None, seed: int | None = None,
         progress: bool = True) -> Engine:
    """Load a Hugging Face MoE checkpoint directory (None: the bundled tiny-moe) and return an Engine."""
    if model_dir is None:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ConfigError(f"no model directory given and the bundled default model is missing from "
                              f"{DEFAULT_MODEL_DIR} (a broken install?); reinstall moe-engine or pass MODEL_DIR")
        model_dir = DEFAULT_MODEL_DIR
    if predictor not in PREDICTORS:
        raise ConfigError(f"predictor={predictor!r} is unknown; available: {', '.join(PREDICTORS)}")
    if quant not in (None, "none"):
        raise ConfigError(f"quant={quant!r}: quantization is not available in this build; use quant=None")
    gpu_bytes, cpu_bytes = parse_size(gpu_mem, "gpu_mem"), parse_size(cpu_mem, "cpu_mem")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, None)   # None for "auto": the checkpoint's dtype, known once config.json is read
    if seed is not None:
        torch.manual_seed(seed)
    ckpt = Checkpoint(model_dir)
    try:
        dt = dt or ckpt.dtype
        tokenizer = load_tokenizer(ckpt.model_dir)
        decoder = build_decoder(ckpt, dt, dev, progress)
        provider = ResidentExperts(ckpt, dt, dev, progress)
    except BaseException:
        ckpt.close()
        raise
    return Engine(ckpt, decoder, provider, tokenizer, dev, dt, gpu_bytes, cpu_bytes)
