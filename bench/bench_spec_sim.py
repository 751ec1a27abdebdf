"""Prompt-lookup speculative decoding in the offloading simulator, GPT-OSS-20B test trace (issue 23).

    python bench/bench_spec_sim.py [--sequences N] [--ks 2,4,6] [--cache-experts 8,16] [--dev-sequences 16]
                                   [--jobs 1] [--no-record]

A model-free replay, not a timing run: profiling/speculation.py replays each sequence of
../shared/data/routing/gptoss20b_test.npz (greedy GPT-OSS-20B generations; token strings in the jsonl beside
it, so prompt-lookup acceptance is exact) as the engine's speculative lockstep would: prompt lookup over the
prompt and the tokens so far (runtime/drafting.Drafter, the engine's object), a draft token kept while it
equals the trace's next token, and each verify step's rows (the kept ones and the rejected ones, whose
routing is modelled by the trace row at that position) fed as one pass through the simulator's own
CacheController and modelled link (`moe-engine simulate`, profiling/simulate.py): each distinct expert of a
layer loaded and computed once per step. Decoding: plain (one row per step), ngram:K (drafts of up to K
tokens) and ngram:Kmax:adaptive (the engine's draft length per step from tracked acceptance and the
modelled step times). Demand loading (no predictor), default eviction policy, cache reset per sequence.

Cards: the predictions table's presets (profiling/hardware.py) with the expert precision at which that
card's plan caches only part of the experts (README "Predictions"): 8 GB = pcie4-x8-8gb with int4 experts
(4.5 bits; the card's plan: 12 of 32 per layer), 24 GB = pcie4-x16 with bf16 experts (the plan: 17 of
32). Every card is run at each --cache-experts size; a size over the card's plan is marked (a rate
model, not a configuration that fits). Modelled time: a verify step streams each weight once (the
hardware model is bandwidth-bound), so its dense part, lm_head and each distinct expert cost what one
token's do. K is never chosen on test: the K named in the comparison is the one with the most fewer
loads per generated token on the first --dev-sequences of gptoss20b_dev.npz (8 GB card; loads under
demand loading do not depend on the card).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from moe_engine.profiling.hardware import preset
from moe_engine.profiling.shapes import shape_preset
from moe_engine.profiling.speculation import load_text, parse_speculative, simulate_speculative
from moe_engine.profiling.trace import load_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

ROUTING = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing"
TEST, DEV = ROUTING / "gptoss20b_test.npz", ROUTING / "gptoss20b_dev.npz"
CARDS = {"8 GB": ("pcie4-x8-8gb", 7.5, "int4", 4.5), "24 GB": ("pcie4-x16", 22.5, "bf16", 16.0)}
MODEL = "gpt-oss-20b"


@functools.cache
def _inputs(path: str, sequences: int | None):
    trace = load_trace(path)
    n = trace.num_sequences if sequences is None else min(sequences, trace.num_sequences)
    return trace.sequences(0, n), load_text(path, n)


def run_one(job: tuple) -> dict:
    """(trace path, sequences, hardware preset, expert bits, experts per layer, --speculative) -> one summary."""
    path, sequences, hw_name, bits, size, spec = job
    trace, text = _inputs(path, sequences)
    t0 = time.perf_counter()
    rep = simulate_speculative(trace, text, shape_preset(MODEL).with_expert_bits(bits), preset(hw_name), [size],
                               parse_speculative(spec), baseline=False)
    print(f"  {Path(path).name} {hw_name} {size}/32 {spec}: {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)
    return rep["results"][0]["speculative"]


def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [run_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(run_one, jobs))


def choose_k(ks: list[int], sizes: list[int], dev_sequences: int, workers: int) -> tuple[int, dict]:
    """The K whose loads per generated token are the most below plain's (mean ratio over the sizes) on dev."""
    hw, _, _, bits = CARDS["8 GB"]
    specs = ["ngram:0"] + [f"ngram:{k}" for k in ks]
    jobs = [(str(DEV), dev_sequences, hw, bits, size, spec) for size in sizes for spec in specs]
    out = iter(run_all(jobs, workers))
    ratios = {k: 0.0 for k in ks}
    for _ in sizes:
        plain, *fixed = [next(out) for _ in specs]
        for k, res in zip(ks, fixed):
            ratios[k] += plain["loads_per_generated_token"] / res["loads_per_generated_token"] / len(sizes)
    return max(ks, key=lambda k: (ratios[k], -k)), ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=None, help="first N test sequences (default: all 96)")
    p.add_argument("--ks", default="2,4,6", help="draft lengths K (comma-separated)")
    p.add_argument("--cache-experts", default="8,16", help="experts cached per layer (comma-separated)")
    p.add_argument("--dev-sequences", type=int, default=16, help="dev sequences to choose K on (0: choose none)")
    p.add_argument("--jobs", type=int, default=1, help="simulations run at once (processes)")
    add_record_flag(p)
    args = p.parse_args(argv)
    ks, sizes = [int(k) for k in args.ks.split(",")], [int(c) for c in args.cache_experts.split(",")]
    t0 = time.perf_counter()
    chosen, dev = choose_k(ks, sizes, args.dev_sequences, args.jobs) if args.dev_sequences else (None, {})
    specs = ["ngram:0"] + [f"ngram:{k}" for k in ks] + [f"ngram:{max(ks)}:adaptive"]
    settings = [(card, size, spec) for card in CARDS for size in sizes for spec in specs]
    results = run_all([(str(TEST), args.sequences, CARDS[c][0], CARDS[c][3], s, spec) for c, s, spec in settings],
                      args.jobs)
    table, plain = _table(settings, results, sizes), {}
    for (card, size, spec), res in zip(settings, results):
        plain.setdefault((card, size), res)
    comparison = _comparison(chosen, dev, settings, results, plain, sizes)
    trace_rows = sum(t.rows for t in _inputs(str(TEST), args.sequences)[1])
    notes = (__doc__.split("\n\n", 2)[2] + f"\n\nTest: {_inputs(str(TEST), args.sequences)[0].num_sequences} "
             f"sequences, {trace_rows} generated tokens (decode rows). Run time {time.perf_counter() - t0:.0f} s.")
    print(table)
    print(comparison)
    if wants_record(args):
        record("Speculative decoding in the simulator, GPT-OSS-20B test trace (issue 23)", table, comparison, notes)
    return 0


