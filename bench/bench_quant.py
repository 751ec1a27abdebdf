"""Held-out perplexity of the bundled model with quantized experts (issue 6's quality targets).

    python bench/bench_quant.py [--tokens 65536] [--seq 256] [--seeds 0 1 2] [--cache DIR] [--plot OUT.png]

Scores every setting on the same held-out tokens in windows of `seq`, float32 compute: bf16
experts (the checkpoint), int8, int4, int3, int2, mixed:3 and mixed:2.5 (widths chosen by the
integer program from the calibration text), and the uniform 2.5-bit baseline (experts drawn at
random to get 3 bits, the rest 2; one row per seed). Held-out files 0-1 of the model card's
held-out split are the calibration text (moe_engine/models/tiny-moe/calibration.txt), so they
are left out of the scored tokens. Prints a markdown table (ratio to bf16), appended to
bench/RESULTS.md (bench/results.py) unless --no-record.

    python bench/bench_quant.py --tokens 512 --seq 128 --seeds 0 --settings bf16 int4 --no-record   # quick check
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402
from train_tiny_moe import corpus_files, encode_files  # noqa: E402

CALIBRATION_FILES = 2          # held-out files 0..1 make calibration.txt


def perplexity(eng, held: torch.Tensor, seq: int) -> float:
    nll, count = 0.0, 0
    for i in range((len(held) - 1) // seq):
        x = held[i * seq:(i + 1) * seq + 1][None]
        logits = eng.logits(x[:, :-1])[0]
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += seq
    return math.exp(nll / count)


def settings_list(seeds: list[int], num_layers: int, num_experts: int):
    from moe_engine.quant.allocate import interleaved_bits
    from moe_engine.quant.settings import parse_quant
    rows = [("bf16 (no quantization)", None, 16.0)]
    rows += [(f"int{b}", f"int{b}", float(b)) for b in (8, 4, 3)]
    rows += [("mixed:3", "mixed:3", 3.0)]
    for s in seeds:
        table = tuple(tuple(interleaved_bits(num_experts, 2, 3, 2.5, seed=s * 100 + m)) for m in range(num_layers))
        base = parse_quant("mixed:2.5")
        rows.append((f"uniform 2.5 (interleaved 2/3, seed {s})", type(base)("mixed", avg_bits=2.5, bits_table=table,
                                                                              calibration=base.calibration), 2.5))
    rows += [("mixed:2.5", "mixed:2.5", 2.5), ("int2", "int2", 2.0)]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cache", default="/tmp/moe-quant-bench", help="quantized-expert cache directory")
    p.add_argument("--plot", default=None)
    p.add_argument("--settings", nargs="+", default=None,
                   help="only the settings whose name starts with one of these (e.g. bf16 int4 mixed:2.5); bf16 first")
    add_record_flag(p)
    args = p.parse_args(argv)
    import moe_engine
    eng = moe_engine.load(dtype="float32", progress=False)
    _, held_files = corpus_files()
    held = encode_files(eng.tokenizer, held_files[CALIBRATION_FILES:])[: args.tokens + 1]
    spec = eng.spec
    eng.close()
    results = []
    settings = settings_list(args.seeds, len(spec.moe_layers), spec.moe.num_experts)
    if args.settings:
        settings = [x for x in settings if x[0] == settings[0][0] or x[0].startswith(tuple(args.settings))]
    for name, quant, bits in settings:
        t0 = time.perf_counter()
        eng = moe_engine.load(dtype="float32", quant=quant, quant_cache=args.cache, progress=False)
        load_s = time.perf_counter() - t0
        ppl = perplexity(eng, held, args.seq)
        q = eng.stats()["quant"]
        nbytes = 3 * spec.hidden_size * spec.moe.intermediate_size * 2           # bf16 expert
        if quant is not None:                                                    # mean over the experts' widths
            widths = [b for row in q["bits_per_expert"] for b in row]
            nbytes = sum(q["expert_bytes"][str(b)] for b in widths) / len(widths)
        results.append((name, bits, ppl, nbytes, load_s))
        print(f"{name}: ppl {ppl:.4f} (load {load_s:.1f} s)", file=sys.stderr, flush=True)
        eng.close()
    scored = f"held-out tokens scored: {(len(held) - 1) // args.seq * args.seq}, windows of {args.seq}, float32"
    text = table(results)
    print(scored)
    print(text)
    compare = "held-out perplexity / bf16's: " + ", ".join(f"{name} {ppl / results[0][2]:.4f}x"
                                                          for name, _, ppl, _, _ in results[1:])
    if wants_record(args):
        record("held-out perplexity of the bundled model with quantized experts", text, compare,
               scored + "; calibration files left out of the scored tokens.")
    if args.plot:
        plot(results, args.plot)
    return 0


def table(results: list[tuple]) -> str:
    """One row per setting; the first (bf16) is the base of the ratios."""
    base, base_bytes = results[0][2], results[0][3]
    lines = ["| setting | mean bits | held-out ppl | vs bf16 | mean bytes per expert | smaller than bf16 |",
             "|---|---|---|---|---|---|"]
    for name, bits, ppl, nbytes, _ in results:
        lines.append(f"| {name} | {bits:g} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | {nbytes:,.0f} | "
                     f"{base_bytes / nbytes:.2f}x |")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, bits, ppl, _, _ in results:
        marker = "o" if name.startswith(("int", "bf16")) else ("s" if name.startswith("mixed") else "x")
        ax.scatter(bits, ppl, marker=marker, label=name)
    ax.set_xlabel("mean bits per expert weight")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("tiny-moe: perplexity vs expert bits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
