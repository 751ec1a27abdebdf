"""Batched decode steps of the serving loop: attention on each sequence's own KV cache vs gathering them.

The continuous-batching loop (runtime/loop.py) keeps one KV cache per sequence (SeqKV) and runs a decode step
over several of them through StepKV. Two ways, same process, runs interleaved:

    ragged   StepKV.rows + the decode ops' attend_rows: each row attends over its own cache in place
    gather   StepKV.update: every row's cache copied, right-aligned, into one [B, Hkv, S, Dh] tensor per
             layer and step (what every step did before the ragged path)

The caches are filled with random keys/values to `context` tokens (attention's cost does not depend on their
values, and a real prefill of B x context tokens would take minutes here); the step is the model's whole decode
forward (embedding to logits, all experts in RAM, bf16 decode ops). Reported per (batch, context): ms per step
for each path (median of --repeats, each the mean over --steps steps), tokens/s, and gather / ragged.

    python bench/bench_batch_decode.py /work/bench_data/mixtral-1.4g
    python bench/bench_batch_decode.py moe_engine/models/tiny-moe --batches 2 --contexts 64 --steps 2 \\
        --repeats 1 --no-record                                                            # quick check

The table is appended to bench/RESULTS.md (bench/results.py) unless --no-record.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402


def make_step_kv(gather: bool):
    from moe_engine.runtime.kv_cache import StepKV

    class GatherStepKV(StepKV):
        ragged = False                       # the decoder's attention then calls update(): the gather

    return GatherStepKV if gather else StepKV


@torch.inference_mode()
def step_ms(eng, batch: int, context: int, steps: int, gather: bool) -> float:
    """Mean ms of `steps` decode steps over `batch` sequences whose caches hold `context` tokens."""
    from moe_engine.runtime.kv_cache import SeqKV
    spec, cls = eng.spec, make_step_kv(gather)
    g = torch.Generator().manual_seed(context)
    seqs = []
    for _ in range(batch):
        kv = SeqKV.for_spec(spec, context + steps, eng.dtype, eng.device)
        for buf in kv.k + kv.v:
            buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype))
        kv.length = context
        seqs.append(kv)
    ids = torch.randint(100, spec.vocab_size, (batch, 1), generator=g)
    mask = torch.ones(batch, 1, dtype=torch.bool)
    t0 = time.perf_counter()
    for _ in range(steps):
        positions = torch.tensor([[s.length] for s in seqs])
        kv = cls(seqs)
        logits = eng.decoder(ids, positions, kv, mask, last_only=True, seq_ids=torch.arange(batch))
        kv.commit()
        ids = logits[:, 0].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 3072])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    add_record_flag(p)
    args = p.parse_args(argv)
    import moe_engine
    eng = moe_engine.load(args.model_dir, dtype="bfloat16", progress=False)
    if eng.decoder.layers[0].attn.ops is None:
        raise SystemExit("bench_batch_decode: no decode ops (needs moe_engine._C, a bf16 model on the CPU)")
    step_ms(eng, 1, 16, 2, False)                                                   # warm-up
    rows = []
    for b in args.batches:
        for ctx in args.contexts:
            runs = {"ragged": [], "gather": []}
            for _ in range(args.repeats):                                           # interleaved
                for name in ("gather", "ragged"):
                    runs[name].append(step_ms(eng, b, ctx, args.steps, name == "gather"))
            med = {k: statistics.median(v) for k, v in runs.items()}
            rows.append({"batch": b, "context": ctx, "runs": runs, **{f"{k}_ms": v for k, v in med.items()}})
            print(f"batch {b} context {ctx}: gather {med['gather']:.1f} ms, ragged {med['ragged']:.1f} ms "
                  f"({med['gather'] / med['ragged']:.2f}x)", file=sys.stderr, flush=True)
    eng.close()
    report = {"model": args.model_dir, "threads": torch.get_num_threads(), "steps": args.steps,
              "repeats": args.repeats, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    text = table(report)
    print(text)
    ratios = ", ".join(f"B={r['batch']} S={r['context']} {r['gather_ms'] / r['ragged_ms']:.2f}x" for r in rows)
    comparison = f"gather ms / ragged ms per decode step: {ratios}"
    print(comparison)
    if wants_record(args):
        record(f"batched decode steps, each sequence's KV cache in place vs gathered, {Path(args.model_dir).name}",
               text, comparison,
               f"{Path(args.model_dir).name} bf16, all experts in RAM, {report['threads']} torch threads; caches "
               f"filled with random keys/values to `context` tokens; {args.steps} steps per run, median of "
               f"{args.repeats} interleaved runs.", argv=sys.argv)
    return 0


def table(r: dict) -> str:
    lines = ["| batch | context | gather ms/step | ragged ms/step | gather tok/s | ragged tok/s | gather / ragged |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        b, g, a = row["batch"], row["gather_ms"], row["ragged_ms"]
        lines.append(f"| {b} | {row['context']} | {g:.1f} | {a:.1f} | {b * 1e3 / g:.1f} | {b * 1e3 / a:.1f} | "
                     f"**{g / a:.2f}x** |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
