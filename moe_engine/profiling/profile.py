"""`moe-engine profile`: run prompts through an Engine and collect the stats JSON with a "profile" section.

    prompts --> Engine.generate, one prompt at a time (greedy) --> RoutingRecorder --> Trace
                   | per request: TTFT, decode step intervals              |
                   v                                                       v
              engine.stats() sections            cache-size sweep (replay.py: the engine's policy, Belady)
              (cache, prefetch, io, memory,      local routing consistency (lrc.py: SCH, SRP, suggested size)
               optimal, prediction, quant)                                 |
                   \\___________________ profile dict (profile_schema.json) _/

With a speculative config (the engine's, from --speculative-config) the prompts run a second time with drafts after
the profile's own run (which never drafts), and the "speculation" section compares the two runs (speculation()):
acceptance, tokens per verify step, expert loads per generated token, decode tokens/s.

The `latency` section is rebuilt over all requests (the engine's own covers its last call only), with
TTFT and time per output token (TPOT) percentiles. Per-layer arrays of the "profile" section run over
the MoE layers in order (`moe_layers` gives their decoder indices); those of the engine's sections run
over all decoder layers. This module computes numbers; report.py prints them and plot.py draws them.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import check_int
from ..errors import ConfigError
from ..experts.policies import DEFAULT_POLICY, make_policy
from .lrc import SEGMENTS, lrc_metrics
from .record import RoutingRecorder
from .replay import replay
from .trace import Trace

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")     # the built-in prompt set (package data)
SCHEMA_FILE = Path(__file__).with_name("profile_schema.json")   # JSON Schema of what run_profile returns
PERCENTILES = (50, 90, 99)
SWEEP_POINTS = 8                                           # cache sizes in the hit rate vs cache size sweep
SCHEMA_VERSION = 1


@dataclass
class RequestTiming:
    """What one generate call measured (runtime.generation.Timings of a single prompt)."""

    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    prefill_s: float
    decode_s: float
    step_s: list[float]                                    # decode step intervals: the TPOT samples


def builtin_prompts() -> list[str]:
    """The packaged prompt set: one prompt per line of prompts.txt."""
    if not PROMPTS_FILE.is_file():
        raise ConfigError(f"the built-in prompt set {PROMPTS_FILE} is missing (a broken install?); reinstall "
                          f"moe-engine or pass --prompts FILE")
    return [line for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the profile JSON, for validators such as `jsonschema`."""
    import json
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def run_profile(engine, prompts: list[str], max_new_tokens: int = 32, progress: bool = True,
                settings: dict | None = None, segments=SEGMENTS) -> dict:
    """Generate every prompt alone (greedy, no drafts), then return engine.stats() plus the "profile" section (and
    its "speculation" comparison when the engine has a speculative config)."""
    if not prompts:
        raise ConfigError("no prompts to profile: give at least one (--prompts FILE)")
    check_int(max_new_tokens, "max_new_tokens", flag="--max-new-tokens")
    t0 = time.perf_counter()
    loads0 = engine.stats()["io"]["loads"]
    trace, requests = _generate(engine, prompts, max_new_tokens, progress)
    wall = time.perf_counter() - t0
    plain_loads = engine.stats()["io"]["loads"] - loads0
    if progress:
        print("[moe-engine] analysing the routing: cache-size sweep, Belady, moe-lrc", file=sys.stderr)
    stats = engine.stats()
    stats["latency"] = latency_section(requests)
    moe_layers = list(engine.spec.moe_layers)
    stats["profile"] = {
        "schema_version": SCHEMA_VERSION,
        "settings": {**(settings or {}), "prompts": len(prompts), "max_new_tokens": max_new_tokens},
        "wall_seconds": wall,
        "requests": {"count": len(requests), "prompt_tokens": [r.prompt_tokens for r in requests],
                     "new_tokens": [r.new_tokens for r in requests], "ttft_s": [r.ttft_s for r in requests]},
        "ttft_s": summary([r.ttft_s for r in requests]),
        "tpot_s": summary([s for r in requests for s in r.step_s]),
        "layers": layer_table(stats, moe_layers),
        "time_per_token": time_per_token(stats, requests),
        "cache_sweep": cache_sweep(trace, policy_name(engine, settings), engine_quotas(engine, moe_layers),
                                   stats["cache"]["hit_rate"]),
        "lrc": lrc_metrics(trace, segments),
    }
    if engine.speculative_config is not None:
        stats["profile"]["speculation"] = speculation(engine, prompts, max_new_tokens, progress, requests, plain_loads)
    return stats


