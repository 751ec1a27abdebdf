"""The engine's configuration: frozen, validated dataclasses built once, from CLI flags or `load()` keywords.

    EngineConfig            model_dir, device, dtype, seed, progress, threads (--threads: compute threads)
      .offload  OffloadConfig   budgets (--gpu-mem, --cpu-mem), KV reserve, eviction policy, predictor,
                                prefetching, loader threads
      .quant    QuantSettings   --quant / --quant-group / --calibration / --quant-scope (quant/settings.py), or None
      .kernels  KernelConfig    which fast paths the build picks (environment variables as defaults only)

`EngineConfig.from_kwargs(model_dir, **kw)` takes moe_engine.load()'s keywords (unknown ones are named in
the error), `EngineConfig.from_args(args)` the CLI's flags; both check every value before any file is
opened, with errors that name the flag and the keyword. Nothing downstream reads the environment or
re-checks a value: the build (build.py) passes each one on explicitly.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import check_choice, check_int, parse_budget
from ..errors import ConfigError
from ..experts.policies import DEFAULT_POLICY, make_policy
from ..quant.settings import QuantSettings, parse_quant
from .plugins import DEFAULT_PREDICTOR
from .speculative import SpeculativeConfig, choose

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
LINEAR_KERNEL_ENV = "MOE_ENGINE_LINEAR_KERNEL"     # "reference": the bf16 GEMV's torch twin, no decode ops
QUANT_KERNEL_ENV = "MOE_ENGINE_QUANT_KERNEL"       # "reference": the C / Triton kernels' torch twins, per expert
KERNEL_CHOICES = ("auto", "reference")


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
    """A dtype name or torch dtype -> torch dtype; "auto" -> the checkpoint's (None until it is known)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype == "auto":
        return checkpoint_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class OffloadConfig:
    """Where experts live and how they move. With neither budget every expert is resident."""

    gpu_mem: int | str | None = None         # --gpu-mem: the compute tier's budget, bytes ("8G" accepted) or "auto"
    cpu_mem: int | str | None = None         # --cpu-mem: the host tier's budget (GPU compute) or "auto"
    max_kv_tokens: int | None = None         # --max-kv-tokens: KV reserve counted in --gpu-mem
    policy: str = DEFAULT_POLICY             # --policy: eviction policy
    predictor: object = DEFAULT_PREDICTOR    # --predictor: name, "pkg.module:Class", an object, or None
    prefetch: bool = True                    # False: the predictor is not used for prefetching
    io_threads: int = 2                      # --io-threads: expert loader threads

    def __post_init__(self):
        object.__setattr__(self, "gpu_mem", parse_budget(self.gpu_mem, "--gpu-mem / gpu_mem"))   # "auto": measured
        object.__setattr__(self, "cpu_mem", parse_budget(self.cpu_mem, "--cpu-mem / cpu_mem"))   # at build
        make_policy(self.policy)                                       # an unknown name lists the policies
        check_int(self.max_kv_tokens, "max_kv_tokens", optional=True)
        check_int(self.io_threads, "io_threads", 1, 64)
        if not isinstance(self.prefetch, bool):
            raise ConfigError(f"prefetch={self.prefetch!r} is invalid: use True or False")

    @property
    def budgeted(self) -> bool:
        return self.gpu_mem is not None or self.cpu_mem is not None


