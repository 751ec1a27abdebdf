"""Prefetching vs demand loading on the bundled model with the expert cache at a fraction of the experts.

    python bench/bench_prefetch.py [--fraction 0.25] [--prompts 8] [--prompt-tokens 64] [--tokens 48]
                                   [--predictors none gate-lookahead learned path oracle] [--json OUT]

Held-out text of the bundled model (bench/train_tiny_moe.py's held-out files) is cut into prompts;
each predictor runs the same prompts greedily in its own process under ../shared/tools/in_memcg.sh
(whole-process memory limit = budget + runtime allowance, checkpoint evicted from the page cache;
expert loads are O_DIRECT reads in any case). The budget is the smallest --gpu-mem whose plan gives
every MoE layer `fraction` x E slots. Reported per predictor: stall seconds (compute waiting for a
load), loads, hit rate, prefetch precision/recall, recall@top_k at lookahead 1, decode tokens/s, and
whether the generated text is identical to demand loading's. `oracle` replays a trace recorded from
the same prompts first (the bound of what prediction can do). The table (ratios: demand-loading
stall / each predictor's stall) is appended to bench/RESULTS.md (bench/results.py) unless --no-record.

    python bench/bench_prefetch.py --prompts 1 --prompt-tokens 16 --tokens 4 --repeats 1 \
        --predictors none gate-lookahead --no-record                                        # quick check
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results import add_record_flag, record, wants_record  # noqa: E402

MEMCG = ROOT.parent / "shared" / "tools" / "in_memcg.sh"
MODEL = ROOT / "moe_engine" / "models" / "tiny-moe"
ALLOWANCE = 450 << 20


def heldout_prompts(n: int, tokens: int) -> list[list[int]]:
    """n prompts of `tokens` tokens, from n different held-out files (deterministic)."""
    from train_tiny_moe import corpus_files, read_text
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    _, held = corpus_files()
    out = []
    for path in held:
        ids = tok(read_text(path))["input_ids"]
        if len(ids) >= tokens * 2:
            out.append(ids[len(ids) // 2: len(ids) // 2 + tokens])     # mid-file: past the license headers
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} held-out files have {2 * tokens} tokens")


def budget_for(fraction: float, kv_tokens: int | None = None) -> int:
    """Smallest --gpu-mem (bytes, 64 KiB steps) whose plan gives each MoE layer round(fraction x E) slots.

    kv_tokens: the KV reserve the run will load with (--max-kv-tokens; None: the engine's default)."""
    import torch

    from moe_engine.checkpoint import Checkpoint
    from moe_engine.experts.plan import make_plan
    from moe_engine.runtime.build import non_expert_bytes
    ckpt = Checkpoint(MODEL)
    spec, dt = ckpt.spec, ckpt.dtype
    want = round(fraction * spec.moe.num_experts)
    nonexp = non_expert_bytes(ckpt, dt)
    lo, hi = 1 << 20, 1 << 30
    while hi - lo > 65536:
        mid = (lo + hi) // 2
        try:
            ok = min(make_plan(spec, torch.device("cpu"), dt, nonexp, mid, None, kv_tokens).quotas) >= want
        except Exception:
            ok = False
        lo, hi = (lo, mid) if ok else (mid, hi)
    ckpt.close()
    return hi


def one(args) -> None:
    """One measured run (inside the memory cgroup): prints a JSON line."""
    import moe_engine
    prompts = json.loads(Path(args.prompts_file).read_text())
    pred = None if args.predictor == "none" else args.predictor
    eng = moe_engine.load(progress=False, device="cpu", gpu_mem=args.budget, predictor=pred)
    outs, decode_s, decode_n = [], 0.0, 0
    import torch
    for p in prompts:
        ids = eng.generate(torch.tensor(p), max_new_tokens=args.tokens)
        outs.append(ids[len(p):].tolist())
        decode_s += eng.timings.decode_s
        decode_n += eng.timings.decode_tokens
    st = eng.stats()        # counters accumulate over the engine's life; latency is per call (summed above)
    pr = st.get("prediction", {})
    print(json.dumps({"predictor": args.predictor, "outputs": outs, "stall_s": st["io"]["stall_seconds"],
                      "stall_decode_s": st["io"]["stall_decode_seconds"],
                      "loads": st["io"]["loads"], "hit_rate": st["cache"]["hit_rate"],
                      "belady_hit_rate": st["optimal"]["belady_hit_rate"],
                      "precision": st["prefetch"]["precision"], "prefetch_recall": st["prefetch"]["recall"],
                      "issued": st["prefetch"]["issued"], "recall_k_d1": (pr.get("recall") or {}).get(
                          f"k{eng.spec.moe.top_k}_d1"), "lookahead": pr.get("current_lookahead"),
                      "decode_tok_s": decode_n / decode_s if decode_s else 0.0,
                      "slots_per_layer": eng.plan.quotas[0]}), flush=True)
    eng.close()


def launch(budget: int, predictor: str, prompts_file: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "one", "--budget", str(budget), "--predictor", predictor,
           "--prompts-file", prompts_file, "--tokens", str(tokens)]
    cmd = ["bash", str(MEMCG), str(budget + ALLOWANCE), "--evict", str(MODEL), "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{predictor} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def record_oracle(prompts: list[list[int]], tokens: int, out: Path) -> None:
    import torch

    import moe_engine
    from moe_engine.profiling.trace import save_trace
    from moe_engine.profiling.record import record_trace
    eng = moe_engine.load(progress=False, device="cpu")
    save_trace(out, record_trace(eng, [torch.tensor(p).tolist() for p in prompts], tokens, progress=False))
    eng.close()


def table(rows: list[dict]) -> str:
    """Markdown rows per predictor; the first row (demand loading) is the base of the ratios."""
    base = rows[0]
    lines = ["| predictor | stall s (runs) | stall vs demand | decode stall s | decode stall vs demand | loads | "
             "hit rate (Belady) | prefetch precision / recall | recall@2 d1 | lookahead | decode tok/s | same text |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cut = base["stall_s"] / r["stall_s"] if r["stall_s"] else float("inf")
        dcut = base["stall_decode_s"] / r["stall_decode_s"] if r["stall_decode_s"] else float("inf")
        rec = "-" if r["recall_k_d1"] is None else f"{r['recall_k_d1']:.3f}"
        name = r["predictor"].split(":")[0]
        lines.append(f"| {name} | {r['stall_s']:.3f} ({', '.join(map(str, r['stall_runs']))}) | "
                     f"{'1.00x' if r is base else f'{cut:.2f}x less'} | {r['stall_decode_s']:.3f} | "
                     f"{'1.00x' if r is base else f'{dcut:.2f}x less'} | {r['loads']} | {r['hit_rate']:.3f} "
                     f"({r['belady_hit_rate']:.3f}) | {r['precision']:.2f} / {r['prefetch_recall']:.2f} | {rec} | "
                     f"{r['lookahead']} | {r['decode_tok_s']:.0f} | {r['outputs'] == base['outputs']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    o = sub.add_parser("one")
    o.add_argument("--budget", type=int, required=True)
    o.add_argument("--predictor", required=True)
    o.add_argument("--prompts-file", required=True)
    o.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--predictors", nargs="+", default=["none", "gate-lookahead", "learned", "path", "oracle"])
    ap.add_argument("--repeats", type=int, default=3, help="runs per predictor; the median stall is reported")
    ap.add_argument("--json", default=None)
    add_record_flag(ap)
    args = ap.parse_args(argv)
    if args.cmd == "one":
        one(args)
        return 0
    prompts = heldout_prompts(args.prompts, args.prompt_tokens)
    budget = budget_for(args.fraction)
    tmp = Path(tempfile.mkdtemp())
    pf = tmp / "prompts.json"
    pf.write_text(json.dumps(prompts))
    preds = list(args.predictors)
    if "oracle" in preds:
        record_oracle(prompts, args.tokens, tmp / "oracle.npz")
        preds[preds.index("oracle")] = f"oracle:{tmp / 'oracle.npz'}"
    rows = []
    for p in preds:
        runs = sorted((launch(budget, p, str(pf), args.tokens) for _ in range(args.repeats)),
                      key=lambda r: r["stall_s"])
        r = runs[len(runs) // 2]
        r["stall_runs"] = [round(x["stall_s"], 4) for x in runs]
        rows.append(r)
    base = rows[0]
    setup = (f"bundled model, budget {budget} bytes ({base['slots_per_layer']} slots per layer of 16 experts), "
             f"{args.prompts} held-out prompts x {args.prompt_tokens} tokens, {args.tokens} new tokens each, "
             f"median of {args.repeats} runs")
    text = table(rows)
    print(setup + "\n")
    print(text)
    compare = "stall of demand loading / stall with each predictor: " + ", ".join(
        f"{r['predictor'].split(':')[0]} {base['stall_s'] / r['stall_s']:.2f}x" if r["stall_s"] else
        f"{r['predictor'].split(':')[0]} no stall" for r in rows[1:])
    print(compare)
    if wants_record(args):
        record("prefetching vs demand loading, bundled model, cache at a fraction of the experts", text, compare,
               setup + ". Each predictor in its own process under in_memcg.sh (budget + runtime allowance).")
    if args.json:
        Path(args.json).write_text(json.dumps({"budget": budget, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
