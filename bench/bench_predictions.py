"""Predicted decode speed of Mixtral-8x7B and GPT-OSS-20B on an 8 GB and a 24 GB consumer GPU (the README table).

    python bench/bench_predictions.py [--sequences 16] [--no-record]

Each row is `moe-engine simulate` (profiling/simulate.py: the engine's own slot table, eviction policy and
prefetch rules on a modelled timeline) for one model shape, card and expert precision, with the experts
per layer that the card's budget leaves after the non-expert weights and a 4,096-token KV reserve
(ModelShape.experts_per_layer, the same rule as --gpu-mem). Usable memory: 7.5 GiB of an 8 GB card and
22.5 GiB of a 24 GB card (the rest goes to the CUDA context and allocator slack). Experts stream from
pinned host RAM over the card's link; hardware presets and their assumptions are in profiling/hardware.py.

Traces: GPT-OSS-20B uses the real routing of ../shared/data/routing/gptoss20b_test.npz (first N
sequences). No Mixtral routing trace exists here, so Mixtral uses uniformly random top-2 routing
(seeded): no temporal locality at all, which makes its rows a pessimistic estimate (real routing
repeats experts somewhat more often than chance, so hit rates and tokens/s would be higher).
Precisions are the engine's: bf16, or --quant int8/int4/int2 (8.5/4.5/2.5 bits per weight with
group-64 fp16 scales and zeros). GPT-OSS's MXFP4 experts are dequantized at load, so its bf16 row is
what the engine runs without --quant. Predictor: none (demand loads only) and oracle (the trace's own
next routing: the most any predictor could hide).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from moe_engine.errors import ConfigError
from moe_engine.profiling.hardware import preset
from moe_engine.profiling.shapes import shape_preset
from moe_engine.profiling.simulate import simulate
from moe_engine.profiling.trace import Trace, load_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

ROUTING = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing"
CARDS = {"8 GB (RTX 4060-class, PCIe 4.0 x8)": ("pcie4-x8-8gb", 7.5), "24 GB (RTX 4090-class, PCIe 4.0 x16)":
         ("pcie4-x16", 22.5)}
BITS = {"bf16": 16.0, "int8": 8.5, "int4": 4.5, "int2": 2.5}


def uniform_trace(layers: int, experts: int, k: int, sequences: int, tokens: int, seed: int = 0) -> Trace:
    """Uniformly random top-k routing: [S * T, L, K] distinct experts per (token, layer)."""
    rng = np.random.default_rng(seed)
    n = sequences * tokens
    ex = np.argsort(rng.random((n, layers, experts)), axis=-1)[..., :k].astype(np.int16)
    probs = np.full((n, layers, k), 1.0 / k, dtype=np.float32)
    return Trace(ex, probs, np.arange(0, n + 1, tokens, dtype=np.int64), num_experts=experts)


def rows(sequences: int):
    traces = {"mixtral-8x7b": (uniform_trace(32, 8, 2, sequences, 256), "uniform random top-2 (synthetic)"),
              "gpt-oss-20b": (load_trace(ROUTING / "gptoss20b_test.npz").sequences(0, sequences),
                              f"gptoss20b_test.npz, first {sequences} sequences")}
    for model, (trace, source) in traces.items():
        for card, (hw_name, gib) in CARDS.items():
            for quant, bits in BITS.items():
                shape = shape_preset(model).with_expert_bits(bits)
                try:
                    per_layer = shape.experts_per_layer(int(gib * 2**30))
                except ConfigError as e:
                    yield model, card, quant, None, str(e).split(";")[0], source
                    continue
                out = {}
                for predictor in ("none", "oracle"):
                    rep = simulate(trace, shape, preset(hw_name), [per_layer], predictor=predictor)
                    out[predictor] = rep["results"][0] | {"bound": rep["compute_bound_tokens_per_s"]}
                yield model, card, quant, per_layer, out, source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=16, help="trace sequences per model (GPT-OSS: test split)")
    add_record_flag(p)
    args = p.parse_args(argv)
    lines = ["| model | GPU | experts | experts cached / layer | hit rate | decode tok/s (no predictor) | "
             "decode tok/s (oracle prefetch) | compute bound tok/s | trace |", "|---|---|---|---|---|---|---|---|---|"]
    for model, card, quant, per_layer, out, source in rows(args.sequences):
        if per_layer is None:
            lines.append(f"| {model} | {card} | {quant} | does not fit | - | - | - | - | {out} |")
            continue
        none, orc = out["none"], out["oracle"]
        lines.append(f"| {model} | {card} | {quant} | {per_layer} of {shape_preset(model).num_experts} | "
                     f"{none['hit_rate']:.3f} | {none['tokens_per_s']:.1f} | {orc['tokens_per_s']:.1f} | "
                     f"{none['bound']:.1f} | {source} |")
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if wants_record(args):
        record("Predicted decode speed on consumer GPUs (moe-engine simulate)", table,
               notes=__doc__.split("\n\n", 2)[2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