def _generate(engine, prompts: list[str], max_new_tokens: int, progress: bool) -> tuple[Trace, list[RequestTiming]]:
    """Each prompt alone through the engine with its routing recorded; one RequestTiming per prompt."""
    ids = [engine.encode(p) for p in prompts]
    recorder = RoutingRecorder(engine.spec.moe_layers)
    requests = []
    with engine.observing(recorder):
        for row in tqdm(ids, desc="profiling", unit="prompt", disable=not progress, leave=False):
            engine.generate(torch.tensor(row), max_new_tokens=max_new_tokens, do_sample=False,
                            speculative_config=False)
            t = engine.timings
            requests.append(RequestTiming(t.prompt_tokens, t.steps, t.ttft_s, t.prefill_s, t.decode_s,
                                          list(t.step_s)))
    return recorder.trace([len(r) for r in ids], engine.spec.moe.num_experts), requests


def speculation(engine, prompts: list[str], max_new_tokens: int, progress: bool, plain: list[RequestTiming],
                plain_loads: int) -> dict:
    """The prompts again, each alone with the engine's speculative config, after the plain run (whose requests and
    expert loads are given): {"config", "without", "with"}, each run's generated tokens, decode steps per sequence
    (verify steps), tokens per step, expert loads (its draft steps included) and loads per generated token, decode
    tokens/s; "with" adds drafted / accepted tokens and the acceptance rate. The second run starts with the expert
    cache the first left (one cache across prompts, as in the profile's own run)."""
    spec = engine.speculative_config
    loads0 = engine.stats()["io"]["loads"]
    tokens = steps = drafted = accepted = 0
    decode_s = decode_tokens = 0.0
    for p in tqdm(prompts, desc="speculative", unit="prompt", disable=not progress, leave=False):
        engine.generate(torch.tensor(engine.encode(p)), max_new_tokens=max_new_tokens, do_sample=False,
                        speculative_config=spec)
        s, t = engine.speculation, engine.timings
        tokens += s["decode_tokens"] + 1
        steps += s["decode_rows"]
        drafted, accepted = drafted + s["drafted"], accepted + s["accepted"]
        decode_s, decode_tokens = decode_s + t.decode_s, decode_tokens + t.decode_tokens
    loads = engine.stats()["io"]["loads"] - loads0
    plain_tokens = sum(r.new_tokens for r in plain)
    plain_steps = sum(len(r.step_s) for r in plain)
    plain_s = sum(sum(r.step_s) for r in plain)
    return {"config": dataclasses.asdict(spec),
            "without": _run_numbers(plain_tokens, plain_steps, plain_steps, plain_loads, plain_s),
            "with": {**_run_numbers(tokens, steps, decode_tokens, loads, decode_s), "drafted": drafted,
                     "accepted": accepted, "acceptance": accepted / drafted if drafted else None}}


