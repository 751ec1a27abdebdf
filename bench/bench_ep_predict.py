"""What the offloading simulator predicts for expert parallelism on 2 and 4 GPUs (issue 24), GPT-OSS-20B test trace.

    python bench/bench_ep_predict.py [--sequences N] [--no-record]

A model, not a measurement. Each of N GPUs is the predictions table's card (profiling/hardware.py presets; README
"Predictions"): 8 GB = pcie4-x8-8gb with int4 experts, 24 GB = pcie4-x16 with bf16 experts; each caches as many
experts per layer as its plan fits (the card's share of the model, experts_per_layer). With expert parallelism a
rank owns 32/N experts of each layer and caches min(its plan, 32/N) of them, and loads over its own link; rank 0
runs the rest of the model (the engine's design, moe_engine/distributed). Modelled:

  expert side   the simulator (moe-engine simulate's CacheController over a modelled link) replaying the trace with
                N x the per-card cache (capped at all 32: nothing loads) and N x the link bandwidth (each rank its
                own PCIe link): decode seconds per token. Approximation: one cache of N x c slots over all experts
                stands for N caches of c slots over disjoint experts (same capacity; eviction pooled).
  communication per MoE layer and decode token, two small collectives (rank 0 broadcasts the hidden state and
                routing, one all_reduce of the [1, D] partial outputs), each costing a small-message latency taken
                from published measurements:
                  PCIe    43 us: NCCL all_reduce of 8 bytes, 8 x RTX 4090 on PCIe, tree algorithm
                          (github.com/NVIDIA/nccl/issues/1530)
                  NVLink   6 us: NCCL all_reduce of 128 B - 64 KB, 2 x H100 over NVLink (NVLSTree, CUDA graphs;
                          github.com/NVIDIA/nccl/issues/1259)
                and, for scale, a dispatch + combine all-to-all pair: DeepEP's low-latency kernels (EP8 over 400 Gb/s
                RDMA, 128 tokens x 7168 hidden, top-8): 77 us + 114 us (github.com/deepseek-ai/DeepEP,
                docs/legacy.md); bandwidth terms are negligible at one token ([1, 2880] x 4 bytes = 11.5 KB).
  tokens/s = 1 / (expert-side seconds per token + MoE layers x 2 x latency); the last column puts DeepEP's
  all-to-all pair in place of the two collectives (an RDMA-connected, multi-node setting).

On this 2-core VM the measured gloo figures (bench/bench_expert_parallel.py --collectives: ~0.35-0.4 ms per layer
over loopback TCP) are CPU-bound and say nothing about GPUs; they are not used here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_engine.profiling.hardware import preset
from moe_engine.profiling.shapes import shape_preset
from moe_engine.profiling.simulate import simulate
from moe_engine.profiling.trace import load_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing" / "gptoss20b_test.npz"
CARDS = {"8 GB": ("pcie4-x8-8gb", 7.5, "int4", 4.5), "24 GB": ("pcie4-x16", 22.5, "bf16", 16.0)}
LINKS = {"PCIe": 43e-6, "NVLink": 6e-6}     # per small collective; two per MoE layer (broadcast, all_reduce)
ALL_TO_ALL = 77e-6 + 114e-6                  # DeepEP low-latency dispatch + combine, EP8 over RDMA, per MoE layer
GPUS = (1, 2, 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=None, help="first N test sequences (default: all)")
    add_record_flag(p)
    args = p.parse_args(argv)
    trace = load_trace(TEST)
    if args.sequences is not None:
        trace = trace.sequences(0, min(args.sequences, trace.num_sequences))
    lines = ["| GPU (experts) | GPUs | cached / layer (all ranks) | loads / token | expert side tok/s | "
             "comm / token PCIe, NVLink | tok/s PCIe | tok/s NVLink | vs 1 GPU (PCIe, NVLink) | "
             "tok/s with DeepEP all-to-all |", "|---|---|---|---|---|---|---|---|---|---|"]
    for card, (hw_name, gib, prec, bits) in CARDS.items():
        shape = shape_preset("gpt-oss-20b").with_expert_bits(bits)
        per_card = min(shape.num_experts, shape.experts_per_layer(int(gib * 2**30)))
        layers = shape.num_layers
        base = {}
        for n in GPUS:
            cached = min(shape.num_experts, n * per_card)
            hw = preset(hw_name)
            hw = hw.replace(link_bytes_per_s=hw.link_bytes_per_s * n)
            res = simulate(trace, shape, hw, [cached])["results"][0]
            sec = res["decode_seconds"] / max(1, res["decode_tokens"])
            tokens = res["decode_tokens"] + res["prefill_tokens"]
            loads = res["loads"] / max(1, tokens)
            comm = {k: 0.0 if n == 1 else layers * 2 * lat for k, lat in LINKS.items()}
            a2a = 1 / (sec + (0.0 if n == 1 else layers * ALL_TO_ALL))
            tps = {k: 1 / (sec + c) for k, c in comm.items()}
            for k in LINKS:
                base.setdefault(k, tps[k])
            lines.append(f"| {card} ({prec}) | {n} | {cached} of {shape.num_experts} | {loads:.2f} | {1 / sec:.1f} | "
                         f"{comm['PCIe'] * 1e3:.2f} ms, {comm['NVLink'] * 1e3:.2f} ms | {tps['PCIe']:.1f} | "
                         f"{tps['NVLink']:.1f} | {tps['PCIe'] / base['PCIe']:.2f}x, "
                         f"{tps['NVLink'] / base['NVLink']:.2f}x | {a2a:.1f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    notes = __doc__.split("\n\n", 2)[2] + f"\n\nTrace: {trace.num_sequences} test sequences, demand loading " \
        "(no predictor), default eviction policy, cache reset per sequence."
    if wants_record(args):
        record("expert parallelism on 2 and 4 GPUs as the simulator predicts it, GPT-OSS-20B test trace (issue 24)",
               table, None, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
