"""Disk-tier offloading benchmark: moe-engine vs transformers + accelerate disk offload, same memory limit.

Every memory-limited run is a separate process started under ../shared/tools/in_memcg.sh, which
limits the whole process memory (page cache included) and evicts the checkpoint from the page
cache first, so "disk" reads are disk reads for both sides.

    python bench/bench_offload.py all MODEL_DIR [--fractions 0.25 0.5] [--tokens 128] [--no-record]
    python bench/bench_offload.py quant MODEL_DIR [--quants none int8 int4]   (issue 6: same budget, quantized)
    python bench/bench_offload.py all moe_engine/models/tiny-moe --tokens 4 --offload-root /tmp/off --no-record
                                                                             (a quick check of the pipeline)

runs, for each expert-budget fraction: the engine (random routing), the engine with routing
replayed from the real GPT-OSS traces (bench_hooks.replay_routing), and accelerate; plus, unlimited:
the engine with every expert in RAM (the compute bound) and a cold direct-IO read of the
checkpoint (the bandwidth). The bound of the issue is 1 / max(Belady loads per token x expert
bytes / direct-IO bandwidth, all-in-RAM seconds per token). `one ...` is one measured run.

`all` prints one markdown table: at each budget the engine, the engine on trace routing and
accelerate side by side, with the all-in-RAM engine as the first row, and the ratios engine /
accelerate and run / all-in-RAM. `all` and `quant` append their table to bench/RESULTS.md
(bench/results.py) unless given --no-record. (The old docstring offered `--record`, which no
version of this script accepted; recording is now the default, as in every bench/ script.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_hooks import StepLog, replay_routing  # noqa: E402
from results import add_record_flag, record, wants_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEMCG = ROOT.parent / "shared" / "tools" / "in_memcg.sh"
TRACE = ROOT.parent / "shared" / "data" / "routing" / "gptoss20b_test.npz"
RUNTIME_ALLOWANCE = 450 << 20     # python + torch + transformers + allocator slack, same for both sides


def prompt_ids(n: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab, (1, n), generator=g)


# ---- one measured run (in its own process) ------------------------------------------------------
def run_engine(args) -> dict:
    import moe_engine
    from moe_engine.experts.tracker import belady_loads
    eng = moe_engine.load(args.model, gpu_mem=args.gpu_mem, policy=args.policy, progress=False,
                          predictor=None if args.predictor == "none" else args.predictor,
                          quant=args.quant, quant_cache=args.quant_cache)
    if args.trace:
        replay_routing(eng, Path(args.trace))
    ids = prompt_ids(args.prompt_len, eng.spec.vocab_size)
    steps = eng.observers.add(StepLog(eng.spec.num_layers))
    at_first_token = {}

    class AfterPrefill:                       # a transformers-style streamer: notes the loads made by prefill
        def put(self, value):
            if "loads" not in at_first_token and len(at_first_token.setdefault("puts", [])) == 1:
                at_first_token["loads"] = eng.stats()["io"]["loads"]
            at_first_token.setdefault("puts", []).append(1)

        def end(self):
            pass
    eng.generate(ids, max_new_tokens=args.tokens, eos_token_id=[], streamer=AfterPrefill())
    stats = eng.stats()
    out = {"mode": "engine", "decode_tokens_per_s": stats["latency"]["decode_tokens_per_s"],
           "prefill_s": eng.timings.prefill_s, "stats": stats}
    if eng.experts.evicts:                   # Belady's decode loads (step 0 is the prefill)
        log, quotas = steps.log, eng.experts.quotas
        # Belady over every step, minus the prefill's loads (each of its experts once, from an empty cache):
        # decode then starts from what the prefill left resident, as the engine's decode does
        out["belady_decode_loads"] = sum(belady_loads(log[i], quotas[i]) - len(set(log[i][0]))
                                         for i in range(len(log)) if log[i])
        out["decode_loads"] = stats["io"]["loads"] - at_first_token.get("loads", 0)
        out["expert_bytes"] = eng.plan.expert_bytes
        out["capacity_experts"] = eng.experts.capacity_experts
    eng.close()
    return out


def run_accelerate(args) -> dict:
    from transformers import AutoModelForCausalLM
    offload = Path(args.offload_folder)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, device_map="auto", offload_folder=str(offload),
        max_memory={"cpu": args.weight_budget}, offload_state_dict=True)
    ids = prompt_ids(args.prompt_len, model.config.vocab_size)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.tokens + 1, min_new_tokens=args.tokens + 1,
                             do_sample=False, eos_token_id=None)
        t2 = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    prefill = t1 - t0
    return {"mode": "accelerate", "decode_tokens_per_s": (n - 1) / max(t2 - t1 - prefill, 1e-9),
            "prefill_s": prefill, "new_tokens": n}


def run_ram(args) -> dict:
    import moe_engine
    eng = moe_engine.load(args.model, progress=False)
    ids = prompt_ids(args.prompt_len, eng.spec.vocab_size)
    eng.generate(ids, max_new_tokens=8, eos_token_id=[])            # warm-up
    eng.generate(ids, max_new_tokens=args.tokens, eos_token_id=[])
    tps = eng.stats()["latency"]["decode_tokens_per_s"]
    eng.close()
    return {"mode": "ram", "decode_tokens_per_s": tps}


def run_io(args) -> dict:
    """Cold direct-IO read of the whole checkpoint with the engine's reader (after in_memcg's evict)."""
    from moe_engine import _ops
    files = sorted(Path(args.model).glob("*.safetensors"))
    reader = _ops.DirectReader(num_threads=args.io_threads)
    buf = _ops.alloc_aligned(64 << 20)
    total, t0 = 0, time.perf_counter()
    for f in files:
        size = f.stat().st_size
        for off in range(0, size, buf.numel()):
            n = min(buf.numel(), size - off)
            reader.read([_ops.ReadRange(str(f), off, n, buf)])
            total += n
    seconds = time.perf_counter() - t0
    reader.close()
    return {"mode": "io", "bytes": total, "seconds": seconds, "bytes_per_s": total / seconds,
            "backend": "c" if _ops.HAS_C_EXT else "torch"}


def one(args) -> None:
    fn = {"engine": run_engine, "accelerate": run_accelerate, "ram": run_ram, "io": run_io}[args.mode]
    print("RESULT " + json.dumps(fn(args)), flush=True)


# ---- orchestration ------------------------------------------------------------------------------
def launch(limit: int | None, model: str, argv: list[str], evict: list[str] = ()) -> dict:
    """`bench_offload.py one --model MODEL ARGV` in its own process, under the limit with the model evicted."""
    return launch_cmd(limit, [sys.executable, __file__, "one", "--model", model, *argv], [model, *evict])


def launch_cmd(limit: int | None, cmd: list[str], evict: list[str] = ()) -> dict:
    """Run `cmd` in its own process; with a limit, under in_memcg.sh with `evict` dropped from the page cache first.
    Returns the JSON of its `RESULT {...}` stdout line, with memcg_peak and limit added, or {"error", "rc"}.
    (bench_llamacpp.py --mode memcg runs its sides through this too.)"""
    if limit is not None:
        ev = [x for p in evict for x in ("--evict", p)]
        cmd = ["bash", str(MEMCG), str(limit), *ev, "--", *cmd]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)   # a failed run is reported, not raised
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "rc": proc.returncode}
    out = json.loads(line[len("RESULT "):])
    peak = [x for x in proc.stderr.splitlines() if x.startswith("peak bytes in group")]
    if peak:
        out["memcg_peak"] = int(peak[-1].split()[4])
    out["limit"] = limit
    return out


def fraction_budget(full, frac: float) -> tuple[int, int]:
    """(expert slots, --gpu-mem) giving the engine `frac` of all experts, from `full`, the plan with every expert
    resident: its fixed bytes (weights, KV reserve, IO buffers) plus that many slots."""
    slots = round(full.total_experts * frac)
    return slots, full.device_bytes - full.device_slots * full.slot_bytes + slots * full.slot_bytes


def sizes(model: str) -> tuple[int, int, int]:
    """(expert bytes total, non-expert bytes, expert bytes each) in the checkpoint dtype."""
    from moe_engine.checkpoint import Checkpoint
    from moe_engine.runtime.build import non_expert_bytes
    ckpt = Checkpoint(model)
    each = ckpt.expert_nbytes()
    total = each * len(ckpt.spec.moe_layers) * ckpt.spec.moe.num_experts
    rest = non_expert_bytes(ckpt, ckpt.dtype)
    ckpt.close()
    return total, rest, each


def run_all(args) -> None:
    from moe_engine.checkpoint import Checkpoint
    from moe_engine.experts.plan import make_plan
    experts_total, rest, each = sizes(args.model)
    common = ["--tokens", str(args.tokens), "--prompt-len", str(args.prompt_len)]
    io = launch(4 << 30, args.model, ["--mode", "io", "--io-threads", "2"])
    ram = launch(None, args.model, ["--mode", "ram", *common])
    rows = []
    ckpt = Checkpoint(args.model)
    full = make_plan(ckpt.spec, torch.device("cpu"), ckpt.dtype, rest, None, None)
    for frac in args.fractions:
        slots, gpu_mem = fraction_budget(full, frac)                   # the same expert count for both sides
        expert_budget = slots * each
        limit = gpu_mem + RUNTIME_ALLOWANCE
        budget = ["--gpu-mem", str(gpu_mem), "--policy", args.policy, "--predictor", args.predictor]
        row = {"fraction": frac, "gpu_mem": gpu_mem, "limit": limit, "weight_budget": rest + expert_budget}
        row["engine"] = launch(limit, args.model, ["--mode", "engine", *budget, *common])
        row["engine_trace"] = launch(limit, args.model, ["--mode", "engine", *budget, *common, "--trace", str(TRACE)])
        if not args.skip_accelerate:
            folder = Path(args.offload_root) / f"offload-{frac}"
            row["accelerate"] = launch(limit, args.model, ["--mode", "accelerate", "--weight-budget",
                                                           str(rest + expert_budget), "--offload-folder", str(folder),
                                                           *common], evict=[str(folder)] if folder.exists() else [])
        rows.append(row)
    ckpt.close()
    report = {"torch_threads": torch.get_num_threads(), "tokens": args.tokens, "date": datetime.date.today().isoformat(), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "model": args.model, "expert_bytes_total": experts_total, "non_expert_bytes": rest,
              "expert_bytes_each": each, "io": io, "ram": ram, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    text = table(report)
    print(text)
    print(comparison(report))
    if wants_record(args):
        record(f"disk-tier offloading: moe-engine vs transformers + accelerate vs all in RAM, {Path(args.model).name}",
               text, comparison(report), ALL_NOTES.format(io=report["io"].get("bytes_per_s", 0) / 1e9,
                                                          ram=report["ram"].get("decode_tokens_per_s", 0),
                                                          tokens=args.tokens, prompt=args.prompt_len,
                                                          policy=args.policy, predictor=args.predictor))


ALL_NOTES = """Checkpoint evicted from the page cache before each run; each memory-limited run is its own process
under ../shared/tools/in_memcg.sh (whole-process memory incl. page cache limited to the `limit` column).
The engine gets `--gpu-mem` = non-expert weights + KV reserve + IO buffers + the budget's expert slots;
accelerate gets `max_memory={{"cpu": non-expert + the same expert bytes}}` and an offload folder for the
rest. {prompt}-token random prompt, {tokens} greedy tokens, decode only; policy {policy}, predictor
{predictor}. "engine_trace": routing replaced by the GPT-OSS-20B test trace folded onto the model's
experts. Bound = 1 / max(Belady decode loads x expert bytes / direct-IO bandwidth, all-in-RAM s/token);
this run: direct-IO cold read {io:.2f} GB/s, all-in-RAM engine decode {ram:.2f} tok/s."""


def run_quant(args) -> None:
    """Same --gpu-mem and memory limit, experts stored bf16 / int8 / int4: slots held and decode tokens/s."""
    from moe_engine.checkpoint import Checkpoint
    from moe_engine.experts.plan import make_plan
    from moe_engine.quant.prepare import quantized_experts
    from moe_engine.quant.settings import parse_quant
    _, rest, _ = sizes(args.model)
    ckpt = Checkpoint(args.model)
    entries = {}
    for q in args.quants:                       # built once, outside the memory limit (the cache is the disk tier)
        if q != "none":
            entries[q] = str(quantized_experts(ckpt, parse_quant(q), args.quant_cache).entry / "experts.bin")
    full = make_plan(ckpt.spec, torch.device("cpu"), ckpt.dtype, rest, None, None)
    ckpt.close()
    common = ["--tokens", str(args.tokens), "--prompt-len", str(args.prompt_len), "--policy", args.policy,
              "--predictor", args.predictor, "--quant-cache", args.quant_cache]
    rows = []
    for frac in args.fractions:
        _, gpu_mem = fraction_budget(full, frac)
        limit = gpu_mem + RUNTIME_ALLOWANCE
        for q in args.quants:
            run = launch(limit, args.model, ["--mode", "engine", "--gpu-mem", str(gpu_mem), "--quant", q, *common],
                         evict=[entries[q]] if q in entries else [])
            rows.append({"fraction": frac, "gpu_mem": gpu_mem, "limit": limit, "quant": q, "run": run})
    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "torch_threads": torch.get_num_threads(), "tokens": args.tokens, "model": args.model, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    text = quant_table(rows, args.tokens)
    print(text)
    if wants_record(args):
        record(f"disk-tier offloading, quantized experts at the same --gpu-mem, {Path(args.model).name}", text,
               "decode tok/s of each quantization / bf16 at the same budget: the `vs bf16` column",
               f"{args.tokens} greedy tokens after a {args.prompt_len}-token random prompt; each run in its own "
               f"process under in_memcg.sh at the `memcg limit`; policy {args.policy}, predictor {args.predictor}.")


def quant_table(rows: list[dict], tokens: int) -> str:
    lines = ["| --gpu-mem | memcg limit | experts | slots | decode tok/s | vs bf16 | loads/token | memcg peak |",
             "|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        run = r["run"]
        if "error" in run:
            lines.append(f"| {r['gpu_mem'] / 2**20:.0f} MiB | {r['limit'] / 2**30:.2f} GiB | {r['quant']} | "
                         f"error: {run['error'][-200:]!r} | | | | |".replace("\n", " "))
            continue
        tps = run["decode_tokens_per_s"]
        base.setdefault(r["fraction"], tps)
        slots = run["stats"]["cache"]["capacity_experts"]              # all resident: no cache, no loads
        loads = run.get("decode_loads", 0) / tokens
        lines.append(f"| {r['gpu_mem'] / 2**20:.0f} MiB | {r['limit'] / 2**30:.2f} GiB | {r['quant']} | "
                     f"{slots} | {tps:.2f} | {tps / base[r['fraction']]:.2f}x | "
                     f"{loads:.2f} | {run.get('memcg_peak', 0) / 2**30:.2f} GiB |")
    return "\n".join(lines)


def bound(row_run: dict, io_bps: float, ram_tps: float, tokens: int) -> float:
    io_s = row_run["belady_decode_loads"] * row_run["expert_bytes"] / io_bps / tokens
    return 1 / max(io_s, 1 / ram_tps)


def table(rep: dict) -> str:
    """One row per run: the all-in-RAM engine first, then at each budget engine, engine on trace routing, accelerate."""
    io_bps, ram_tps = rep["io"].get("bytes_per_s"), rep["ram"].get("decode_tokens_per_s")
    tok = rep.get("tokens", 128)
    head = ("| budget (experts) | limit | run | decode tok/s | loads/token | Belady loads/token | bound tok/s | "
            "of bound | vs accelerate | vs all-in-RAM | memcg peak |")
    lines = [head, "|---" * 11 + "|"]
    ram_cell = f"{ram_tps:.2f}" if ram_tps else "error"
    lines.append(f"| all (100%) | none | all-in-RAM (engine) | {ram_cell} | 0.00 | 0.00 | {ram_cell} | | | 1.00x | |")
    for r in rep["rows"]:
        acc = r.get("accelerate", {}).get("decode_tokens_per_s")
        for name in ("engine", "engine_trace", "accelerate"):
            run = r.get(name)
            if not run:
                continue                                   # --skip-accelerate
            cells = [f"{r['fraction']:.0%}", f"{r['limit'] / 2**30:.2f} GiB", name]
            if "error" in run:
                lines.append("| " + " | ".join(cells + ["error"] + [""] * 7) + " |")
                continue
            tps = run["decode_tokens_per_s"]
            cells.append(f"{tps:.2f}")
            if name.startswith("engine") and io_bps and ram_tps:
                b = bound(run, io_bps, ram_tps, tok)
                cells += [f"{run['decode_loads'] / tok:.2f}", f"{run['belady_decode_loads'] / tok:.2f}", f"{b:.2f}",
                          f"{tps / b:.0%}", f"**{tps / acc:.2f}x**" if acc else ""]
            else:
                cells += [""] * 5
            cells += [f"{tps / ram_tps:.2f}x" if ram_tps else "", f"{run.get('memcg_peak', 0) / 2**30:.2f} GiB"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison(rep: dict) -> str:
    """engine / accelerate and engine / all-in-RAM decode tok/s at each budget."""
    ram = rep["ram"].get("decode_tokens_per_s")
    parts = []
    for r in rep["rows"]:
        eng, acc = (r.get(k, {}).get("decode_tokens_per_s") for k in ("engine", "accelerate"))
        if eng:
            vs = [f"engine / accelerate {eng / acc:.2f}x" if acc else "accelerate not run or failed",
                  f"engine / all-in-RAM {eng / ram:.2f}x" if ram else "all-in-RAM failed"]
            parts.append(f"budget {r['fraction']:.0%}: " + ", ".join(vs))
    return "; ".join(parts) or "no engine run succeeded"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("all")
    a.add_argument("model")
    a.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    a.add_argument("--policy", default="default")
    a.add_argument("--predictor", default="gate-lookahead")
    a.add_argument("--offload-root", default="/work/bench_data")
    a.add_argument("--skip-accelerate", action="store_true")
    a.add_argument("--json")
    o = sub.add_parser("one")
    o.add_argument("--model", required=True)
    o.add_argument("--mode", choices=["engine", "accelerate", "ram", "io"], required=True)
    o.add_argument("--gpu-mem", type=int)
    o.add_argument("--policy", default="default")
    o.add_argument("--predictor", default="gate-lookahead")
    o.add_argument("--trace")
    o.add_argument("--weight-budget", type=int)
    o.add_argument("--offload-folder")
    o.add_argument("--io-threads", type=int, default=2)
    o.add_argument("--quant", default=None)
    o.add_argument("--quant-cache", default=None)
    qa = sub.add_parser("quant", help="same --gpu-mem and limit, experts bf16 vs quantized")
    qa.add_argument("model")
    qa.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    qa.add_argument("--quants", nargs="+", default=["none", "int8", "int4"])
    qa.add_argument("--quant-cache", default="/work/bench_data/quant-cache")
    qa.add_argument("--policy", default="default")
    qa.add_argument("--predictor", default="gate-lookahead")
    qa.add_argument("--json")
    for q in (a, qa):
        add_record_flag(q)
    for q in (a, o, qa):
        q.add_argument("--tokens", type=int, default=128)
        q.add_argument("--prompt-len", type=int, default=16)
    args = p.parse_args(argv)
    {"one": one, "all": run_all, "quant": run_quant}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
