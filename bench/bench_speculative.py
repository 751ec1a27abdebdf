"""Speculative decoding in the engine (issue 23): decode tokens/s and expert loads per generated token with each
draft method against none, same prompts; and, all in RAM, the engine against llama.cpp with prompt lookup.

    python bench/bench_speculative.py engine [--fraction 0.25] [--repeats 2] [--tokens 64] [--no-record]
    python bench/bench_speculative.py llamacpp [--engine-model /work/bench_data/mixtral-1.4g] [--repeats 3]
    python bench/bench_speculative.py engine --prompts 1 --tokens 8 --repeats 1 --no-record      (a quick check)

engine: the bundled model (tiny-moe, trained on Python's standard library), its expert cache at --fraction of
all experts, each run its own process under ../shared/tools/in_memcg.sh (memory limit = the engine's budget + a
runtime allowance, the checkpoint evicted from the page cache first), runs interleaved run by run over the
methods (none, ngram, resident). Two workloads, greedy, batch 1, --tokens new tokens per prompt:
  code   completion of held-out standard-library files (every 20th *.py file of the stdlib sorted by path, as the
         model card holds out), the first 192 tokens of each as the prompt: the continuation reuses the prompt's
         identifiers
  edit   "rewrite this function" prompts: a held-out function, then a comment announcing a new version of it and
         its first line renamed (def new_NAME(...)): the answer mostly copies the prompt's body (prompt lookup's
         best case, as in code-editing assistants)
Reported per method: decode tok/s (median of runs), expert loads per generated token (decode only: loads after
the first token), acceptance (kept / drafted), generated tokens per verify step, whether the tokens equal the
run without speculation, and the ratio to none. draft_model's draft is a 2-layer model trained the same way on the
same corpus (same tokenizer, ~2 MB of weights, every expert resident outside the budget):
    python bench/train_tiny_moe.py --out /work/bench_data/tiny-moe-draft --steps 1500 --layers 2 --hidden 128 \
        --heads 4 --kv-heads 1 --experts 4 --ffn 128 --eval-every 1500 --eval-tokens 8192

llamacpp: the Mixtral-shaped bench checkpoint (random weights) all in RAM, bf16, one process: llama-cpp-python's
Llama.generate (greedy, top_k=1) with and without LlamaPromptLookupDecoding(num_pred_tokens=K), and the engine's
generate with and without {"method": "ngram", "num_speculative_tokens": K}, interleaved run by run, the same
prompt ids on both sides (a random block of 48 ids repeated: lookup has something to find). llama.cpp's verify
steps are counted as its eval() calls after the prompt. Random weights make acceptance an accident of the
repetition, so both sides report accepted tokens per verify step beside the speed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offload import RUNTIME_ALLOWANCE, launch_cmd  # noqa: E402
from results import add_record_flag, record, wants_record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "moe_engine" / "models" / "tiny-moe"
DRAFT = Path("/work/bench_data/tiny-moe-draft")   # bench/train_tiny_moe.py --out DRAFT (command in the docstring)
METHODS = {"none": None, "ngram": {"method": "ngram", "num_speculative_tokens": 4},
           "resident": {"method": "resident", "num_speculative_tokens": 3},
           "draft_model": {"method": "draft_model", "model": str(DRAFT), "num_speculative_tokens": 4}}


# ---- prompts -------------------------------------------------------------------------------------------------
def held_out_files() -> list[Path]:
    """The model card's held-out files: every 20th *.py of the stdlib (no site-packages, tests, idlelib), sorted."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if not any(part in ("site-packages", "test", "tests", "idlelib")
                                                          for part in p.relative_to(lib).parts))
    return files[::20]


def functions(text: str, lo: int = 300, hi: int = 900) -> list[str]:
    """Top-level or method functions of `text` between lo and hi characters long."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("def ") and line.rstrip().endswith(":"):
            indent = len(line) - len(line.lstrip())
            body = [line]
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            src = "\n".join(body).rstrip()
            if lo <= len(src) <= hi and '"""' not in src:
                out.append(src)
    return out


