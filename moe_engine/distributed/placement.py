"""Which rank owns which expert of every MoE layer, and each rank's view of the checkpoint through its share.

    ExpertPlacement   owner[layer][e] and the local index of e on its owner; every rank owns E / N experts of
                      every MoE layer (N must divide E): contiguous (rank r: experts r*E/N .. (r+1)*E/N - 1), or
                      balanced from profiled expert load (a routing trace .npz): per layer, experts in decreasing
                      load go to the least loaded rank with room, so hot experts land on different ranks
    ShardCheckpoint   the checkpoint as one rank sees it: a spec whose MoE layers have
                      E / N experts, expert e_local read as its global id; every other attribute is the source's,
                      so the plan, caches and loaders of experts/ run unchanged over a rank's share and never read
                      an expert the rank does not own

Imports torch and numpy only (and the trace reader).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..model.spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    world_size: int
    num_experts: int
    owned: dict[int, tuple[tuple[int, ...], ...]]   # layer -> per rank, its experts' global ids (local order)
    source: str = "contiguous"                      # how it was chosen (printed with the plan)

    @property
    def share(self) -> int:
        return self.num_experts // self.world_size

    def experts_of(self, rank: int, layer: int) -> tuple[int, ...]:
        return self.owned[layer][rank]

    def tables(self, rank: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (mine bool [E]: experts `rank` owns, local int64 [E]: each one's local index, -1 elsewhere)."""
        out = {}
        for layer, ranks in self.owned.items():
            mine = torch.zeros(self.num_experts, dtype=torch.bool)
            local = torch.full((self.num_experts,), -1, dtype=torch.int64)
            ids = torch.tensor(ranks[rank], dtype=torch.int64)
            mine[ids] = True
            local[ids] = torch.arange(len(ids))
            out[layer] = (mine, local)
        return out

    def key(self) -> tuple:
        """What every rank must agree on (compared at start)."""
        return self.world_size, self.num_experts, tuple(sorted(self.owned.items()))


def check_world(world_size: int, num_experts: int) -> None:
    """expert_parallel must split every MoE layer's experts evenly."""
    if world_size > num_experts:
        raise ConfigError(f"expert_parallel={world_size} (--expert-parallel) is more than the model's {num_experts} "
                          f"experts per layer; use at most {num_experts}")
    if num_experts % world_size:
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ConfigError(f"expert_parallel={world_size} (--expert-parallel) must divide the model's {num_experts} "
                          f"experts per layer so every rank owns as many; use one of {divisors}")


def contiguous(spec: ModelSpec, world_size: int) -> ExpertPlacement:
    e = spec.moe.num_experts
    check_world(world_size, e)
    share = e // world_size
    ranks = tuple(tuple(range(r * share, (r + 1) * share)) for r in range(world_size))
    return ExpertPlacement(world_size, e, {layer: ranks for layer in spec.moe_layers})


def balanced(spec: ModelSpec, world_size: int, load: np.ndarray, source: str) -> ExpertPlacement:
    """load [L_moe, E]: tokens routed to each expert of each MoE layer -> hot experts spread over the ranks."""
    e = spec.moe.num_experts
    check_world(world_size, e)
    share = e // world_size
    owned = {}
    for row, layer in zip(load, spec.moe_layers):
        ranks: list[list[int]] = [[] for _ in range(world_size)]
        totals = [0.0] * world_size
        for expert in sorted(range(e), key=lambda x: (-float(row[x]), x)):
            r = min((r for r in range(world_size) if len(ranks[r]) < share), key=lambda r: (totals[r], r))
            ranks[r].append(expert)
            totals[r] += float(row[expert])
        owned[layer] = tuple(tuple(sorted(r)) for r in ranks)
    return ExpertPlacement(world_size, e, owned, source)


def load_from_trace(spec: ModelSpec, path: Path) -> np.ndarray:
    """Tokens per (MoE layer, expert) of a routing trace (profiling/trace.py's npz), checked against the model."""
    from ..profiling.trace import load_trace   # numpy only; profiling imports the runtime, which this package uses
    trace = load_trace(path, spec.moe.num_experts)
    n_moe = len(spec.moe_layers)
    if trace.num_layers != n_moe:
        raise ConfigError(f"expert_placement={path} (--expert-placement) is a trace of {trace.num_layers} MoE layers; "
                          f"this model has {n_moe}; record one with `moe-engine trace` on this model")
    counts = np.zeros((n_moe, spec.moe.num_experts), dtype=np.float64)
    for i in range(n_moe):
        counts[i] = np.bincount(trace.experts[:, i].reshape(-1).astype(np.int64), minlength=spec.moe.num_experts)
    return counts


def make_placement(spec: ModelSpec, world_size: int, trace: str | Path | None) -> ExpertPlacement:
    """Contiguous shares, or shares balanced by the expert load of `trace` (a routing trace .npz)."""
    if trace is None:
        return contiguous(spec, world_size)
    path = Path(trace).expanduser()
    if not path.is_file():
        raise ConfigError(f"expert_placement={trace} (--expert-placement) is not a file; give a routing trace .npz "
                          f"(`moe-engine trace MODEL --prompts FILE --out TRACE.npz`) or leave it out for contiguous shares")
    return balanced(spec, world_size, load_from_trace(spec, path), f"balanced by the expert load in {path.name}")


def local_spec(spec: ModelSpec, share: int) -> ModelSpec:
    """The spec a rank's caches plan for: E / N experts per MoE layer (routing is done on rank 0 with the model's)."""
    moe = dataclasses.replace(spec.moe, num_experts=share, top_k=min(spec.moe.top_k, share), n_group=1,
                              topk_group=1, group_score_top=1)
    return dataclasses.replace(spec, moe=moe)


class ShardCheckpoint:
    """`source` (a Checkpoint) seen through one rank's share: its experts renumbered
    0..E/N-1 per layer. Methods taking (layer, expert) translate the expert; everything else is the source's."""

    EXPERT_METHODS = ("expert_infos", "expert_is_packed", "pack_raw", "read_expert")

    def __init__(self, source, placement: ExpertPlacement, rank: int):
        self.source, self.rank = source, rank
        self.spec = local_spec(source.spec, placement.share)
        self._global = {layer: placement.experts_of(rank, layer) for layer in placement.owned}

    def __getattr__(self, name: str):
        value = getattr(self.source, name)
        if name in self.EXPERT_METHODS:
            return lambda layer, expert, *a, **kw: value(layer, self._global[layer][expert], *a, **kw)
        return value
