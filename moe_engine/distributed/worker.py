"""A worker rank (1..N-1): joins, agrees with rank 0, builds its share of the experts, then runs rank 0's commands.

    python -m moe_engine.distributed.worker     a worker spawned by rank 0 (its config pickled in a file named by
                                                MOE_ENGINE_EP_CONFIG; the env:// variables name the store)
    run_worker(config, rank, world, local)      the same for a torchrun rank other than 0 (its own flags)

A worker holds no tokenizer, KV cache or non-expert weight: only its experts, its cache (its own budget, tiers and
loader threads) and a weightless copy of the decoder's MoE blocks that picks its strategies. Anything that goes
wrong is written to the store (error/RANK) before it exits, so rank 0 can name it.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..runtime.config import resolve_dtype
from ..runtime.resources import apply_threads
from . import group
from .comm import PeerLost, serve_commands
from .ranks import check_supported, rank_device, rank_plan, settings, shard_summary
from .placement import ShardCheckpoint, make_placement
from .shard import Shard
from .stats import rank_figures

WAIT = 24 * 3600.0       # seconds a worker waits for rank 0's word at start (rank 0's own checks bound it)


def run_worker(config, rank: int, world: int, local: int) -> int:
    """The worker's whole life; returns its exit code (0 after rank 0's STOP)."""
    store = group.connect_store(rank, world)
    group.heartbeat(rank, world)
    store.set(f"joined/{rank}", "1")
    try:
        return _serve(config, store, rank, world, local)
    except BaseException as e:   # noqa: BLE001 - posted for rank 0, then the process exits
        try:
            store.set(f"error/{rank}", group.one_line(e))
        except Exception:   # noqa: BLE001 - the store is gone with rank 0: nobody to tell
            pass
        return 1


def _wait(store, key: str):
    store.wait([key], group.datetime.timedelta(seconds=WAIT))
    return pickle.loads(store.get(key))


def _serve(config, store, rank: int, world: int, local: int) -> int:
    check_supported(config)
    ckpt = Checkpoint(config.model_dir)
    placement = make_placement(ckpt.spec, world, config.expert_placement)
    dt = resolve_dtype(config.dtype, None) or ckpt.dtype
    group.post(store, f"fp/{rank}", group.fingerprint(ckpt.model_dir, settings(config, dt, placement)))
    if _wait(store, "verdict") is not None:
        return 1
    try:
        dev = rank_device(config.device, local)
        threads = apply_threads(config.threads)
        view = ShardCheckpoint(ckpt, placement, rank)
        plan = rank_plan(config, view, dev, dt, 0, 0)
        shard = Shard(view, placement, plan, dt, dev, config.offload, config.kernels, False)
        group.post(store, f"built/{rank}", shard_summary(shard, plan, dt, threads))
    except Exception as e:   # noqa: BLE001 - reported by rank 0 with this rank's number
        group.post(store, f"built/{rank}", {"error": group.one_line(e)})
        return 1
    if _wait(store, "go") is not None:
        return 1
    control, data = group.init_groups(store, rank, world, dev)
    spec = ckpt.spec
    try:
        serve_commands(shard, control, data, dev, spec.hidden_size, spec.moe.num_experts,
                       lambda: rank_figures(shard, shard.cache.stats()))
    except PeerLost:          # rank 0 is gone, or another rank: rank 0 reports; nothing left to do here
        return 1
    finally:
        shard.cache.close()
        ckpt.close()
    torch.distributed.destroy_process_group()
    return 0


def main() -> int:
    path = Path(os.environ[group.CONFIG_ENV])
    config = pickle.loads(path.read_bytes())
    env = group.env_rank()
    return run_worker(config, *env)


if __name__ == "__main__":
    sys.exit(main())