def workload(name: str, n: int, tok) -> list[list[int]]:
    prompts = []
    for f in held_out_files():
        text = f.read_text(errors="replace")
        if name == "code":
            ids = tok.encode(text)
            if len(ids) >= 400:
                prompts.append(ids[:192])
        else:
            for fn in functions(text)[:1]:
                first = fn.splitlines()[0].replace("def ", "def new_", 1)
                prompts.append(tok.encode(f"{fn}\n\n# A new version of the function above:\n{first}\n"))
        if len(prompts) >= n:
            break
    return prompts


# ---- one measured run (its own process) ----------------------------------------------------------------------
def run_engine(args) -> dict:
    import moe_engine
    eng = moe_engine.load(args.model, gpu_mem=args.gpu_mem, progress=False)
    spec = METHODS[args.method]
    prompts = workload(args.workload, args.prompts, eng.tokenizer)
    eng.generate(eng.decode(prompts[0][:32]), max_new_tokens=4)                 # warm-up (not timed)
    decode_s = tokens = loads = drafted = kept = verify = 0
    outputs = []
    for ids in prompts:
        seen = []

        class AfterPrefill:                     # notes the loads made up to the first token
            def put(self, value):
                seen.append(eng.stats()["io"]["loads"])

            def end(self):
                pass
        import torch
        kw = {} if spec is None else {"speculative_config": spec}
        out = eng.generate(torch.tensor([ids]), max_new_tokens=args.tokens, eos_token_id=[], streamer=AfterPrefill(),
                           **kw)
        new = out[0, len(ids):].tolist()
        outputs.append(new)
        t = eng.timings
        decode_s += t.decode_s
        tokens += len(new) - 1
        loads += eng.stats()["io"]["loads"] - seen[1]
        if spec is not None:
            s = eng.stats()["speculation"]
            drafted, kept, verify = drafted + s["drafted"], kept + s["accepted"], verify + s["verify_steps"]
    stats = eng.stats()
    eng.close()
    return {"method": args.method, "workload": args.workload, "decode_tok_s": tokens / decode_s,
            "loads_per_token": loads / tokens, "tokens": tokens, "drafted": drafted, "accepted": kept,
            "verify_steps": verify, "outputs": outputs, "capacity_experts": stats["cache"].get("capacity_experts")}


def engine_budget(fraction: float) -> tuple[int, int]:
    """(--gpu-mem bytes, total experts) giving the bundled model's cache `fraction` of its experts."""
    import torch

    from moe_engine.checkpoint import Checkpoint
    from moe_engine.experts.plan import make_plan
    from moe_engine.runtime.build import non_expert_bytes
    ckpt = Checkpoint(BUNDLED)
    full = make_plan(ckpt.spec, torch.device("cpu"), ckpt.dtype, non_expert_bytes(ckpt, ckpt.dtype), None, None)
    slots = round(full.total_experts * fraction)
    ckpt.close()
    return full.device_bytes - full.device_slots * full.slot_bytes + slots * full.slot_bytes, full.total_experts


