"""Fused dequantize+matmul on the CPU (moe_engine._C) vs the reference (dequantize W, then F.linear), decode shapes.

Three expert shapes: the bundled tiny model (D=192, I=128), the Mixtral-shaped bench checkpoint of
RESULTS.md (D=1024, I=3584) and real Mixtral-8x7B (D=4096, I=14336). For each: W1 [2I, D] and W2 [D, I]
through _ops.qlinear (fast) and quant.kernels.qlinear_reference, and the whole SwiGLU expert through
quant_expert_ffn(kernel="fast" | "reference"), at N = 1, 4, 8 tokens, 8/4/3/2-bit codes in groups of 64,
x in float32 and bfloat16. Codes, scales and zeros are random (neither path's speed depends on them).
For the two Mixtral shapes every timed call starts with cold caches (a 64 MiB buffer is read before
it), as at decode, where each expert's bytes are read from DRAM once per token; the tiny model's
experts (12.6 MB in all) stay in a 32 MiB L3, so it is timed warm (--flush changes both). The buffer
is read by numpy on one thread: read by torch on --threads threads instead (--flush-with torch),
torch's OpenMP workers keep spinning for a few ms afterwards and take a core from the fast kernel's
own threads, the situation right after any parallel torch op. A warm-up call of each path also checks
that they agree.
Times: median of --repeats calls, or of at least 3 once a measurement has taken --budget seconds.

    PYTHONPATH=. python bench/bench_qmatmul.py                      # ~6 min on 2 cores; a markdown table
    PYTHONPATH=. python bench/bench_qmatmul.py --models tiny mixtral-bench --threads 1 --flush never
    PYTHONPATH=. python bench/bench_qmatmul.py --models tiny --bits 4 --tokens 1 --dtypes float32 --no-record

The tables (ratio reference / fast per shape, and the smallest ratio per model) are appended to
bench/RESULTS.md (bench/results.py) unless --no-record.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_engine import _ops
from moe_engine.quant.format import QuantLayout
from moe_engine.quant.kernels import quant_expert_ffn, qlinear_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

MODELS = {"tiny": (192, 128), "mixtral-bench": (1024, 3584), "mixtral-8x7b": (4096, 14336)}   # name -> (D, I)
COLD = {"tiny": False, "mixtral-bench": True, "mixtral-8x7b": True}   # --flush auto: evict caches between calls
BITS = (8, 4, 3, 2)
TOKENS = (1, 4, 8)
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
GROUP = 64
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}   # max |fast - ref| / max |ref| the warm-up check allows


def random_expert(layout: QuantLayout, seed: int = 0) -> torch.Tensor:
    """The expert's uint8 buffer: random code bytes, fp16 scales in [1e-3, 1.1e-2], integer zeros in range."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, 256, (layout.numel,), dtype=torch.uint8, generator=g)
    for lay in (layout.w1, layout.w2):
        v = lay.views(buf)
        v.scales.copy_(torch.rand(v.scales.shape, generator=g) * 0.01 + 0.001)
        v.zeros.copy_(torch.randint(0, 2 ** layout.bits, v.zeros.shape, generator=g))
    return buf


def median_ms(fn, repeats: int, budget_s: float, flush) -> float:
    """Median wall time of fn() in ms, each call after flush() (evicting the caches) when given."""
    times: list[float] = []
    while len(times) < repeats and not (len(times) >= 3 and sum(times) > budget_s):
        if flush is not None:
            flush()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ops_for(layout: QuantLayout, buf: torch.Tensor) -> dict:
    """op name -> (x columns, reference fn, fast fn); the fns take x [N, columns]."""
    w1, w2 = layout.w1.views(buf), layout.w2.views(buf)
    return {
        "W1 [2I, D]": (w1.cols, lambda x: qlinear_reference(x, w1), lambda x: _ops.qlinear(x, w1)),
        "W2 [D, I]": (w2.cols, lambda x: qlinear_reference(x, w2), lambda x: _ops.qlinear(x, w2)),
        "expert ffn": (layout.hidden_size, lambda x: quant_expert_ffn(x, buf, layout, kernel="reference"),
                       lambda x: quant_expert_ffn(x, buf, layout, kernel="fast")),
    }


