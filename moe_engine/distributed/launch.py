"""Rank 0: start (or join) the ranks, agree, build its own share, and return an Engine whose MoE layers span them.

    build_engine(config)   expert_parallel == 1: runtime.load.build_engine; else
        torchrun's environment (WORLD_SIZE set): this process is RANK; ranks other than 0 run the worker loop
        (worker.py) and exit when rank 0 closes; otherwise N-1 local workers are spawned (`python -m
        moe_engine.distributed.worker`, env:// variables of a store on 127.0.0.1)
        -> join -> fingerprints compared -> every rank builds its share (rank 0 also the decoder, tokenizer, KV)
        -> each rank's plan gathered and printed -> process groups -> ParallelEngine
    load(model_dir, **kw)  moe_engine.load(): the same with load()'s keywords

Rank 0 runs everything but the routed experts of other ranks: tokenizer, scheduler, sampling, attention, shared
experts. Each MoE layer's strategy is a ParallelExperts: forecast (made here) + hidden states + routing go to
every rank, every rank computes the pairs of its experts through its own cache, one all_reduce sums them.
"""
from __future__ import annotations

import dataclasses
import pickle
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..config import api_words
from ..errors import ConfigError, MoeEngineError
from ..runtime.build import build_decoder, non_expert_bytes, routers
from ..runtime.config import EngineConfig, resolve_dtype
from ..runtime.engine import Engine
from ..runtime.forecast import Forecaster
from ..runtime.load import FLAG_KEYWORDS, build_engine as build_one, load_tokenizer, model_dir_or_default
from ..runtime.load import load as load_one
from ..runtime.plugins import default_predictor, resolve_predictor
from ..runtime.resources import apply_threads
from . import group
from .comm import PING_S, Link
from .group import RankError, Spawned, Watch, differences, fingerprint, post
from .placement import ExpertPlacement, ShardCheckpoint, make_placement
from .ranks import RESIDENT_DRAFTS, check_supported, rank_device, rank_plan, settings, share_line, shard_summary
from .stats import merge_sections, rank_figures
from .worker import run_worker
from .shard import Shard


def load(model_dir=None, revision: str | None = None, **kw) -> Engine:
    """moe_engine.load(): runtime.load.load, or with expert_parallel=N > 1 an engine over N processes."""
    if kw.get("expert_parallel", 1) == 1:
        return load_one(model_dir, revision, **kw)
    try:
        path = model_dir_or_default(model_dir, revision, kw.get("progress", True) is not False)
        return build_engine(EngineConfig.from_kwargs(path, **kw))
    except MoeEngineError as e:
        message = api_words(str(e), (*FLAG_KEYWORDS, "revision", "expert_parallel", "expert_placement"))
        raise (type(e)(message) if message != str(e) else e) from None


def run_if_worker(config: EngineConfig) -> int | None:
    """Under torchrun with --expert-parallel N on a rank other than 0: run the worker loop, return its exit code.
    None on rank 0 and without expert parallelism (the caller goes on to build the engine)."""
    env = group.env_rank() if config.expert_parallel > 1 else None
    if env is None or env[0] == 0:
        return None
    check_world_size(config, env[1])
    return run_worker(config, *env)


def check_world_size(config: EngineConfig, world: int) -> None:
    if world != config.expert_parallel:
        raise ConfigError(f"expert_parallel={config.expert_parallel} (--expert-parallel) does not match "
                          f"WORLD_SIZE={world} of this launch; give --expert-parallel {world}")


def build_engine(config: EngineConfig, show_plan: bool | None = None) -> Engine:
    """The engine of `config`; on a torchrun rank other than 0 the worker loop runs instead and the process exits
    with its code when rank 0 closes the engine (SystemExit)."""
    if config.expert_parallel == 1:
        return build_one(config, show_plan)
    check_supported(config)
    env = group.env_rank()
    if env is not None:
        rank, world, local = env
        check_world_size(config, world)
        if rank != 0:
            raise SystemExit(run_worker(config, rank, world, local))
    return _build_rank0(config, config.progress if show_plan is None else show_plan, env is None)