def run_engine_table(args) -> None:
    gpu_mem, total = engine_budget(args.fraction)
    limit = gpu_mem + RUNTIME_ALLOWANCE
    rows: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for wl in args.workloads:
            for method in args.methods:
                cmd = [sys.executable, __file__, "one", "--method", method, "--workload", wl, "--gpu-mem",
                       str(gpu_mem), "--tokens", str(args.tokens), "--prompts", str(args.prompts)]
                res = launch_cmd(limit, cmd, [str(BUNDLED)])
                if "error" in res:
                    raise SystemExit(f"{method}/{wl} failed (rc {res['rc']}):\n{res['error']}")
                rows.setdefault((wl, method), []).append(res)
                print(f"rep {rep} {wl:5} {method:9} {res['decode_tok_s']:.1f} tok/s, "
                      f"{res['loads_per_token']:.2f} loads/token", file=sys.stderr, flush=True)
    lines = ["| workload | method | decode tok/s (runs) | vs none | loads / token | vs none | acceptance | "
             "tokens / verify step | same tokens as none |", "|---|---|---|---|---|---|---|---|---|"]
    for wl in args.workloads:
        base = rows[(wl, "none")]
        base_tps = statistics.median(r["decode_tok_s"] for r in base)
        base_loads = statistics.median(r["loads_per_token"] for r in base)
        for method in args.methods:
            rs = rows[(wl, method)]
            tps = statistics.median(r["decode_tok_s"] for r in rs)
            lpt = statistics.median(r["loads_per_token"] for r in rs)
            r0 = rs[0]
            acc = f"{r0['accepted'] / r0['drafted']:.2f}" if r0["drafted"] else "-"
            per_step = f"{(r0['tokens']) / r0['verify_steps']:.2f}" if r0["verify_steps"] else "1"
            same = all(r["outputs"] == base[0]["outputs"] for r in rs)
            lines.append(f"| {wl} | {method} | {tps:.1f} ({_runs(r['decode_tok_s'] for r in rs)}) | "
                         f"{tps / base_tps:.2f}x | {lpt:.2f} | {base_loads / lpt if lpt else float('inf'):.2f}x "
                         f"fewer | {acc} | {per_step} | {'yes' if same else 'no'} |")
    text = "\n".join(lines)
    print(text)
    notes = (f"Bundled tiny-moe (bf16, 16 experts x 6 layers, top-2), expert cache at {args.fraction:.0%} of "
             f"{total} experts (--gpu-mem {gpu_mem}), each run a process under in_memcg.sh at {limit} bytes with the "
             f"checkpoint evicted first; {args.prompts} prompts per workload, batch 1, greedy, {args.tokens} new "
             f"tokens each (eos ignored), runs interleaved over methods, {args.repeats} repeats. Methods: "
             f"{json.dumps({k: v for k, v in METHODS.items() if k in args.methods})}, adaptive draft length. "
             "The checkpoint is 17 MB, so after the first read the page cache inside the limit serves expert "
             "loads: loads per token is the machine-independent figure, tok/s the CPU's. \"vs none\" of loads: "
             "none's loads per token / the method's. Acceptance and tokens per verify step from the first run.")
    if wants_record(args):
        record(f"speculative decoding in the engine, bundled model at {args.fraction:.0%} of experts (issue 23)",
               text, notes=notes)


def _runs(values) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


