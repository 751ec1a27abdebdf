"""Expert parallelism (issue 24): 2 ranks vs 1 process at the same memory limit per process.

Each process runs under ../shared/tools/in_memcg.sh LIMIT --evict MODEL (its own memory cgroup, the checkpoint
dropped from the page cache first) with --gpu-mem auto, so a process's budget is what the limit leaves; the two
ranks are launched as separate processes with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT), each
wrapped, not spawned by the engine. Rank 0 (or the single process) decodes the same token-id prompts greedily and
prints RESULT {json}: decode tokens/s, expert loads per generated token, seconds in collectives per forward step
(rank 0's wait in broadcast + all_reduce, which includes the slower rank's expert work) against the step time.

    python bench/bench_expert_parallel.py                       # the comparison, appended to bench/RESULTS.md
    python bench/bench_expert_parallel.py --collectives         # broadcast + all_reduce vs all_to_all, 2 ranks
    python bench/bench_expert_parallel.py --smoke               # bundled tiny model, 1 request, no record

What 2 processes on one 2-core VM can show: the memory effect (each rank holds twice the share of its experts,
so fewer loads per token) and the protocol's overhead; not the throughput of two machines (the ranks share the
cores and the disk, and every collective goes through loopback TCP).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from results import add_record_flag, record, wants_record  # noqa: E402

MEMCG = ROOT.parent / "shared" / "tools" / "in_memcg.sh"
MODEL = Path("/work/bench_data/mixtral-1.4g")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, min(vocab, 32000), (n, length), generator=g).tolist()


# ---- one rank (run inside its memory cgroup) ----------------------------------------------------------------
def run_rank(args) -> None:
    import torch

    import moe_engine
    world = args.world
    kw = dict(device="cpu", dtype=args.dtype, progress=False, gpu_mem=args.gpu_mem, threads=args.threads)
    eng = moe_engine.load(args.model, expert_parallel=world, **kw)   # ranks > 0 serve rank 0 here, then exit
    rows = prompts(args.prompts, args.prompt_len, eng.spec.vocab_size)
    eng.generate(torch.tensor([rows[0]]), max_new_tokens=2)          # warm-up: threads, first loads
    before = eng.stats()
    t0 = time.perf_counter()
    prefill_s = decode_s = 0.0
    generated = decode_tokens = 0
    for r in rows:
        out = eng.generate(torch.tensor([r]), max_new_tokens=args.tokens)
        generated += out.shape[1] - len(r)
        t = eng.timings
        prefill_s, decode_s, decode_tokens = prefill_s + t.prefill_s, decode_s + t.decode_s, decode_tokens + t.decode_tokens
    wall = time.perf_counter() - t0
    after = eng.stats()
    loads = after["io"]["loads"] - before["io"]["loads"]
    res = {"world": world, "generated": generated, "wall_s": wall, "decode_tokens_per_s": decode_tokens / decode_s,
           "loads_per_token": loads / generated, "hit_rate": after["cache"]["hit_rate"],
           "disk_mib": (after["io"]["bytes_disk_read"] - before["io"]["bytes_disk_read"]) / 2**20}
    if world > 1:
        a, b = after["expert_parallel"], before["expert_parallel"]
        steps = a["steps"] - b["steps"]
        comm = a["comm_seconds"] - b["comm_seconds"]
        res.update(steps=steps, comm_ms_per_step=1000 * comm / steps, step_ms=1000 * (prefill_s + decode_s) / steps,
                   comm_ms_per_token=1000 * comm / generated,
                   ranks=[{"rank": r["rank"], "loads": r["io"]["loads"], "hit_rate": r["cache"]["hit_rate"]}
                          for r in a["ranks"]])
    else:
        res.update(step_ms=1000 * (prefill_s + decode_s) / (decode_tokens + len(rows)))
    eng.close()
    print("RESULT " + json.dumps(res), flush=True)


def launch(args, world: int) -> dict:
    """`world` processes, each under in_memcg.sh (or bare with --no-memcg); rank 0's RESULT."""
    port = free_port()
    procs = []
    for rank in range(world):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "rank", "--world", str(world),
               "--model", str(args.model), "--tokens", str(args.tokens), "--prompts", str(args.prompts),
               "--prompt-len", str(args.prompt_len), "--dtype", args.dtype, "--gpu-mem", args.gpu_mem,
               "--threads", str(args.threads)]
        if not args.no_memcg:
            cmd = ["bash", str(MEMCG), str(args.limit), "--evict", str(args.model), "--", *cmd]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                       LOCAL_RANK=str(rank))
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    line = next((x for x in outs[0][0].splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": outs[0][1][-2000:], "rc": procs[0].returncode}
    res = json.loads(line[len("RESULT "):])
    res["peaks_mib"] = [int(x.split()[4]) / 2**20 for _, err in outs for x in err.splitlines()
                        if x.startswith("peak bytes in group")]
    return res


def comparison_table(one: dict, two: dict, args) -> str:
    def row(name, r):
        if "error" in r:
            return f"| {name} | failed (rc {r.get('rc')}): {r['error'].splitlines()[-1] if r['error'] else ''} |"
        comm = f"{r['comm_ms_per_step']:.1f} / {r['step_ms']:.1f}" if "comm_ms_per_step" in r else f"- / {r['step_ms']:.1f}"
        peaks = ", ".join(f"{p:.0f}" for p in r.get("peaks_mib", []))
        return (f"| {name} | {r['decode_tokens_per_s']:.2f} | {r['loads_per_token']:.2f} | {r['hit_rate']:.3f} | "
                f"{r['disk_mib']:.0f} | {comm} | {peaks} |")
    return "\n".join([
        f"Model {args.model.name}, {args.dtype}, {args.prompts} prompts x {args.tokens} new tokens (greedy), "
        f"limit {args.limit} bytes per process, --gpu-mem {args.gpu_mem}",
        "",
        "| run | decode tok/s | expert loads / token | hit rate | disk MiB | comm / step ms | peak MiB per process |",
        "|---|---|---|---|---|---|---|",
        row("1 process", one), row("2 ranks (expert parallel)", two)])


# ---- collectives: broadcast + all_reduce vs all_to_all --------------------------------------------------------
def collectives_rank(rank: int, world: int, port: int, hidden: int, top_k: int, iters: int, q) -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for n in (1, 4, 16, 64):
        x = torch.randn(n, hidden, dtype=torch.bfloat16)
        payload = torch.zeros(n * hidden * 2 + n * top_k * 12, dtype=torch.uint8)
        part = torch.zeros(n, hidden)
        rows = max(1, n * top_k // world)                  # pairs each rank computes, evenly spread
        send = torch.zeros(world * rows, hidden, dtype=torch.bfloat16)
        back = torch.zeros(world * rows, hidden)
        times = {"broadcast+all_reduce": [], "all_to_all x2": []}
        for _ in range(iters):
            dist.barrier()
            t = time.perf_counter()
            dist.broadcast(payload, 0)
            dist.all_reduce(part)
            times["broadcast+all_reduce"].append(time.perf_counter() - t)
            dist.barrier()
            t = time.perf_counter()
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send)             # dispatch: each rank's rows to their owners
            ret = torch.empty_like(back)
            dist.all_to_all_single(ret, back)              # combine: the outputs back
            times["all_to_all x2"].append(time.perf_counter() - t)
        del x
        out[n] = {k: 1e6 * statistics.median(v) for k, v in times.items()}
    if rank == 0:
        q.put(out)
    dist.destroy_process_group()


def run_collectives(args) -> str:
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    hidden = json.loads((args.model / "config.json").read_text())["hidden_size"] if args.model else 1024
    procs = [ctx.Process(target=collectives_rank, args=(r, 2, port, hidden, 2, args.iters, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = q.get()
    for p in procs:
        p.join()
    lines = [f"gloo on one host, 2 ranks, hidden {hidden}, top-2, median of {args.iters}; microseconds per MoE layer",
             "", "| tokens N | broadcast + all_reduce | all_to_all dispatch + combine |", "|---|---|---|"]
    lines += [f"| {n} | {v['broadcast+all_reduce']:.0f} | {v['all_to_all x2']:.0f} |" for n, v in out.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--limit", type=int, default=int(1.2 * 2**30), help="memory limit per process, bytes (1.2 GiB: one "
                    "process holds about a third of mixtral-1.4g's experts, each of 2 ranks most of its half)")
    ap.add_argument("--gpu-mem", default="auto", help="each process's --gpu-mem (auto: what the limit leaves)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per process (2 ranks share 2 cores)")
    ap.add_argument("--no-memcg", action="store_true", help="run the processes without in_memcg.sh")
    ap.add_argument("--collectives", action="store_true", help="time broadcast + all_reduce vs all_to_all only")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="the bundled tiny model, 1 prompt of 4 tokens; no record")
    ap.add_argument("--role", default="driver", choices=("driver", "rank"), help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    add_record_flag(ap)
    args = ap.parse_args(argv)
    if args.role == "rank":
        args.model = None if str(args.model) == "bundled" else args.model
        run_rank(args)
        return
    if args.collectives:
        table = run_collectives(args)
        print(table)
        if wants_record(args):
            record("issue 24: expert-parallel collectives, broadcast + all_reduce vs all_to_all", table)
        return
    if args.smoke:
        args.model, args.prompts, args.tokens, args.prompt_len, args.gpu_mem = Path("bundled"), 1, 4, 8, "30M"
        args.limit = 2 * 2**30
    one, two = launch(args, 1), launch(args, 2)
    table = comparison_table(one, two, args)
    print(table)
    if wants_record(args) and "error" not in one and "error" not in two:
        record("issue 24: expert parallelism, 2 ranks vs 1 process at the same memory limit per process", table,
               comparison=f"2 ranks / 1 process decode tok/s: {two['decode_tokens_per_s'] / one['decode_tokens_per_s']:.2f}x; "
                          f"loads per token {one['loads_per_token']:.2f} -> {two['loads_per_token']:.2f}")


if __name__ == "__main__":
    main()