def measure(ref, fast, x: torch.Tensor, args, flush) -> tuple[float, float]:
    """(reference ms, fast ms) for one x, after a warm-up call of each that checks they agree."""
    want, got = ref(x).float(), fast(x).float()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    if err > TOL[x.dtype]:
        raise AssertionError(f"fast and reference disagree: max error {err:.2e} of max |reference| for {x.dtype}")
    return (median_ms(lambda: ref(x), args.repeats, args.budget, flush),
            median_ms(lambda: fast(x), args.repeats, args.budget, flush))


def model_rows(name: str, args, flush) -> list[dict]:
    hidden, inter = MODELS[name]
    flush = flush if (args.flush == "always" or (args.flush == "auto" and COLD[name])) else None
    rows = []
    for bits in args.bits:
        layout = QuantLayout(hidden, inter, bits, GROUP)
        buf = random_expert(layout)
        for dname in args.dtypes:
            for op, (cols, ref, fast) in ops_for(layout, buf).items():
                row = {"model": name, "op": op, "bits": bits, "dtype": dname}
                for n in args.tokens:
                    x = torch.randn(n, cols, generator=torch.Generator().manual_seed(n)).to(DTYPES[dname])
                    row[n] = measure(ref, fast, x, args, flush)
                rows.append(row)
                print(format_row(row, args.tokens), flush=True)
        del buf
    return rows


def format_row(row: dict, tokens) -> str:
    cells = [row["model"], row["op"], str(row["bits"]), row["dtype"]]
    for n in tokens:
        ref, fast = row[n]
        cells += [f"{ref:.3g}", f"{fast:.3g}", f"**{ref / fast:.1f}x**"]
    return "| " + " | ".join(cells) + " |"


def header(tokens) -> str:
    cols = ["model", "op", "bits", "x"] + [f"N={n} {c}" for n in tokens for c in ("ref ms", "fast ms", "ref/fast")]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", nargs="+", type=int, default=list(BITS), choices=BITS)
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the fast kernel uses as many)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds after which 3 calls are enough")
    ap.add_argument("--flush", default="auto", choices=["auto", "always", "never"],
                    help="read 64 MiB before every timed call (auto: for the Mixtral shapes only)")
    ap.add_argument("--flush-with", default="numpy", choices=["numpy", "torch"],
                    help="numpy: one thread; torch: --threads OpenMP threads, which then spin for a while")
    add_record_flag(ap)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    evict = torch.ones(64 << 20 >> 3, dtype=torch.int64)   # 64 MiB
    flush = evict.sum if args.flush_with == "torch" else evict.numpy().sum
    setup = (f"torch {torch.__version__}, {args.threads} threads, moe_engine._C loaded: {_ops.HAS_C_EXT} "
             f"(SIMD paths: {', '.join(_ops.qlinear_isas()) or 'none'}), group {GROUP}, "
             f"flush {args.flush} with {args.flush_with}")
    print(setup + "\n")
    print(header(args.tokens))
    rows = [row for name in args.models for row in model_rows(name, args, flush)]
    worst = worst_table(rows, args.models, args.tokens)
    print("\nSmallest ref/fast over ops, bits and x dtypes (target: >= 2x at decode shapes):\n")
    print(worst)
    text = "\n".join([header(args.tokens), *(format_row(r, args.tokens) for r in rows), "", worst])
    compare = "reference / fast (smallest over ops, bits, dtypes): " + "; ".join(
        line.strip("| ").replace(" | ", " ") for line in worst.splitlines()[2:])
    if wants_record(args):
        record("fused dequantize+matmul on the CPU vs the reference, decode shapes", text, compare,
               setup + ". Times in ms, median of --repeats calls.")
    return 0


def worst_table(rows: list[dict], models: list[str], tokens) -> str:
    """Per model, the smallest reference / fast ratio at each N."""
    lines = ["| model | " + " | ".join(f"N={n}" for n in tokens) + " |", "|" + "---|" * (len(tokens) + 1)]
    for name in models:
        worst = [min(r[n][0] / r[n][1] for r in rows if r["model"] == name) for n in tokens]
        lines.append(f"| {name} | " + " | ".join(f"{w:.1f}x" for w in worst) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