# ---- llama.cpp side by side --------------------------------------------------------------------------------
def run_llamacpp(args) -> None:
    import numpy as np
    import torch
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    import moe_engine
    gguf = args.gguf or str(Path(args.engine_model).parent / (Path(args.engine_model).name + "-bf16.gguf"))
    rng = np.random.default_rng(0)
    block = [int(x) for x in rng.integers(100, 32000, size=48)]
    prompt = block * 3 + block[:16]
    n_ctx = 512
    sides = {
        "llama.cpp": Llama(gguf, n_ctx=n_ctx, n_threads=args.threads, n_batch=512, verbose=False),
        "llama.cpp+lookup": Llama(gguf, n_ctx=n_ctx, n_threads=args.threads, n_batch=512, verbose=False,
                                  draft_model=LlamaPromptLookupDecoding(max_ngram_size=args.ngram,
                                                                        num_pred_tokens=args.k)),
    }
    torch.set_num_threads(args.threads)
    eng = moe_engine.load(args.engine_model, device="cpu", progress=False)
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.ngram}

    def llama_run(llm):
        llm.reset()
        evals = []
        real_eval = llm.eval

        def counting(tokens):
            evals.append(len(tokens))
            return real_eval(tokens)
        llm.eval = counting
        out, t_first = [], None
        t0 = time.perf_counter()
        for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(int(tok))
            if t_first is None:
                t_first = time.perf_counter()
            if len(out) > args.tokens:
                break
        t1 = time.perf_counter()
        llm.eval = real_eval
        steps = len(evals) - 1                               # the first eval is the prompt
        return {"decode_s": t1 - t_first, "tokens": len(out) - 1, "steps": steps, "out": out, "prefill_s": t_first - t0}

    def engine_run(spec):
        kw = {} if spec is None else {"speculative_config": spec}
        out = eng.generate(torch.tensor([prompt]), max_new_tokens=args.tokens + 1, eos_token_id=[], **kw)
        t = eng.timings
        steps = eng.stats()["speculation"]["verify_steps"] if spec is not None else args.tokens
        return {"decode_s": t.decode_s, "tokens": args.tokens, "steps": steps, "out": out[0, len(prompt):].tolist()}

    runs: dict[str, list[dict]] = {k: [] for k in ("llama.cpp", "llama.cpp+lookup", "engine", "engine+ngram")}
    llama_run(sides["llama.cpp"])                            # warm-up
    engine_run(None)
    for rep in range(args.repeats):
        runs["llama.cpp"].append(llama_run(sides["llama.cpp"]))
        runs["engine"].append(engine_run(None))
        runs["llama.cpp+lookup"].append(llama_run(sides["llama.cpp+lookup"]))
        runs["engine+ngram"].append(engine_run(ngram))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['tokens'] / v[-1]['decode_s']:.2f} tok/s" for k, v in runs.items()),
              file=sys.stderr, flush=True)
    med = {k: statistics.median(r["tokens"] / r["decode_s"] for r in v) for k, v in runs.items()}
    lines = ["| side | decode tok/s (runs) | tokens / verify step | with lookup / without |",
             "|---|---|---|---|"]
    for k, v in runs.items():
        per = v[0]["tokens"] / max(v[0]["steps"], 1)
        base = med["llama.cpp" if k.startswith("llama") else "engine"]
        lines.append(f"| {k} | {med[k]:.2f} ({_runs(r['tokens'] / r['decode_s'] for r in v)}) | "
                     f"{per:.2f} | {med[k] / base:.2f}x |")
    same_e = runs["engine"][0]["out"] == runs["engine+ngram"][0]["out"]
    same_l = runs["llama.cpp"][0]["out"][:args.tokens] == runs["llama.cpp+lookup"][0]["out"][:args.tokens]
    text = "\n".join(lines)
    comparison = (f"engine / llama.cpp without lookup {med['engine'] / med['llama.cpp']:.2f}x, with lookup "
                  f"{med['engine+ngram'] / med['llama.cpp+lookup']:.2f}x (medians)")
    print(text + "\n" + comparison)
    notes = (f"{args.engine_model} (Mixtral-shaped, random weights, bf16) all in RAM vs {gguf}; {args.threads} "
             f"threads; prompt: a random block of 48 ids repeated 3x + 16 ({len(prompt)} ids); {args.tokens} greedy "
             f"decode tokens; lookup K={args.k}, n-gram up to {args.ngram} on both sides (engine: adaptive draft "
             f"length). Runs interleaved, {args.repeats} repeats. Greedy tokens with lookup equal those without: "
             f"engine {'yes' if same_e else 'no'}, llama.cpp {'yes' if same_l else 'no'}. Tokens per verify step "
             "from the first run (llama.cpp: decode tokens / eval calls after the prompt).")
    if wants_record(args):
        record("speculative decoding all in RAM: engine ngram vs llama.cpp prompt lookup (issue 23)", text,
               comparison, notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--fraction", type=float, default=0.25)
    e.add_argument("--repeats", type=int, default=2)
    e.add_argument("--tokens", type=int, default=64)
    e.add_argument("--prompts", type=int, default=6)
    e.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "draft_model" or DRAFT.is_dir()],
                   choices=list(METHODS))
    e.add_argument("--workloads", nargs="+", default=["code", "edit"], choices=["code", "edit"])
    add_record_flag(e)
    o = sub.add_parser("one")
    o.add_argument("--model", default=str(BUNDLED))
    o.add_argument("--method", choices=list(METHODS), required=True)
    o.add_argument("--workload", choices=["code", "edit"], required=True)
    o.add_argument("--gpu-mem", type=int)
    o.add_argument("--tokens", type=int, default=64)
    o.add_argument("--prompts", type=int, default=6)
    la = sub.add_parser("llamacpp")
    la.add_argument("--engine-model", default="/work/bench_data/mixtral-1.4g")
    la.add_argument("--gguf")
    la.add_argument("--threads", type=int, default=2)
    la.add_argument("--tokens", type=int, default=48)
    la.add_argument("--repeats", type=int, default=3)
    la.add_argument("--k", type=int, default=4)
    la.add_argument("--ngram", type=int, default=3)
    add_record_flag(la)
    args = p.parse_args(argv)
    if args.cmd == "one":
        print("RESULT " + json.dumps(run_engine(args)), flush=True)
    elif args.cmd == "engine":
        run_engine_table(args)
    else:
        run_llamacpp(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
