"""Simulated vs measured decode tokens/s of the disk-tier benchmark (issue 8: agree within 20% at >= 3 budgets).

    python bench/bench_simulate.py run MODEL_DIR --out DIR [--fractions 0.25 0.375 0.5 0.75] [--tokens 128]
                                   [--predictor none] [--policy default] [--trace-routing]
    python bench/bench_simulate.py compare DIR/measured.json [--hardware this-cpu-disk] [--policy ...]

`run` measures, each in its own process under ../shared/tools/in_memcg.sh like bench/bench_offload.py
(same --gpu-mem and memory limit per budget, checkpoint evicted from the page cache first): a cold
direct-IO read of the checkpoint (link bandwidth), all-in-RAM decode (the compute rate), and the engine at
each expert budget with its routing recorded (RoutingRecorder: every token fed, prompt rows marked), so
the simulator replays exactly the routing of the measured run. `--trace-routing` replays the GPT-OSS test
routing folded onto the model's experts (bench_offload's hook) instead of the random model's own.

`compare` simulates each recorded run with the engine's policy objects at the run's per-layer quotas and
prints simulated vs measured side by side with their ratio. Hardware "measured": link = the measured
direct-IO bandwidth; compute rate solved so that the simulator's compute bound equals the measured
all-in-RAM decode tokens/s (overheads from the this-cpu-disk preset). The preset as it stands is
printed too. Predictors that need hidden states (gate-lookahead, learned) cannot be replayed from a
trace: measure with --predictor none (the default here) for a like-for-like comparison.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_offload  # noqa: E402
from engine_hooks import replay_routing  # noqa: E402
from results import add_record_flag, record, wants_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_one(args) -> dict:
    """One engine run at one budget, routing recorded to args.save_trace (runs inside the memcg)."""
    import moe_engine
    from moe_engine.profiling.record import RoutingRecorder
    from moe_engine.profiling.trace import save_trace
    eng = moe_engine.load(args.model, gpu_mem=args.gpu_mem, policy=args.policy, progress=False,
                          predictor=None if args.predictor == "none" else args.predictor)
    spec = eng.spec
    if args.trace_routing:
        replay_routing(eng, bench_offload.TRACE)
    rec = eng.observers.add(RoutingRecorder(spec.moe_layers))
    ids = bench_offload.prompt_ids(args.prompt_len, spec.vocab_size)
    puts = []

    class AfterPrefill:                   # a transformers-style streamer: put(prompt), put(first token), ...
        def put(self, value):
            puts.append(eng.stats()["io"]["loads"] if len(puts) < 2 else 0)

        def end(self):
            pass
    eng.generate(ids, max_new_tokens=args.tokens, eos_token_id=[], streamer=AfterPrefill())
    st = eng.stats()
    save_trace(args.save_trace, rec.trace([args.prompt_len], spec.moe.num_experts))
    out = {"decode_tokens_per_s": st["latency"]["decode_tokens_per_s"], "loads": st["io"]["loads"],
           "decode_loads": st["io"]["loads"] - (puts[1] if len(puts) > 1 else 0),
           "hit_rate": st["cache"]["hit_rate"], "stall_seconds": st["io"]["stall_seconds"],
           "quotas": list(eng.experts.quotas), "trace": args.save_trace}
    eng.close()
    return out


def run_all(args) -> None:
    import torch

    from moe_engine.checkpoint import Checkpoint
    from moe_engine.experts.plan import make_plan
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, rest, each = bench_offload.sizes(args.model)
    common = ["--tokens", str(args.tokens), "--prompt-len", str(args.prompt_len)]
    report = {"model": args.model, "tokens": args.tokens, "predictor": args.predictor, "policy": args.policy,
              "expert_bytes": each, "trace_routing": args.trace_routing,
              "io": bench_offload.launch(4 << 30, args.model, ["--mode", "io", "--io-threads", "2"]),
              "ram": bench_offload.launch(None, args.model, ["--mode", "ram", *common]), "rows": []}
    ckpt = Checkpoint(args.model)
    full = make_plan(ckpt.spec, torch.device("cpu"), ckpt.dtype, rest, None, None)
    ckpt.close()
    for frac in args.fractions:
        slots, gpu_mem = bench_offload.fraction_budget(full, frac)
        limit = gpu_mem + bench_offload.RUNTIME_ALLOWANCE
        argv = [sys.executable, __file__, "one", "--model", args.model, "--gpu-mem", str(gpu_mem), "--policy",
                args.policy, "--predictor", args.predictor, "--save-trace", str(out / f"trace-{frac}.npz"), *common]
        if args.trace_routing:
            argv.append("--trace-routing")
        cmd = ["bash", str(bench_offload.MEMCG), str(limit), "--evict", args.model, "--", *argv]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        run = json.loads(line[len("RESULT "):]) if line else {"error": (proc.stderr or proc.stdout)[-2000:]}
        report["rows"].append({"fraction": frac, "gpu_mem": gpu_mem, "limit": limit, "slots": slots, "run": run})
    path = out / "measured.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}; next: python bench/bench_simulate.py compare {path}", file=sys.stderr)


def calibrated(preset_name: str, shape, io_bps: float, ram_tps: float):
    """The preset with the measured link bandwidth and the compute rate that reproduces all-in-RAM tokens/s."""
    from moe_engine.profiling.hardware import preset
    hw = preset(preset_name)
    fixed = shape.num_layers * (hw.layer_overhead_s + shape.top_k * hw.expert_overhead_s) + hw.token_overhead_s
    streamed = shape.num_layers * (shape.layer_dense_bytes + shape.top_k * shape.expert_bytes) + shape.lm_head_bytes
    rate = streamed / max(1.0 / ram_tps - fixed, 1e-6)
    return hw.replace(name="measured", link_bytes_per_s=io_bps, compute_bytes_per_s=rate)


def compare(args) -> None:
    lines = _compare_lines(args)
    print("\n".join(lines))
    if wants_record(args):
        ratios = [float(x.split("**")[1]) for x in lines if x.startswith("|") and "**" in x and "| measured |" in x]
        record("Simulator vs measured decode tokens/s, disk tier (moe-engine simulate)", "\n".join(lines[1:]),
               comparison="sim / measured on the calibrated ('measured') hardware: " + ", ".join(f"{r:.2f}" for r in ratios),
               notes=lines[0])


def _compare_lines(args) -> list[str]:
    from moe_engine.profiling.hardware import preset
    from moe_engine.profiling.shapes import shape_from_config
    from moe_engine.profiling.simulate import Simulator
    from moe_engine.profiling.trace import load_trace
    rep = json.loads(Path(args.measured).read_text())
    shape = shape_from_config(rep["model"])
    hws = [calibrated(args.hardware, shape, rep["io"]["bytes_per_s"], rep["ram"]["decode_tokens_per_s"]),
           preset(args.hardware)]
    out = []
    out.append(f"model {rep['model']}: {shape.expert_bytes / 2**20:.1f} MiB per expert; direct-IO "
          f"{rep['io']['bytes_per_s'] / 1e9:.2f} GB/s, all-in-RAM {rep['ram']['decode_tokens_per_s']:.2f} tok/s; "
          f"predictor {rep['predictor']}, policy {args.policy or rep['policy']}")
    out.append("| budget | slots/layer | hardware | measured tok/s | simulated tok/s | sim / measured | measured loads "
          "| simulated loads | measured decode loads | simulated decode loads | measured hit rate | simulated hit rate | measured stall s | simulated stall s |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rep["rows"]:
        run = row["run"]
        if "error" in run:
            out.append(f"| {row['fraction']:.1%} | | | error: {run['error'][-200:]!r} |")
            continue
        trace = load_trace(run["trace"], shape.num_experts)
        for hw in hws:
            sim = Simulator(trace, shape, hw, run["quotas"], args.policy or rep["policy"], None).run().to_dict()
            ratio = sim["tokens_per_s"] / run["decode_tokens_per_s"]
            out.append(f"| {row['fraction']:.1%} | {run['quotas'][0]} | {hw.name} | {run['decode_tokens_per_s']:.2f} | "
                  f"{sim['tokens_per_s']:.2f} | **{ratio:.2f}** | {run['loads']} | {sim['loads']} | "
                  f"{run.get('decode_loads', '')} | {sim['decode_loads']} | "
                  f"{run['hit_rate']:.3f} | {sim['hit_rate']:.3f} | {run['stall_seconds']:.2f} | "
                  f"{sim['stall_seconds']:.2f} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--out", required=True)
    r.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.375, 0.5, 0.75])
    o = sub.add_parser("one")
    o.add_argument("--model", required=True)
    o.add_argument("--gpu-mem", type=int, required=True)
    o.add_argument("--save-trace", required=True)
    for q in (r, o):
        q.add_argument("--tokens", type=int, default=128)
        q.add_argument("--prompt-len", type=int, default=16)
        q.add_argument("--policy", default="default")
        q.add_argument("--predictor", default="none")
        q.add_argument("--trace-routing", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("measured")
    c.add_argument("--hardware", default="this-cpu-disk")
    c.add_argument("--policy", default=None, help="default: the policy of the measured run")
    add_record_flag(c)
    args = p.parse_args(argv)
    if args.cmd == "one":
        print("RESULT " + json.dumps(run_one(args)), flush=True)
    elif args.cmd == "run":
        run_all(args)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
