"""A/B of two source trees on the same benchmark, runs interleaved (this VM's bandwidth and disk drift 2x).

    python bench/bench_ab.py --base /tmp/base llamacpp [--rounds 2] [--no-record]
    python bench/bench_ab.py --base /tmp/base offload  [--fractions 0.25 0.5] [--tokens 128]
    python bench/bench_ab.py --base /tmp/base serving  [--requests 48 --rate 100]
    python bench/bench_ab.py --base /tmp/base prefetch [--predictors none gate-lookahead]

`--base` is a checkout of another commit with its extension built in place (git worktree add /tmp/base
COMMIT && cd /tmp/base && python setup.py build_ext --inplace, pybind11 installed; and ln -s /work/shared
/tmp/shared, as its scripts look for ../shared beside their tree); "new" is this tree. Each round runs the
benchmark once under each tree, the order alternating round by round; each tree runs its own bench script
with PYTHONPATH set to it, in its own process, so both measure the same protocol through their own API.

  llamacpp  bench_llamacpp.py (llama.cpp and the engine in one process, interleaved): engine decode tok/s and
            engine / llama.cpp per thread count
  offload   bench_offload.py `one` runs under ../shared/tools/in_memcg.sh (limit = budget + runtime allowance,
            checkpoint evicted first) at each expert fraction, random routing and the GPT-OSS trace's routing:
            decode tok/s and decode loads per token; the direct-IO read bandwidth once per round (the bound)
  serving   bench_serving.py (rescheduling vs FIFO on the bundled model, both in each run)
  prefetch  bench_prefetch.py (prefetch vs demand loading on the bundled model, memcg runs)

The table has, per metric, both trees' runs and new / base of the medians; it is appended to
bench/RESULTS.md unless --no-record.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results import add_record_flag, record, wants_record  # noqa: E402

MEMCG = ROOT.parent / "shared" / "tools" / "in_memcg.sh"
TRACE = ROOT.parent / "shared" / "data" / "routing" / "gptoss20b_test.npz"
MODEL = "/work/bench_data/mixtral-1.4g"
GGUF = "/work/bench_data/mixtral-1.4g-bf16.gguf"


def run(tree: Path, argv: list[str], limit: int | None = None, evict: str | None = None) -> subprocess.CompletedProcess:
    """python TREE/bench/<script> ... with PYTHONPATH=TREE, optionally inside a memory cgroup."""
    cmd = [sys.executable, *argv]
    if limit is not None:
        cmd = ["bash", str(MEMCG), str(limit), *(["--evict", evict] if evict else []), "--", *cmd]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    print(f"$ (cd {tree}) PYTHONPATH={tree} " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"failed under {tree}:\n{proc.stderr[-3000:]}")
    return proc


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.removeprefix("RESULT ").strip()
        if line.startswith("{") and line.endswith("}"):
            out.append(json.loads(line))
    return out


# ---- one measurement per preset: tree -> {metric: value} --------------------------------------------
def llamacpp(tree: Path, args) -> dict:
    proc = run(tree, ["bench/bench_llamacpp.py", "--model", GGUF, "--engine-model", MODEL, "--threads",
                      *map(str, args.threads), "--repeats", str(args.repeats), "--no-record"])
    res = json_lines(proc.stdout)
    out = {}
    for t in args.threads:
        lc = next(r for r in res if r["engine"] == "llama.cpp" and r["n_threads"] == t)
        en = next(r for r in res if r["engine"] == "moe-engine" and r["n_threads"] == t)
        out[f"{t} thread(s): engine decode tok/s"] = en["decode_tokens_per_s"]
        out[f"{t} thread(s): llama.cpp decode tok/s"] = lc["decode_tokens_per_s"]
        out[f"{t} thread(s): engine / llama.cpp"] = en["decode_tokens_per_s"] / lc["decode_tokens_per_s"]
    return out


def offload_budgets(fractions: list[float]) -> list[tuple[float, int]]:
    """(fraction, --gpu-mem) as bench_offload.py all computes them (the same plan in both trees)."""
    import torch

    from bench_offload import fraction_budget, sizes
    from moe_engine.checkpoint import Checkpoint
    from moe_engine.experts.plan import make_plan
    _, rest, _ = sizes(MODEL)
    ckpt = Checkpoint(MODEL)
    full = make_plan(ckpt.spec, torch.device("cpu"), ckpt.dtype, rest, None, None)
    ckpt.close()
    return [(frac, fraction_budget(full, frac)[1]) for frac in fractions]


def offload(tree: Path, args) -> dict:
    from bench_offload import RUNTIME_ALLOWANCE
    out = {}
    for frac, gpu_mem in args.budgets:
        for routing in ("random", "trace"):
            argv = ["bench/bench_offload.py", "one", "--model", MODEL, "--mode", "engine", "--gpu-mem", str(gpu_mem),
                    "--tokens", str(args.tokens)] + (["--trace", str(TRACE)] if routing == "trace" else [])
            res = json_lines(run(tree, argv, gpu_mem + RUNTIME_ALLOWANCE, MODEL).stdout)[-1]
            name = f"{int(frac * 100)}% of experts, {routing} routing"
            out[f"{name}: decode tok/s"] = res["decode_tokens_per_s"]
            out[f"{name}: decode loads / token"] = res["decode_loads"] / args.tokens
    return out


def io_bound() -> float:
    argv = ["bench/bench_offload.py", "one", "--model", MODEL, "--mode", "io", "--io-threads", "2"]
    return json_lines(run(ROOT, argv, 4 << 30, MODEL).stdout)[-1]["bytes_per_s"]


def serving(tree: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        run(tree, ["bench/bench_serving.py", "--requests", str(args.requests), "--rate", str(args.rate),
                   "--repeats", "1", "--no-record", "--json", f"{d}/r.json"])
        runs = json.loads(Path(f"{d}/r.json").read_text())
    f, e = runs["fifo"][0], runs["expert"][0]
    return {"fifo: loads / token": f["loads_per_token"], "expert: loads / token": e["loads_per_token"],
            "expert / fifo: loads / token": e["loads_per_token"] / f["loads_per_token"],
            "fifo: tokens/s": f["tokens_per_s"], "expert: tokens/s": e["tokens_per_s"],
            "fifo: p99 latency s": f["p99_s"], "expert: p99 latency s": e["p99_s"]}


def prefetch(tree: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        run(tree, ["bench/bench_prefetch.py", "--predictors", *args.predictors, "--repeats", "1", "--no-record",
                   "--json", f"{d}/p.json"])
        rows = json.loads(Path(f"{d}/p.json").read_text())["rows"]
    out = {}
    for r in rows:
        out[f"{r['predictor']}: stall s"] = r["stall_s"]
        out[f"{r['predictor']}: decode tok/s"] = r["decode_tok_s"]
        out[f"{r['predictor']}: loads"] = r["loads"]
    return out


PRESETS = {"llamacpp": llamacpp, "offload": offload, "serving": serving, "prefetch": prefetch}
TITLES = {"llamacpp": "A/B before vs after: all in RAM decode vs llama.cpp",
          "offload": "A/B before vs after: disk tier (memcg, cold cache) at a fraction of the experts",
          "serving": "A/B before vs after: rescheduling vs FIFO",
          "prefetch": "A/B before vs after: prefetching vs demand loading"}


def table(names: list[str], base: list[dict], new: list[dict]) -> str:
    lines = ["| metric | base (runs) | new (runs) | new / base (medians) |", "|---|---|---|---|"]
    for k in names:
        b, n = [r[k] for r in base], [r[k] for r in new]
        mb, mn = statistics.median(b), statistics.median(n)
        ratio = f"{mn / mb:.3f}x" if mb else "-"
        lines.append(f"| {k} | {', '.join(f'{x:.4g}' for x in b)} | {', '.join(f'{x:.4g}' for x in n)} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=PRESETS)
    ap.add_argument("--base", required=True, help="the other checkout (its extension built in place)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--repeats", type=int, default=3, help="llamacpp: runs per side within one process")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--predictors", nargs="+", default=["none", "gate-lookahead"])
    add_record_flag(ap)
    args = ap.parse_args(argv)
    base_tree, new_tree = Path(args.base).resolve(), ROOT
    base_rev = subprocess.run(["git", "-C", str(base_tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    new_rev = subprocess.run(["git", "-C", str(new_tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    if args.preset == "offload":
        args.budgets = offload_budgets(args.fractions)
    fn, results, bounds = PRESETS[args.preset], {"base": [], "new": []}, []
    for r in range(args.rounds):
        order = [("base", base_tree), ("new", new_tree)]
        for side, tree in (order if r % 2 == 0 else order[::-1]):
            results[side].append(fn(tree, args))
            print(side, json.dumps(results[side][-1]), flush=True)
        if args.preset == "offload":
            bounds.append(io_bound())
    names = list(results["new"][0])
    text = table(names, results["base"], results["new"])
    print(text)
    notes = (f"base = {base_rev} (before the redesign), new = {new_rev}; {args.rounds} rounds, the trees' order "
             f"alternating round by round, each run its tree's own bench script in its own process.")
    if bounds:
        notes += (" Direct-IO read bandwidth measured after each round (the bound's disk side): "
                  + ", ".join(f"{b / 1e9:.2f} GB/s" for b in bounds) + ".")
    if wants_record(args):
        record(TITLES[args.preset], text, None, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
