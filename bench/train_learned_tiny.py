"""Train the `learned` predictor for the bundled tiny-moe and compare it with `gate-lookahead` on held-out text.

Data (the model's own split, bench/train_tiny_moe.py `corpus_files()`):
  train: --train-tokens of TRAINING-file text, as windows of --window tokens spread evenly over the
         training stream, recorded through the engine (`record_trace`, router inputs on, one window
         per sequence, prompt tokens only);
  eval:  every full window of the HELD-OUT files, recorded the same way; optionally (--gen-prompts)
         held-out prompts followed by greedy generated tokens, to see decode-time routing too.
Both predictors are replayed over the eval traces with `predictors.evaluate.replay` (decode-style,
one token per sequence per step): recall@k at lookahead 1 and 2, k = top_k and 2 x top_k, overall
and per layer. gate-lookahead gets the model's router weights; learned gets token ids.

    PYTHONPATH=. python bench/train_learned_tiny.py --out /work/tmp_learned/predictor-learned.pt   # ~5 min, 1 core
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import moe_engine
from moe_engine.profiling.trace import Trace, load_trace, save_trace
from moe_engine.profiling.record import record_trace
from predictors import GateLookahead
from predictors.evaluate import replay
from predictors.learned import LearnedPredictor


def windows(ids: torch.Tensor, window: int, count: int | None) -> list[list[int]]:
    """`count` windows of `window` tokens spread evenly over the stream (all full windows when None)."""
    starts = np.arange(0, len(ids) - window + 1, window)
    if count is not None and count < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, count).round().astype(int)]
    return [ids[s:s + window].tolist() for s in starts]


def cached_trace(path: Path, eng, prompts: list[list[int]], new_tokens: int) -> Trace:
    if path.is_file():
        print(f"reusing {path}", file=sys.stderr)
        return load_trace(path)
    t0 = time.perf_counter()
    trace = record_trace(eng, prompts, max_new_tokens=new_tokens, router_inputs=True, progress=False)
    print(f"recorded {trace.num_steps} tokens ({trace.num_sequences} sequences) in {time.perf_counter() - t0:.0f}s "
          f"-> {path}", file=sys.stderr)
    save_trace(path, trace)
    return trace


def recall(pred, trace: Trace, routers=None) -> dict:
    meter = replay(pred, trace.experts, trace.probs, trace.seq_offsets, depth=2, ks=(2, 4),
                   token_ids=trace.token_ids, router_inputs=trace.extra["router_inputs"], routers=routers,
                   num_experts=trace.num_experts)
    return meter.summary()


def table(title: str, results: dict[str, dict]) -> str:
    """Markdown: one row per predictor and (lookahead, k), overall then per target layer."""
    first = next(iter(results.values()))
    n_layers = len(first["per_layer_recall"]["k2_d1"])
    head = "| predictor | lookahead | k | overall | " + " | ".join(f"L{m}" for m in range(n_layers)) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (4 + n_layers)]
    for d in (1, 2):
        for k in (2, 4):
            for name, s in results.items():
                key = f"k{k}_d{d}"
                per = " | ".join("-" if v is None else f"{v:.3f}" for v in s["per_layer_recall"][key])
                lines.append(f"| {name} | {d} | {k} | **{s['recall'][key]:.3f}** | {per} |")
    return "\n".join(lines)


def predict_cost(pred, d: int, n: int, reps: int = 2000) -> float:
    """Microseconds per observe + predict at a middle layer, N tokens, bf16 router input."""
    pred.bind({m: None for m in range(pred.config.num_layers)}, 2, pred.config.num_experts)
    h, ex = torch.randn(n, d, dtype=torch.bfloat16), torch.randint(0, pred.config.num_experts, (n, 2))
    w, tok = torch.full((n, 2), 0.5), torch.randint(0, pred.config.vocab_size, (n,))
    for _ in range(100):
        pred.observe(2, h, ex, w, tok)
        pred.predict(2, 2)
    t0 = time.perf_counter()
    for _ in range(reps):
        pred.observe(2, h, ex, w, tok)
        pred.predict(2, 2)
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/work/tmp_learned/predictor-learned.pt", help="where to save the predictor")
    p.add_argument("--cache", default="/work/tmp_learned", help="directory for the recorded traces (reused)")
    p.add_argument("--train-tokens", type=int, default=409_600, help="training-file tokens to record")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--gen-prompts", type=int, default=64, help="held-out prompts for the decode-time table (0: skip)")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens generated per such prompt")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(1)                      # tiny model and nets: one thread is fastest on the shared VM
    sys.path.insert(0, str(Path(__file__).parent))
    from train_tiny_moe import corpus_files, encode_files

    eng = moe_engine.load(progress=False)
    train_files, held_files = corpus_files()
    cache, w = Path(args.cache), args.window
    cache.mkdir(parents=True, exist_ok=True)
    train_ids, held_ids = encode_files(eng.tokenizer, train_files), encode_files(eng.tokenizer, held_files)
    train = cached_trace(cache / f"tiny-train-{args.train_tokens // w}x{w}.npz", eng,
                         windows(train_ids, w, args.train_tokens // w), 1)
    held = cached_trace(cache / f"tiny-heldout-{w}.npz", eng, windows(held_ids, w, None), 1)
    evals = {f"held-out text ({held.num_sequences} windows x {w} tokens, {held.num_steps} tokens)": held}
    if args.gen_prompts:
        prompts = [p[: w // 2] for p in windows(held_ids, w, args.gen_prompts)]
        gen = cached_trace(cache / f"tiny-heldout-gen-{args.gen_prompts}x{w // 2}+{args.gen_tokens}.npz", eng,
                           prompts, args.gen_tokens + 1)
        evals[f"held-out prompts + generated tokens ({gen.num_sequences} x ({w // 2} + {args.gen_tokens}))"] = gen
    routers = {pos: eng.decoder.layers[m].moe.router.weight.detach().float()
               for pos, m in enumerate(train.extra["moe_layers"])}
    spec = eng.spec
    eng.close()

    t0 = time.perf_counter()
    kw = {"epochs": args.epochs} if args.epochs else {}
    pred = LearnedPredictor.fit(train.extra["router_inputs"], train.token_ids, train.experts, spec.moe.num_experts,
                                spec.vocab_size, depth=2, seed=args.seed, layers=train.extra["moe_layers"],
                                on_progress=lambda f, m: "held-out" in m and print(f"  {m}", file=sys.stderr), **kw)
    train_s = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pred.save(args.out)
    size = Path(args.out).stat().st_size

    report = {"train_tokens": train.num_steps, "train_seconds": train_s, "file_bytes": size, "tables": {}}
    for title, trace in evals.items():
        res = {"gate-lookahead": recall(GateLookahead(), trace, routers), "learned": recall(pred, trace),
               "learned (no token ids)": recall(pred, Trace(trace.experts, trace.probs, trace.seq_offsets, None,
                                                            trace.extra, trace.num_experts))}
        report["tables"][title] = res
        print(table(title, res) + "\n")
    report["us_per_call"] = {n: predict_cost(pred, spec.hidden_size, n) for n in (1, 16, 256)}
    print(f"trained on {train.num_steps} training-file tokens in {train_s:.0f}s (1 thread); saved {args.out} "
          f"({size / 1e6:.2f} MB); observe+predict per layer: "
          + ", ".join(f"N={n}: {us:.0f} us" for n, us in report["us_per_call"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