class Cluster:
    """Rank 0's hold on the other ranks: the link, failure state and listeners, the idle ping, shutdown."""

    def __init__(self, link: Link, watch: Watch, spawned: Spawned | None):
        self.link, self.watch, self.spawned = link, watch, spawned
        self.failure: str | None = None
        self.listeners: list = []                 # f(error) once the engine cannot continue (the server: 503, exit)
        self._closed = threading.Event()
        threading.Thread(target=self._ping, name="moe-engine-ep-ping", daemon=True).start()

    def call(self, fn, *args):
        """fn(*args) under the link's lock; a failure becomes one RankError naming the rank and the cause."""
        with self.link.lock:
            if self._closed.is_set():             # the ping thread after close(): the workers have left
                raise RankError("the expert-parallel engine is closed")
            self.check()
            try:
                return fn(*args)
            except Exception as e:   # noqa: BLE001 - a lost rank surfaces as an error of any type from the backend
                self.fail(self.watch.diagnose(e))
                raise RankError(self.failure) from None

    def check(self) -> None:
        if self.failure is not None:
            raise RankError(self.failure)

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = f"expert parallelism failed: {why}; the engine cannot continue (restart it)"
            for f in list(self.listeners):
                f(RankError(self.failure))

    def _ping(self) -> None:
        while not self._closed.wait(1.0):
            if self.failure is None and time.monotonic() - self.link.last_command > PING_S:
                try:
                    self.call(self.link.ping)
                except RankError:
                    return

    def close(self) -> None:
        self._closed.set()
        if self.failure is None:
            try:
                with self.link.lock:
                    self.link.stop()
            except Exception:   # noqa: BLE001 - the workers are gone already: nothing to stop
                pass
        if self.spawned is not None:
            self.spawned.close()
        torch.distributed.destroy_process_group()


