"""The most fewer expert loads speculative decoding could give on the GPT-OSS-20B test trace (issue 23's 1.5x).

    python bench/bench_spec_bound.py [--sequences N] [--ks 2,4,8] [--cache-experts 8,16] [--no-record]

A bound, not a drafter: the replay of bench/bench_spec_sim.py (profiling/speculation.py's SpeculativeSimulator:
each verify step's rows one pass through the simulator's CacheController, each distinct expert loaded once per
step) with a draft that is always right: the trace's own next K tokens (acceptance 1, K + 1 tokens per verify
step, up to the sequence's end). No drafter can keep more, so no drafter's verify steps amortize loads better;
the same cards, demand loading, default policy, cache reset per sequence. If even this stays under 1.5x fewer
loads per generated token than plain decoding, the target is out of reach for any draft source at that cache size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_engine.profiling.hardware import preset
from moe_engine.profiling.shapes import shape_preset
from moe_engine.profiling.speculation import SpeculativeSimulator, load_text
from moe_engine.profiling.trace import Trace, load_trace
from moe_engine.runtime.speculative import SpeculativeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing" / "gptoss20b_test.npz"


class AlwaysRight(SpeculativeSimulator):
    """Drafts are the trace's next tokens: every one is kept."""

    def _token(self, row: int, seq: int) -> None:
        t = self.text[seq]
        j = row - int(self.trace.seq_offsets[seq]) - t.first_row
        if j < 0 or self.config is None:
            super()._token(row, seq)
            return
        if row < self._resume:
            return
        self.steps += 1
        k = min(self.config.num_speculative_tokens, t.rows - t.first_row - 1 - j)
        self._verify(range(row, row + k + 1))
        self.drafter.drafted += k
        self.drafter.kept += k
        self._resume = row + k + 1


def run(trace, text, shape, hw, size: int, k: int) -> dict:
    cfg = SpeculativeConfig("ngram", num_speculative_tokens=k, adaptive=False) if k else None
    sim = AlwaysRight(trace, text, shape, hw, [size] * trace.num_layers, cfg)
    return sim.run().to_dict()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=None)
    p.add_argument("--ks", default="2,4,8")
    p.add_argument("--cache-experts", default="8,16")
    add_record_flag(p)
    args = p.parse_args(argv)
    trace = load_trace(TEST)
    n = trace.num_sequences if args.sequences is None else min(args.sequences, trace.num_sequences)
    trace, text = trace.sequences(0, n), load_text(TEST, n)
    shape = shape_preset("gpt-oss-20b").with_expert_bits(4.5)
    trace = Trace(trace.experts, trace.probs, trace.seq_offsets, trace.token_ids, trace.extra,
                  max(int(trace.num_experts), shape.num_experts))
    hw = preset("pcie4-x8-8gb")
    lines = ["| cached / layer | draft (always kept) | tokens / verify step | loads / generated token | "
             "fewer loads than plain |", "|---|---|---|---|---|"]
    for size in [int(c) for c in args.cache_experts.split(",")]:
        plain = None
        for k in [0] + [int(x) for x in args.ks.split(",")]:
            r = run(trace, text, shape, hw, size, k)
            lpt = r["loads_per_generated_token"]
            plain = plain or lpt
            lines.append(f"| {size} of 32 | {'plain' if k == 0 else f'next {k} tokens'} | "
                         f"{r['tokens_per_step']:.2f} | {lpt:.2f} | {plain / lpt:.2f}x |")
            print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    notes = __doc__.split("\n\n", 2)[2] + f"\n\nTest: {n} sequences; 8 GB card (int4 experts) for the modelled time."
    if wants_record(args):
        record("the bound on speculative decoding's fewer expert loads, GPT-OSS-20B test trace (issue 23)", table,
               None, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
