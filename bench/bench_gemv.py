"""bf16 GEMV on the CPU: moe_engine._C's bf16_linear (each SIMD path) vs torch's F.linear, at the decode shapes
of the Mixtral-shaped bench checkpoint (hidden 1024, expert FFN 3584, vocab 32000), in GB/s of weight reads.

    gate_up [7168, 1024]   down [1024, 3584]   q/o [1024, 1024]   k/v [256, 1024]   lm_head [32000, 1024]

Weights are cold, as at decode (each token reads ~480 MB, far more than the 32 MiB L3): every timed call uses
the next of enough copies of W to fill --pool-mb of memory, in turn. x is bf16 [N, C] with N = --tokens.
GB/s = bytes of W / seconds per call (median of --repeats rounds over all copies). Python-side overhead
(_ops.bf16_linear's checks and output allocation) is included in the "_ops" column only.

    PYTHONPATH=. python bench/bench_gemv.py                  # ~1 min; appends its table to bench/RESULTS.md
    PYTHONPATH=. python bench/bench_gemv.py --tokens 1 4 --threads 1 --no-record
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_engine import _ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

SHAPES = {"gate_up": (7168, 1024), "down": (1024, 3584), "q/o": (1024, 1024), "k/v": (256, 1024),
          "lm_head": (32000, 1024)}


def raw_call(isa: str, threads: int):
    """The C kernel without _ops's Python checks: the kernel's own speed."""
    def call(x, w, y):
        _ops._C.bf16_linear(x.data_ptr(), False, x.shape[0], w.data_ptr(), 0, w.shape[0], w.shape[1], y.data_ptr(),
                            threads, isa)
    return call


def seconds_per_call(call, xs, ws, ys, repeats: int) -> float:
    """Median over rounds of (time of one call on each cold copy) / copies."""
    for w, y in zip(ws[:2], ys):
        call(xs, w, y)
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in ws:
            call(xs, w, ys[0])
        rounds.append((time.perf_counter() - start) / len(ws))
    return statistics.median(rounds)


def measure(name: str, shape, n: int, threads: int, args) -> dict:
    rows, cols = shape
    copies = max(2, int(args.pool_mb * 2**20 // (rows * cols * 2)))
    ws = [torch.randn(rows, cols).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn(n, cols).to(torch.bfloat16)
    ys = [torch.empty(n, rows, dtype=torch.bfloat16)]
    gbs = lambda s: rows * cols * 2 / s / 1e9   # noqa: E731
    out = {"shape": name, "rows": rows, "cols": cols, "n": n, "threads": threads}
    torch.set_num_threads(threads)
    for isa in _ops.bf16_linear_isas():
        out[isa] = gbs(seconds_per_call(raw_call(isa, threads), x, ws, ys, args.repeats))
    out["_ops"] = gbs(seconds_per_call(lambda x_, w, y: _ops.bf16_linear(x_, w), x, ws, ys, args.repeats))
    out["torch"] = gbs(seconds_per_call(lambda x_, w, y: F.linear(x_, w), x, ws, ys, args.repeats))
    return out


def table(results: list[dict]) -> str:
    isas = _ops.bf16_linear_isas()
    head = "| shape | W [R, C] | N | threads | " + " | ".join(f"{i} GB/s" for i in isas) + \
        " | _ops.bf16_linear GB/s | torch F.linear GB/s | best / torch |"
    lines = [head, "|" + "---|" * (len(isas) + 7)]
    for r in results:
        best = max(r[i] for i in isas)
        lines.append(f"| {r['shape']} | [{r['rows']}, {r['cols']}] | {r['n']} | {r['threads']} | " +
                     " | ".join(f"{r[i]:.1f}" for i in isas) +
                     f" | {r['_ops']:.1f} | {r['torch']:.1f} | **{best / r['torch']:.2f}x** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    p.add_argument("--pool-mb", type=float, default=256.0, help="memory the copies of W fill (>> L3)")
    p.add_argument("--repeats", type=int, default=5)
    add_record_flag(p)
    args = p.parse_args(argv)
    if not _ops.HAS_C_EXT:
        print(f"moe_engine._C is not loaded ({_ops.C_EXT_ERROR}); nothing to measure", file=sys.stderr)
        return 1
    results = []
    for threads in args.threads:
        for name in args.shapes:
            for n in args.tokens:
                results.append(measure(name, SHAPES[name], n, threads, args))
                print(results[-1], file=sys.stderr)
    text = table(results)
    print(text)
    if wants_record(args):
        record("bf16 GEMV GB/s at decode shapes, moe_engine._C bf16_linear vs torch F.linear", text,
               notes=f"Cold weights: each call reads the next of enough copies of W to fill {args.pool_mb:.0f} MB. "
                     f"Median of {args.repeats} rounds. Per-path columns call the kernel directly; the _ops column "
                     "adds the Python dispatch (checks, output allocation).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