def _table(settings, results, sizes) -> str:
    lines = ["| GPU (experts) | cached / layer | decoding | acceptance | tokens / step | loads / generated token | "
             "fewer loads than plain | modelled decode tok/s | vs plain |", "|---|---|---|---|---|---|---|---|---|"]
    plan = {card: shape_preset(MODEL).with_expert_bits(bits).experts_per_layer(int(gib * 2**30))
            for card, (_, gib, _, bits) in CARDS.items()}
    base = {}
    for (card, size, spec), r in zip(settings, results):
        b = base.setdefault((card, size), r)
        fits = "" if size <= plan[card] else f" (over the card's {plan[card]})"
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        lines.append(f"| {card} ({CARDS[card][2]}) | {size} of 32{fits} | {'plain' if spec == 'ngram:0' else spec} | "
                     f"{acc} | {r['tokens_per_step']:.2f} | {r['loads_per_generated_token']:.2f} | "
                     f"{b['loads_per_generated_token'] / r['loads_per_generated_token']:.2f}x | "
                     f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / b['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def _comparison(chosen, dev, settings, results, plain, sizes) -> str:
    if chosen is None:
        return "no K chosen (--dev-sequences 0): every K is in the table"
    by = dict(zip(settings, results))
    spec = f"ngram:{chosen}"
    parts = [f"K={chosen} chosen on dev (loads per generated token vs plain, mean over sizes: "
             + ", ".join(f"K={k} {r:.2f}x" for k, r in dev.items()) + ")"]
    for size in sizes:
        r, p = by[("8 GB", size, spec)], plain[("8 GB", size)]
        ratio = p["loads_per_generated_token"] / r["loads_per_generated_token"]
        parts.append(f"{size}/32: {ratio:.2f}x fewer loads per generated token ({p['loads_per_generated_token']:.2f} "
                     f"-> {r['loads_per_generated_token']:.2f}; target 1.5x {'met' if ratio >= 1.5 else 'NOT met'}), "
                     f"acceptance {r['acceptance']:.3f}, {r['tokens_per_step']:.2f} tokens per verify step; "
                     + ", ".join(f"{card} {plain[(card, size)]['tokens_per_s']:.1f} -> "
                                 f"{by[(card, size, spec)]['tokens_per_s']:.1f} tok/s" for card in CARDS))
    return "; ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
