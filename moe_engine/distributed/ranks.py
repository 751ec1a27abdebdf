"""What every rank does the same way at start: which settings must agree, its device, its plan, its summary."""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from ..config import format_size
from ..errors import ConfigError
from ..experts.plan import make_plan
from ..runtime.config import EngineConfig
from ..runtime.resources import auto_budgets
from .placement import ExpertPlacement, ShardCheckpoint
from .shard import Shard


def check_supported(config: EngineConfig) -> None:
    if config.quant is not None:
        raise ConfigError(f"quant={config.quant.name} (--quant) does not work with expert_parallel="
                          f"{config.expert_parallel} yet (each rank would quantize every expert); drop one of them")
    spec = getattr(config, "speculative", None)
    if spec is not None and spec.method == "resident":
        raise ConfigError(RESIDENT_DRAFTS)


RESIDENT_DRAFTS = ("speculative method 'resident' (--speculative-config) drafts from the experts ready in one cache "
                   "and does not work with expert_parallel > 1 (--expert-parallel); use ngram or draft_model")


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """cuda without an index: this host's GPU number LOCAL_RANK."""
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def settings(config: EngineConfig, dtype: torch.dtype, placement: ExpertPlacement) -> dict:
    """The settings every rank must share (budgets, policy, threads and predictor may differ per rank)."""
    k = config.kernels
    return {"dtype": str(dtype).removeprefix("torch."), "device": config.device.type,
            "expert_parallel": config.expert_parallel,
            "expert placement": hashlib.sha256(repr(placement.key()).encode()).hexdigest()[:16],
            "kernels": f"linear={k.linear} quant={k.quant} decode_ops={k.decode_ops}"}


def rank_plan(config: EngineConfig, view: ShardCheckpoint, device: torch.device, dtype: torch.dtype,
              non_expert: int, kv_tokens: int | None):
    """This rank's placement plan over its share (None: no budget, every expert of the share resident).
    kv_tokens 0: a worker, which holds no KV cache."""
    offload = config.offload
    if not offload.budgeted:
        return None
    budgets = auto_budgets(offload.gpu_mem, offload.cpu_mem, device)
    offload = budgets.apply(offload)
    staging = 0 if view.raw_is_packed(dtype) else offload.io_threads
    plan = make_plan(view.spec, device, dtype, non_expert, offload.gpu_mem, offload.cpu_mem,
                     kv_tokens if kv_tokens != 0 else 1, offload.io_threads, staging,
                     device_auto=budgets.device_auto and budgets.device_auto.describe(),
                     host_auto=budgets.host_auto and budgets.host_auto.describe(), notes=tuple(budgets.notes),
                     runtime_bytes=budgets.runtime_rss)
    return dataclasses.replace(plan, kv_tokens=0, kv_bytes=0) if kv_tokens == 0 else plan


def share_line(rank: int, placement: ExpertPlacement, shard: dict) -> str:
    """One rank's line of the placement plan: its experts, their bytes, its budget and slots."""
    first = next(iter(placement.owned))
    ids = placement.experts_of(rank, first)
    same = all(placement.experts_of(rank, m) == ids for m in placement.owned)
    which = f"experts {list(ids)}" + (" of every MoE layer" if same else f" of layer {first} (others differ)")
    return (f"  rank {rank}: {placement.share} of {placement.num_experts} experts per MoE layer ({which}), "
            f"{format_size(shard['share_bytes'])} of experts; {shard['budget']}")


def shard_summary(shard: Shard, plan, dtype: torch.dtype, threads) -> dict:
    """What rank 0 prints and keeps of a rank's share (sent by workers after their build)."""
    spec = shard.view.spec
    share_bytes = len(spec.moe_layers) * spec.moe.num_experts * shard.view.layout.nbytes(dtype)
    if plan is None:
        budget = "no budget: its experts resident"
    else:
        budget = (f"--gpu-mem {format_size(plan.device_budget) if plan.device_budget else 'none'}, "
                  f"{plan.device_slots} expert slots" + (f", --cpu-mem {format_size(plan.host_budget)}"
                                                          if plan.host_budget else ""))
    return {"rank": shard.rank, "share_bytes": share_bytes, "budget": budget, "evicts": bool(shard.cache.evicts),
            "quotas": list(shard.cache.quotas), "plan": plan.describe() if plan is not None else "",
            "device": str(shard.device), "threads": str(threads)}