class ParallelFeed:
    """Rank 0's routing observer (registered first): the step's decode flag, and the forecast made from each
    layer's routing by the model's predictor, sent with the layer (every rank prefetches its own columns)."""

    def __init__(self, forecaster: Forecaster | None, link: Link, shard: Shard):
        self.forecaster, self.link, self.shard = forecaster, link, shard
        self.steps = 0
        self._forecast: dict[int, torch.Tensor] = {}

    def begin_step(self, token_ids: torch.Tensor, seq_ids: torch.Tensor) -> None:
        decoding = len(seq_ids) == len(torch.unique(seq_ids))
        self.steps += 1
        self.link.begin_step(decoding)
        self.shard.begin(decoding)
        if self.forecaster is not None:
            self.forecaster.begin_step(token_ids, seq_ids)

    def observe(self, layer: int, router_input: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        if self.forecaster is None:
            return
        controller = getattr(self.shard.cache, "controller", None)
        self.forecaster.depth = controller.lookahead() if controller is not None else 1
        self._forecast = self.forecaster.routed(layer, router_input, experts, weights)

    def take(self) -> dict[int, torch.Tensor]:
        out, self._forecast = self._forecast, {}
        return out


class ParallelExperts:
    """A MoE layer's expert strategy spanning the ranks (see the module docstring)."""

    def __init__(self, cluster: Cluster, feed: ParallelFeed, shard: Shard):
        self.cluster, self.feed, self.shard = cluster, feed, shard

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        forecast = self.feed.take()
        mine = lambda: self.shard.compute(layer, x, weights, ids, forecast)  # noqa: E731
        return self.cluster.call(self.cluster.link.layer, layer, x, weights, ids, forecast, mine).to(x.dtype)


class ParallelCache:
    """The runtime's view of the experts of every rank (experts.ExpertCache): hints reach every rank, stats are
    gathered from every rank; residency is rank 0's share (the others' would cost a round trip per step)."""

    def __init__(self, cluster: Cluster, shard: Shard, feed: ParallelFeed, ranks: list[dict],
                 placement: ExpertPlacement):
        self.cluster, self.shard, self.observer, self.ranks = cluster, shard, feed, ranks
        self.placement = placement
        self.buffers_stable = shard.cache.buffers_stable
        self.evicts = any(r["evicts"] for r in ranks)
        self.policy_name = shard.cache.policy_name
        self.quotas = [sum(r["quotas"][m] for r in ranks) for m in range(len(ranks[0]["quotas"]))]
        self.capacity_experts = sum(self.quotas)
        self.last_ranks: list[dict] = []

    def residents(self, layer: int) -> frozenset[int]:
        return self.shard.residents(layer)

    def hint_upcoming(self, experts: dict[int, frozenset[int]]) -> None:
        self.shard.hint(experts)
        self.cluster.link.hint(experts)

    def prefetch(self, experts: dict, keep: dict | None = None) -> int:
        """A verify step's forecast experts start loading on every rank (the workers' with the step's first layer);
        returns the loads rank 0 started."""
        self.cluster.link.prefetch(experts, keep)
        return self.shard.prefetch(experts, keep)

    def peeking(self):
        raise ConfigError(RESIDENT_DRAFTS)

    def nbytes(self) -> int:
        return self.shard.cache.nbytes()

    def stats(self) -> dict:
        """Every rank's sections merged (counts summed, rates recomputed); per-rank figures kept for stats()."""
        mine = rank_figures(self.shard, self.shard.cache.stats())
        everyone = self.cluster.call(self.cluster.link.gather_stats, mine)
        self.last_ranks = everyone
        return merge_sections([r["sections"] for r in everyone])

    def close(self) -> None:
        self.cluster.close()
        self.shard.cache.close()


class ParallelEngine(Engine):
    """An Engine whose routed experts span N ranks; stats() adds the "expert_parallel" section."""

    def stats(self) -> dict:
        out = super().stats()
        cache, link = self.experts, self.experts.cluster.link
        steps = cache.observer.steps
        out["expert_parallel"] = {
            "world_size": cache.placement.world_size, "placement": cache.placement.source,
            "comm_seconds": link.comm_s, "comm_layer_calls": link.layer_calls, "steps": steps,
            "comm_seconds_per_step": link.comm_s / steps if steps else 0.0, "bytes_broadcast": link.bytes_sent,
            "ranks": [{k: v for k, v in r.items() if k != "sections"} for r in cache.last_ranks]}
        return out

    def on_failure(self, listener) -> None:
        """listener(error) once a rank is lost (called from the thread that found out)."""
        self.experts.cluster.listeners.append(listener)

    def _check_open(self) -> None:
        super()._check_open()
        self.experts.cluster.check()


def _build_rank0(config: EngineConfig, show_plan: bool, spawn: bool) -> Engine:
    world = config.expert_parallel
    predictor = resolve_predictor(config.offload.predictor, config.model_dir)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    ckpt = Checkpoint(config.model_dir)
    spawned = store = built = None
    try:
        placement = make_placement(ckpt.spec, world, config.expert_placement)
        dt = resolve_dtype(config.dtype, None) or ckpt.dtype
        port = group.free_port() if spawn else None
        config_file = _worker_config(config) if spawn else None
        try:
            if spawn:
                spawned = Spawned(world, config_file, port)
            store = group.connect_store(0, world, port)
            watch = Watch(store, world, spawned)
            watch.wait_all("joined/", "joining", group.JOIN_TIMEOUT)
        finally:
            if config_file is not None:
                config_file.unlink(missing_ok=True)       # read by the workers before they join
        _agree(store, watch, fingerprint(ckpt.model_dir, settings(config, dt, placement)))
        built = _build_share(config, ckpt, placement, dt, predictor)
        shards = [pickle.loads(b) for b in watch.wait_all("built/", "building each rank's share")]
        for r, s in enumerate(shards, start=1):
            if "error" in s:
                raise RankError(f"expert parallelism could not start: rank {r} failed to build its share: {s['error']}")
        post(store, "go", None)
        return _assemble(config, ckpt, placement, built, [built["summary"], *shards], store, watch, spawned, show_plan)
    except BaseException:
        if store is not None:
            _call_off(store)
        if built is not None:
            built["shard"].cache.close()
        ckpt.close()
        if spawned is not None:
            spawned.close(timeout=5.0)
        raise


def _call_off(store) -> None:
    """The start failed on rank 0's side: every worker still waiting for the verdict or the word to go stops (exit
    code 1) instead of waiting for a store that may outlive this attempt (torchrun's agent, or a caller that goes on)."""
    try:
        for key in ("verdict", "go"):
            if not store.check([key]):
                post(store, key, "rank 0 stopped the start")
    except Exception:   # noqa: BLE001 - the store is gone: the workers' waits fail on their own
        pass


def _worker_config(config: EngineConfig) -> Path:
    """The config a spawned worker builds from (no predictor: forecasts come from rank 0), pickled to a file."""
    cfg = config.replace(offload=dataclasses.replace(config.offload, predictor=None), progress=False)
    f = tempfile.NamedTemporaryFile(prefix="moe-engine-ep-", suffix=".pkl", delete=False)
    with f:
        pickle.dump(cfg, f)
    return Path(f.name)


def _agree(store, watch: Watch, mine: dict) -> None:
    """Every rank's fingerprint equals rank 0's, or a RankError naming the first rank that differs and how."""
    theirs = [pickle.loads(b) for b in watch.wait_all("fp/", "comparing checkpoints")]
    for r, fp in enumerate(theirs, start=1):
        diff = differences(mine, fp)
        if diff:
            raise RankError(f"expert parallelism could not start: rank {r} does not match rank 0: {diff}; start "
                            f"every rank with the same checkpoint and flags")
    post(store, "verdict", None)


def _build_share(config: EngineConfig, ckpt: Checkpoint, placement: ExpertPlacement, dt: torch.dtype,
                 predictor) -> dict:
    """Rank 0's pieces: tokenizer, decoder (every non-expert weight), its share of the experts."""
    dev = rank_device(config.device, 0 if group.env_rank() is None else group.env_rank()[2])
    threads = apply_threads(config.threads)
    tokenizer = load_tokenizer(ckpt.model_dir)
    view = ShardCheckpoint(ckpt, placement, 0)
    plan = rank_plan(config, view, dev, dt, non_expert_bytes(ckpt, dt), config.offload.max_kv_tokens)
    decoder = build_decoder(ckpt, dt, dev, config.progress, config.kernels, None)
    shard = Shard(view, placement, plan, dt, dev, config.offload, config.kernels, config.progress)
    return {"decoder": decoder, "shard": shard, "plan": plan, "tokenizer": tokenizer, "device": dev, "dtype": dt,
            "predictor": predictor, "summary": shard_summary(shard, plan, dt, threads)}


def _assemble(config, ckpt, placement, built, shards, store, watch, spawned, show_plan) -> Engine:
    dev, spec = built["device"], ckpt.spec
    control, data = group.init_groups(store, 0, placement.world_size, dev)
    link = Link(control, data, dev, spec.hidden_size, spec.moe.num_experts)
    cluster = Cluster(link, watch, spawned)
    try:
        return _bind(config, ckpt, placement, built, shards, cluster, show_plan)
    except BaseException:
        cluster.close()                           # the workers leave their loop; the process group goes
        raise


def _bind(config, ckpt, placement, built, shards, cluster: Cluster, show_plan) -> Engine:
    dev, dt, shard, decoder, link, spec = (built["device"], built["dtype"], built["shard"], built["decoder"],
                                           cluster.link, ckpt.spec)
    forecaster = None
    if built["predictor"] is not None and config.offload.prefetch and any(s["evicts"] for s in shards):
        forecaster = Forecaster(built["predictor"], default_predictor, routers(decoder), spec.moe.top_k,
                                spec.moe.num_experts)
    feed = ParallelFeed(forecaster, link, shard)
    decoder.observers.add(feed)
    decoder.bind_experts({b.layer: ParallelExperts(cluster, feed, shard) for b in decoder.moe_blocks()})
    cache = ParallelCache(cluster, shard, feed, shards, placement)
    if show_plan:
        lines = [f"expert parallelism: {placement.world_size} ranks, experts {placement.source}; each rank has its "
                 f"own budget and cache"]
        lines += [share_line(s["rank"], placement, s) for s in shards]
        for s in shards:
            if s["plan"]:
                lines += [f"  rank {s['rank']} ({s['device']}) " + s["plan"].replace("\n", "\n    ")]
        print("\n".join(lines), file=sys.stderr)
    plan = built["plan"]
    return ParallelEngine(ckpt, decoder, cache, built["tokenizer"], dev, dt, plan and plan.device_budget,
                          plan and plan.host_budget, plan, speculative=config.speculative)


__all__ = ["build_engine", "load", "ParallelEngine", "RankError"]