@dataclass(frozen=True)
class KernelConfig:
    """Fast paths the build chooses once: "auto" takes the fastest this machine runs, "reference" the torch
    twin (a test and debugging hook). decode_ops=False keeps the bf16 GEMV but runs one-token steps through
    the model's torch code."""

    linear: str = "auto"                     # MOE_ENGINE_LINEAR_KERNEL: bf16 GEMV (C) or its twin
    quant: str = "auto"                      # MOE_ENGINE_QUANT_KERNEL: quantized matmul (C / Triton) or its twin
    decode_ops: bool = True                  # the fused one-token ops of a bf16 model on the CPU

    def __post_init__(self):
        check_choice(self.linear, f"linear kernel ({LINEAR_KERNEL_ENV})", KERNEL_CHOICES)
        check_choice(self.quant, f"quant kernel ({QUANT_KERNEL_ENV})", KERNEL_CHOICES)

    @classmethod
    def from_env(cls, environ=None) -> KernelConfig:
        env = os.environ if environ is None else environ
        return cls(env.get(LINEAR_KERNEL_ENV) or "auto", env.get(QUANT_KERNEL_ENV) or "auto")


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    device: torch.device = field(default_factory=lambda: resolve_device("auto"))
    dtype: str | torch.dtype = "auto"        # "auto": the checkpoint's
    seed: int | None = None
    progress: bool = True
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    quant: QuantSettings | None = None
    quant_cache: Path | None = None          # --quant-cache (default $MOE_ENGINE_CACHE or ~/.cache/moe-engine)
    kernels: KernelConfig = field(default_factory=KernelConfig.from_env)
    threads: int | None = None               # --threads: compute threads (None: the cores this process may use,
                                             # unless OMP_NUM_THREADS or torch.set_num_threads chose; resources.py)
    speculative: SpeculativeConfig | None = None   # --speculative-config: generate()/stream()'s and the server's
                                                   # default (None: no speculative decoding)
    expert_parallel: int = 1                 # --expert-parallel: ranks sharing the routed experts (distributed/)
    expert_placement: Path | None = None     # --expert-placement: a routing trace .npz to spread hot experts by

    def __post_init__(self):
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        check_int(self.threads, "threads", 1, 4096, optional=True, flag="--threads")
        object.__setattr__(self, "device", resolve_device(self.device))
        resolve_dtype(self.dtype, None)
        check_int(self.seed, "seed", minimum=None, optional=True)
        check_int(self.expert_parallel, "expert_parallel", 1, 4096, flag="--expert-parallel")
        if self.expert_placement is not None:
            if self.expert_parallel == 1:
                raise ConfigError("expert_placement (--expert-placement) places experts on the ranks of "
                                  "expert_parallel > 1 (--expert-parallel N); drop it or give expert_parallel")
            object.__setattr__(self, "expert_placement", Path(self.expert_placement))

    @classmethod
    def from_kwargs(cls, model_dir, **kw) -> EngineConfig:
        """moe_engine.load()'s keywords (see LOAD_KEYWORDS) -> a checked config."""
        unknown = sorted(set(kw) - set(LOAD_KEYWORDS))
        if unknown:
            raise ConfigError(f"load() got unknown keyword(s) {', '.join(unknown)}; it takes "
                              f"{', '.join(LOAD_KEYWORDS)}")
        get = {**LOAD_KEYWORDS, **kw}.get
        offload = OffloadConfig(get("gpu_mem"), get("cpu_mem"), get("max_kv_tokens"), get("policy") or DEFAULT_POLICY,
                                get("predictor"), get("prefetch"), get("io_threads"))
        quant = parse_quant(get("quant"), get("quant_group"), get("calibration"), get("quant_scope"))
        cache = get("quant_cache")
        return cls(model_dir, get("device"), get("dtype"), get("seed"), get("progress"), offload, quant,
                   None if cache is None else Path(cache), get("kernels") or KernelConfig.from_env(),
                   get("threads"), choose(get("speculative_config"), None),
                   expert_parallel=get("expert_parallel"), expert_placement=get("expert_placement"))

    @classmethod
    def from_args(cls, model_dir, args) -> EngineConfig:
        """The loading flags of a CLI subcommand (cli._add_load_flags) -> a checked config."""
        return cls.from_kwargs(model_dir, device=args.device, dtype=args.dtype, gpu_mem=args.gpu_mem,
                               cpu_mem=args.cpu_mem, predictor=args.predictor, quant=args.quant,
                               quant_group=args.quant_group, calibration=args.calibration,
                               quant_cache=args.quant_cache, progress=not args.no_progress, policy=args.policy,
                               max_kv_tokens=args.max_kv_tokens, io_threads=args.io_threads, threads=args.threads,
                               quant_scope=args.quant_scope,
                               speculative_config=getattr(args, "speculative_config", None),
                               expert_parallel=getattr(args, "expert_parallel", 1),
                               expert_placement=getattr(args, "expert_placement", None))

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)


# load()'s keywords and their defaults (the CLI's flags of the same names have the same defaults)
LOAD_KEYWORDS = {"device": "auto", "dtype": "auto", "gpu_mem": None, "cpu_mem": None,
                 "predictor": DEFAULT_PREDICTOR, "quant": None, "seed": None, "progress": True, "policy": None,
                 "max_kv_tokens": None, "io_threads": 2, "prefetch": True, "quant_group": None, "calibration": None,
                 "quant_cache": None, "kernels": None, "threads": None, "quant_scope": "experts",
                 "speculative_config": None, "expert_parallel": 1, "expert_placement": None}
