"""moe_engine.load(): a checked configuration, then the engine built from it in one pass.

    load(model_dir, **kw) -> EngineConfig.from_kwargs (every value checked, nothing read yet)
        -> build_engine: predictor resolved -> checkpoint opened and validated -> tokenizer
           -> experts quantized (or their cache entry opened) -> placement plan (budgets; with --quant-scope all
              the non-expert bytes are the quantized ones)
           -> decoder (build.build_decoder) -> expert cache (build.build_cache) -> bind_experts -> Engine
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..checkpoint.hub import resolve_model
from ..config import api_words
from ..errors import ConfigError, MoeEngineError
from ..experts.plan import make_plan
from ..quant.dense import DenseQuant
from ..quant.prepare import quantized_experts
from .build import bind_experts, build_cache, build_decoder, non_expert_bytes
from .config import LOAD_KEYWORDS, EngineConfig, resolve_dtype
from .engine import Engine
from .plugins import resolve_predictor
from .resources import apply_threads, auto_budgets

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "tiny-moe"   # bundled (package data)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
logger = logging.getLogger(__name__)
FLAG_KEYWORDS = tuple(k for k in LOAD_KEYWORDS if k not in ("progress", "kernels", "prefetch"))   # have a CLI flag


def load_tokenizer(model_dir: Path):
    """AutoTokenizer from the model directory, or None when it has no tokenizer files."""
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:   # surface as one line that names the directory
        raise MoeEngineError(f"tokenizer files in {model_dir} could not be loaded ({type(e).__name__}: {e})") from None


def model_dir_or_default(model_dir, revision: str | None = None, progress: bool = True,
                         config_only: bool = False) -> Path:
    """MODEL_DIR as given, a Hugging Face hub id (`org/name`) as its snapshot in the HF cache (downloaded when
    missing: checkpoint/hub.py; config_only: config.json alone), or the bundled tiny-moe when it is None."""
    if model_dir is not None:
        return resolve_model(model_dir, revision, progress, config_only)
    if revision is not None:
        raise ConfigError(f"--revision {revision} applies to a Hugging Face hub id given as MODEL_DIR (org/name); "
                          f"drop it or give the hub id")
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ConfigError(f"no model directory given and the bundled default model is missing from "
                          f"{DEFAULT_MODEL_DIR} (a broken install?); reinstall moe-engine or pass MODEL_DIR")
    return DEFAULT_MODEL_DIR


def load(model_dir: str | Path | None = None, revision: str | None = None, **kw) -> Engine:
    """Load a Hugging Face MoE checkpoint directory or hub id (`org/name`, downloaded into the HF cache or taken
    from it; `revision`: its branch, tag or commit), or the bundled tiny-moe (None), and return an Engine.

    Keywords (runtime/config.py LOAD_KEYWORDS; the CLI's flags of the same names):
      device ("auto", "cpu", "cuda[:N]"), dtype ("auto": the checkpoint's, float32, float16, bfloat16), seed;
      gpu_mem / cpu_mem ("8G" or bytes) bound the compute tier and the host tier; with neither, every expert is
      resident; "auto" measures what this process may use (resources.py: free GPU memory; cgroup limit and
      MemAvailable less what is in use, minus a margin). max_kv_tokens: the KV reserve counted against gpu_mem (default min(context, 4096) tokens);
      policy: expert-cache eviction (None: the default policy; lru, lfu); io_threads: loader threads (2);
      predictor: a registered name ("gate-lookahead", "learned", "path", "oracle:TRACE.npz", a plug-in's),
      "pkg.module:Class", a predictor object, or None; it only steers prefetching (predictors/base.py);
      prefetch=False keeps the predictor out of loading;
      quant: None/"none", "int8", "int4", "int3", "int2" or "mixed:AVG_BITS" (experts quantized at load, cached
      under quant_cache, default $MOE_ENGINE_CACHE or ~/.cache/moe-engine); quant_group: columns per scale (64);
      calibration: text file for mixed; quant_scope: "experts" (default) or "all" (the dense matmul weights too:
      attention, shared experts, dense MLPs, lm_head, at quant's width; quant/dense.py); kernels: a KernelConfig
      (default: from the environment);
      threads: compute threads (None: the cores this process may use, unless OMP_NUM_THREADS or an earlier
      torch.set_num_threads chose); progress: progress bars and the placement plan on stderr;
      speculative_config: vLLM's --speculative-config (a dict or its JSON: {"method": "ngram" | "resident", ...}),
      the default of generate() / stream() (a call's speculative_config overrides it; False turns it off) and of
      a server over this engine (None: no speculative decoding).
    Errors name these keywords (the CLI's name its flags).
    """
    try:
        path = model_dir_or_default(model_dir, revision, kw.get("progress", True) is not False)
        return build_engine(EngineConfig.from_kwargs(path, **kw))
    except MoeEngineError as e:
        raise _reworded(e, api_words(str(e), (*FLAG_KEYWORDS, "revision"))) from None


def _reworded(e: MoeEngineError, message: str) -> MoeEngineError:
    """`e` with another message (same class), or `e` itself when its class takes other arguments."""
    if message == str(e):
        return e
    try:
        return type(e)(message)
    except TypeError:
        return e


def build_engine(config: EngineConfig, show_plan: bool | None = None) -> Engine:
    """The engine `config` describes (checked already): every piece built once, in order. show_plan: print the
    placement plan on stderr (default: when config.progress; the CLI always prints it)."""
    predictor = resolve_predictor(config.offload.predictor, config.model_dir)   # a bad name fails before any read
    if config.seed is not None:
        torch.manual_seed(config.seed)
    ckpt = Checkpoint(config.model_dir)
    try:
        return _build(config, ckpt, predictor, config.progress if show_plan is None else show_plan)
    except BaseException:
        ckpt.close()
        raise


def _build(config: EngineConfig, ckpt: Checkpoint, predictor, show_plan: bool) -> Engine:
    dev, dt = config.device, resolve_dtype(config.dtype, None) or ckpt.dtype
    offload, qs, progress = config.offload, config.quant, config.progress
    threads = apply_threads(config.threads)         # torch's compute threads: the cores this process may use
    logger.info(threads)
    tokenizer = load_tokenizer(ckpt.model_dir)
    experts, expert_dt = ckpt, dt
    if qs is not None:
        qs.check_model(ckpt.spec)
        if qs.mode == "mixed" and tokenizer is None:
            raise ConfigError(f"--quant {qs.name} needs a calibration run over text, and {ckpt.model_dir} has no "
                              f"tokenizer files; add them or use --quant int8 / int4")
        float_config = config.replace(quant=None, offload=dataclasses.replace(offload, predictor=None))
        experts = quantized_experts(ckpt, qs, config.quant_cache, progress, lambda: build_engine(float_config))
        expert_dt = torch.uint8
    dense = DenseQuant.of(ckpt.spec, dt, qs) if qs is not None and qs.scope == "all" else None   # --quant-scope all
    quant_lines = (*experts.describe(), *([dense.describe()] if dense else [])) if qs is not None else ()
    plan = None
    if offload.budgeted:
        budgets = auto_budgets(offload.gpu_mem, offload.cpu_mem, dev)    # "auto" -> bytes; RSS before the experts
        offload = budgets.apply(offload)
        staging = 0 if qs is not None or ckpt.raw_is_packed(dt) else offload.io_threads
        plan = make_plan(ckpt.spec, dev, dt, non_expert_bytes(ckpt, dt, qs), offload.gpu_mem, offload.cpu_mem,
                         offload.max_kv_tokens, offload.io_threads, staging,
                         device_auto=budgets.device_auto and budgets.device_auto.describe(),
                         host_auto=budgets.host_auto and budgets.host_auto.describe(), notes=(*budgets.notes, threads),
                         expert_bytes=experts.max_expert_bytes if qs is not None else None,
                         expert_lines=quant_lines, runtime_bytes=budgets.runtime_rss)
        if show_plan:
            print(plan.describe(), file=sys.stderr)
    elif qs is not None and show_plan:
        print("\n".join(quant_lines), file=sys.stderr)
    decoder = build_decoder(ckpt, dt, dev, progress, config.kernels, qs)
    cache = build_cache(experts, decoder, plan, expert_dt, dev, offload, predictor, progress)
    bind_experts(decoder, cache, experts.layouts if qs is not None else None, config.kernels.quant)
    summary = {**experts.summary(), "scope": qs.scope, **(dense.summary() if dense else {})} if qs is not None else None
    return Engine(ckpt, decoder, cache, tokenizer, dev, dt, offload.gpu_mem, offload.cpu_mem, plan, quant=summary,
                  speculative=config.speculative)