def _run_numbers(tokens: int, steps: int, decode_tokens: float, loads: int, decode_s: float) -> dict:
    return {"generated_tokens": tokens, "decode_steps": steps,
            "tokens_per_step": decode_tokens / steps if steps else None, "expert_loads": loads,
            "loads_per_token": loads / tokens if tokens else None,
            "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else None}


def summary(values: list[float]) -> dict:
    """{"count", "mean", "p50", "p90", "p99"} of `values` (zeros when there are none)."""
    if not values:
        return {"count": 0, "mean": 0.0, **{f"p{q}": 0.0 for q in PERCENTILES}}
    pct = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {"count": len(values), "mean": float(np.mean(values)), **{f"p{q}": float(v) for q, v in zip(PERCENTILES, pct)}}


def latency_section(requests: list[RequestTiming]) -> dict:
    """The stats `latency` keys over all requests, plus TTFT and TPOT percentiles."""
    prompt_tokens = sum(r.prompt_tokens for r in requests)
    prefill_s = sum(r.prefill_s for r in requests)
    steps = [s for r in requests for s in r.step_s]
    ttft, tpot = summary([r.ttft_s for r in requests]), summary(steps)
    out = {"prefill_tokens_per_s": prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
           "decode_tokens_per_s": len(steps) / sum(steps) if sum(steps) > 0 else 0.0,
           "ttft_s": ttft["mean"], "tpot_s": tpot["mean"]}
    for q in PERCENTILES:
        out[f"ttft_p{q}_s"], out[f"tpot_p{q}_s"] = ttft[f"p{q}"], tpot[f"p{q}"]
    return out


def layer_table(stats: dict, moe_layers: list[int]) -> dict:
    """Per MoE layer: lookups, hits, misses, hit rates (engine, Belady) and prefetch precision / recall."""
    cache, pre, opt = stats["cache"], stats["prefetch"], stats["optimal"]

    def pick(values: list) -> list:
        return [values[m] for m in moe_layers]
    hits, misses = pick(cache["per_layer_hits"]), pick(cache["per_layer_misses"])
    return {"moe_layers": moe_layers, "lookups": [h + m for h, m in zip(hits, misses)], "hits": hits,
            "misses": misses, "hit_rate": pick(cache["per_layer_hit_rate"]),
            "belady_loads": pick(opt["per_layer_belady_loads"]), "belady_hit_rate": pick(opt["per_layer_belady_hit_rate"]),
            "prefetch_issued": pick(pre["per_layer_issued"]), "prefetch_used": pick(pre["per_layer_used"]),
            "prefetch_precision": pick(pre["per_layer_precision"]), "prefetch_recall": pick(pre["per_layer_recall"])}


def time_per_token(stats: dict, requests: list[RequestTiming]) -> dict:
    """Where a decode step's time goes: stall (waiting for loads) and the rest (compute), plus loader time.

    total_s = mean decode step interval; stall_s = decode stall / decode steps; compute_s = total - stall;
    io_s = loader busy time during decode / decode steps, which runs beside compute (can exceed total_s
    with several IO threads) and is drawn apart from the wall-clock split.
    """
    steps = sum(len(r.step_s) for r in requests)
    total = sum(sum(r.step_s) for r in requests) / steps if steps else 0.0
    io = stats["io"]
    stall = min(io.get("stall_decode_seconds", 0.0) / steps, total) if steps else 0.0
    return {"decode_steps": steps, "total_s": total, "compute_s": total - stall, "stall_s": stall,
            "io_s": io.get("io_decode_seconds", 0.0) / steps if steps else 0.0}


def policy_name(engine, settings: dict | None) -> str:
    """Name of the eviction policy the engine's cache runs (the default policy when all experts are resident)."""
    return engine.experts.policy_name or (settings or {}).get("policy") or DEFAULT_POLICY


def engine_quotas(engine, moe_layers: list[int]) -> list[int]:
    """Expert slots of each MoE layer in the live cache (all experts when they are all resident)."""
    quotas = engine.experts.quotas
    return [quotas[m] for m in moe_layers]


def sweep_sizes(top_k: int, num_experts: int, points: int = SWEEP_POINTS) -> list[int]:
    """About `points` per-layer cache sizes from top_k to num_experts, spaced geometrically."""
    return sorted({int(round(c)) for c in np.geomspace(top_k, num_experts, points)} | {top_k, num_experts})


def cache_sweep(trace: Trace, policy: str, quotas: list[int], live_hit_rate: float) -> dict:
    """Hit rate vs experts per layer: the engine's policy and Belady, replaying the recorded routing token by
    token (demand loads, no prefetch, one cache kept across prompts as in the run), plus the same replay at
    the live cache's own quotas and the hit rate the run measured (which prefetching and step-wise prefill
    lookups make differ from the replay)."""
    sizes = sweep_sizes(trace.top_k, int(trace.num_experts))
    runs = [replay(trace, make_policy(policy), c, reset=False) for c in sizes]
    at_live = replay(trace, make_policy(policy), quotas, reset=False) if min(quotas) >= trace.top_k else None
    return {"policy": policy, "replay": "token by token, demand loads, one cache across prompts",
            "cache_experts_per_layer": sizes,
            "policy_hit_rate": [r.hit_rate for r in runs], "belady_hit_rate": [r.belady.hit_rate for r in runs],
            "policy_loads": [r.total_loads for r in runs], "belady_loads": [r.belady.total_loads for r in runs],
            "live": {"quotas": quotas, "mean_cache_experts_per_layer": float(np.mean(quotas)),
                     "hit_rate": live_hit_rate,
                     "replay_policy_hit_rate": None if at_live is None else at_live.hit_rate,
                     "replay_belady_hit_rate": None if at_live is None else at_live.belady.hit_rate}}
