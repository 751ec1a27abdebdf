"""Token rescheduling vs FIFO batching on the bundled model, expert cache at 25% of experts.

    python bench/bench_serving.py [--requests 48] [--max-num-seqs 16] [--max-batch 4] [--repeats 2]

A mixed load, the same for both schedulers: prompts of 16-96 held-out tokens, 16-64 new tokens
each (greedy), arriving at seeded random times (a Poisson stream). Each run loads a fresh engine
with --gpu-mem giving every MoE layer 4 of 16 expert slots and serves the load through the
continuous-batching loop (runtime/loop.py), at most `max_batch` sequences per decode step, so
the scheduler decides which ready sequences share a step. Reported per scheduler (runs
alternate, medians over repeats): expert loads per generated token, p50/p99 request latency
(submit -> last token), tokens/s; and the ratios expert/FIFO from the same session, as the last
row of the table. Appended to bench/RESULTS.md (bench/results.py) unless --no-record.

    python bench/bench_serving.py --requests 4 --rate 50 --repeats 1 --no-record          # quick check

With --concurrency (issue 20's table): closed-loop streams instead, N streams at once, each sending
--requests-per-stream requests one after another (16-96 held-out prompt tokens, --max-tokens greedy tokens),
through the same loop with the server's defaults (max-num-seqs 16, max-batch = max-num-seqs unless given),
both schedulers, all experts in RAM and at --slots of 16: tokens/s, TTFT p50/p95 (submit -> first token) and
expert loads per generated token, with expert/fifo ratios.

    python bench/bench_serving.py --concurrency 1 8 32                                     # the table
    python bench/bench_serving.py --concurrency 1 2 --requests-per-stream 1 --max-tokens 4 --no-record  # quick
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prefetch import budget_for  # noqa: E402
from results import add_record_flag, record, wants_record  # noqa: E402


def workload(tok, n: int, rate: float, seed: int = 0) -> list[dict]:
    from train_tiny_moe import corpus_files, encode_files
    _, held = corpus_files()
    ids = encode_files(tok, held[2:]).tolist()
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    for _ in range(n):
        plen = int(rng.integers(16, 97))
        start = int(rng.integers(0, len(ids) - plen))
        out.append({"at": t, "prompt": ids[start:start + plen], "max_tokens": int(rng.integers(16, 65))})
        t += float(rng.exponential(1 / rate))
    return out


def serve(load: list[dict], scheduler: str, budget: int, kv_tokens: int, max_num_seqs: int, max_batch: int,
          max_wait: int | None = None, miss_weight: float = 2.0, hint: bool = True,
          prefill_wait: int | None = None) -> dict:
    import moe_engine
    from moe_engine.runtime.loop import Request
    from moe_engine.runtime.loop import EngineLoop
    from moe_engine.runtime.sampling import SamplingParams
    eng = moe_engine.load(gpu_mem=budget, max_kv_tokens=kv_tokens, progress=False)
    loop = EngineLoop(eng, max_num_seqs=max_num_seqs, max_batch=max_batch, scheduler=scheduler,
                      max_wait_steps=max_wait, miss_weight=miss_weight, schedule_aware_eviction=hint,
                      prefill_wait=prefill_wait if scheduler != "fifo" else 0).start()
    done, lat, tokens = threading.Event(), {}, {}
    lock = threading.Lock()

    def on_event(i, t_submit):
        def f(ev):
            if ev.finish_reason is not None:
                with lock:
                    lat[i], tokens[i] = time.perf_counter() - t_submit, ev.completion_tokens
                    if len(lat) == len(load):
                        done.set()
        return f
    t0 = time.perf_counter()
    for i, r in enumerate(load):
        time.sleep(max(0.0, r["at"] - (time.perf_counter() - t0)))
        loop.submit(Request(r["prompt"], r["max_tokens"], SamplingParams(do_sample=False),
                            on_event(i, time.perf_counter())))
    assert done.wait(600)
    wall = time.perf_counter() - t0
    loop.shutdown()
    stats = eng.stats()
    eng.close()
    gen = sum(tokens.values())
    ls = sorted(lat.values())
    return {"scheduler": scheduler, "loads": stats["io"]["loads"], "generated": gen,
            "loads_per_token": stats["io"]["loads"] / gen, "p50_s": ls[len(ls) // 2],
            "p99_s": float(np.percentile(ls, 99)), "tokens_per_s": gen / wall, "hit_rate": stats["cache"]["hit_rate"],
            "steps": loop.counters()["steps"]}


def closed_loop(prompts: list[list[int]], streams: int, per_stream: int, max_tokens: int, scheduler: str,
                budget: int | None, kv_tokens: int, max_num_seqs: int, max_batch: int | None) -> dict:
    """`streams` clients at once, each sending `per_stream` requests one after another (the next when the last ends)."""
    import moe_engine
    from moe_engine.runtime.loop import EngineLoop, Request
    from moe_engine.runtime.sampling import SamplingParams
    eng = moe_engine.load(gpu_mem=budget, max_kv_tokens=kv_tokens if budget else None, progress=False)
    loop = EngineLoop(eng, max_num_seqs=max_num_seqs, max_batch=max_batch, scheduler=scheduler).start()
    ttft, tokens, lock = [], [], threading.Lock()

    def client(c: int) -> None:
        for i in range(per_stream):
            done, t0, seen = threading.Event(), time.perf_counter(), {}

            def on_event(ev):
                if ev.token_ids and "first" not in seen:
                    seen["first"] = time.perf_counter() - t0
                if ev.finish_reason is not None:
                    seen["tokens"] = ev.completion_tokens
                    done.set()
            loop.submit(Request(prompts[(c * per_stream + i) % len(prompts)], max_tokens,
                                SamplingParams(do_sample=False), on_event, client=f"stream-{c}"))
            assert done.wait(1200)
            with lock:
                ttft.append(seen.get("first", time.perf_counter() - t0))
                tokens.append(seen["tokens"])
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    loop.shutdown()
    loads = eng.stats()["io"]["loads"]
    eng.close()
    return {"tokens_per_s": sum(tokens) / wall, "ttft_p50": float(np.median(ttft)),
            "ttft_p95": float(np.percentile(ttft, 95)), "loads_per_token": loads / max(1, sum(tokens))}


def concurrency_table(rows: list[dict]) -> str:
    lines = ["| experts | streams | scheduler | tokens/s | TTFT p50 s | TTFT p95 s | expert loads / token |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['streams']} | {r['scheduler']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | {r['loads_per_token']:.3f} |")
    return "\n".join(lines)


def run_concurrency(args) -> int:
    import moe_engine
    eng = moe_engine.load(progress=False)
    prompts = [r["prompt"] for r in workload(eng.tokenizer, 64, 1.0)]
    eng.close()
    kv_tokens = args.max_num_seqs * (96 + args.max_tokens)
    budgets = {"all in RAM": None, f"{args.slots} of 16": budget_for(args.slots / 16, kv_tokens)}
    rows, ratios = [], []
    for experts, budget in budgets.items():
        for streams in args.concurrency:
            runs = {"fifo": [], "expert": []}
            for rep in range(args.repeats):
                for sched in (("fifo", "expert") if rep % 2 == 0 else ("expert", "fifo")):
                    r = closed_loop(prompts, streams, args.requests_per_stream, args.max_tokens, sched, budget,
                                    kv_tokens, args.max_num_seqs, args.max_batch)
                    print(experts, streams, sched, json.dumps(r), file=sys.stderr, flush=True)
                    runs[sched].append(r)
            med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
            for sched in ("fifo", "expert"):
                rows.append({"experts": experts, "streams": streams, "scheduler": sched, **med[sched]})
            f, e = med["fifo"], med["expert"]
            ratios.append(f"{experts}, {streams} streams: tokens/s {e['tokens_per_s'] / f['tokens_per_s']:.2f}x"
                          + (f", loads/token {e['loads_per_token'] / f['loads_per_token']:.2f}x"
                             if f["loads_per_token"] else ""))
    setup = (f"bundled model, closed-loop streams of {args.requests_per_stream} requests x {args.max_tokens} greedy "
             f"tokens, max-num-seqs {args.max_num_seqs}, max-batch {args.max_batch or args.max_num_seqs}, "
             f"token budget per step: the default, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    text = concurrency_table(rows)
    compare = "expert / fifo: " + "; ".join(ratios)
    print(setup)
    print(text)
    print(compare)
    if wants_record(args):
        record("expert vs FIFO scheduling by concurrent streams, all in RAM and with experts offloaded", text,
               compare, setup + ".")
    return 0


def table(med: dict) -> str:
    """Medians per scheduler, then the ratio expert / fifo of each column."""
    keys = ("loads_per_token", "hit_rate", "p50_s", "p99_s", "tokens_per_s")
    fmt = ("{:.3f}", "{:.3f}", "{:.2f}", "{:.2f}", "{:.1f}")
    lines = ["| scheduler | loads / generated token | hit rate | p50 latency s | p99 latency s | tokens/s |",
             "|---|---|---|---|---|---|"]
    for s in ("fifo", "expert"):
        lines.append(f"| {s} | " + " | ".join(f.format(med[s][k]) for k, f in zip(keys, fmt)) + " |")
    ratios = [med["expert"][k] / med["fifo"][k] if med["fifo"][k] else float("nan") for k in keys]
    lines.append("| **expert / fifo** | " + " | ".join(f"{r:.3f}x" for r in ratios) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=None, help="sequences per decode step (default: 4 for the "
                   "Poisson load; with --concurrency max-num-seqs, the server's default)")
    p.add_argument("--slots", type=int, default=4, help="expert slots per MoE layer (of 16)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-wait", type=int, default=None, help="steps a ready sequence may be passed over "
                   "(expert; default 4 x ceil(max-num-seqs / max-batch) - 1)")
    p.add_argument("--miss-weight", type=float, default=2.0, help="cost of a non-resident expert (expert)")
    p.add_argument("--no-hint", action="store_true", help="turn off schedule-aware eviction (the cache is not told "
                   "the next step's forecast experts) for both schedulers")
    p.add_argument("--prefill-wait", type=int, default=None, help="steps admission may wait to prefill a fuller "
                   "group (expert; default max-wait; 0 = admit at once like fifo)")
    p.add_argument("--json")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="closed-loop streams at once (issue 20's "
                   "table, e.g. 1 8 32) instead of the Poisson load")
    p.add_argument("--requests-per-stream", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (--concurrency)")
    add_record_flag(p)
    args = p.parse_args(argv)
    if args.concurrency:
        return run_concurrency(args)
    args.max_batch = args.max_batch or 4
    import moe_engine
    eng = moe_engine.load(progress=False)
    load = workload(eng.tokenizer, args.requests, args.rate)
    eng.close()
    kv_tokens = args.max_num_seqs * (96 + 64)
    budget = budget_for(args.slots / 16, kv_tokens)      # the bundled model has 16 experts per layer
    runs = {"fifo": [], "expert": []}
    for rep in range(args.repeats):
        for sched in (("fifo", "expert") if rep % 2 == 0 else ("expert", "fifo")):
            r = serve(load, sched, budget, kv_tokens, args.max_num_seqs, args.max_batch, args.max_wait,
                      args.miss_weight, not args.no_hint, args.prefill_wait)
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs[sched].append(r)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("loads_per_token", "p50_s", "p99_s", "tokens_per_s",
                                                                  "hit_rate")} for s, rs in runs.items()}
    setup = (f"bundled model, --gpu-mem {budget} ({args.slots} of 16 slots per layer), {args.requests} requests at "
             f"{args.rate}/s, max-num-seqs {args.max_num_seqs}, max-batch {args.max_batch}, "
             f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    text = table(med)
    print(setup)
    print(text)
    f, e = med["fifo"], med["expert"]
    compare = (f"expert vs fifo: loads/token {e['loads_per_token'] / f['loads_per_token']:.3f}x "
               f"({100 * (1 - e['loads_per_token'] / f['loads_per_token']):.1f}% fewer), p99 latency "
               f"{e['p99_s'] / f['p99_s']:.3f}x, tokens/s {e['tokens_per_s'] / f['tokens_per_s']:.3f}x")
    print(compare)
    if wants_record(args):
        record("token rescheduling vs FIFO batching in the engine, bundled model", text, compare, setup + ".")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
