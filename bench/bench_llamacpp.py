"""Decode-throughput baseline: llama.cpp (via llama-cpp-python) on a GGUF checkpoint.

Measures single-stream greedy decode tokens/s on CPU, for comparison with
bench_decode.py. Protocol:

  * load the GGUF with llama_cpp.Llama(n_ctx=512, n_threads=T, use_mmap=True)
  * warm-up: one untimed prefill + a few decode steps
  * per run: reset the KV cache, prefill a fixed 16-token prompt of random ids
    (numpy seed 0, ids in [100, 32000)), sample the first token greedily from
    the prefill logits, then run 128 single-token forward passes, each followed
    by a greedy (argmax) sample.  Only those 128 decode steps are timed.
    EOS is never checked, so exactly 128 tokens are always produced
    (random weights can emit EOS at any time).
  * repeat N times, interleaved run by run with the engine (the VM's memory bandwidth drifts between
    minutes: runs side by side see the same machine); report the median and all runs.

Making the GGUF (llama-cpp-python 0.3.36 from PyPI, built from source; its sdist carries llama.cpp's converter):

  pip install llama-cpp-python gguf sentencepiece
  pip download --no-binary :all: --no-deps llama-cpp-python -d sdist && tar xzf sdist/llama_cpp_python-*.tar.gz
  mkdir SRC && ln -s MODEL_DIR/{config.json,generation_config.json,model.safetensors} SRC/
  python bench/llama_tokenizer.py SRC     # a made-up 32000-token Llama tokenizer: the converter needs one
  python llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py SRC --outtype bf16 --outfile MODEL.gguf

One JSON line is printed per thread count and side, then a markdown table: llama.cpp and
moe-engine (all experts in RAM, --engine-model: the safetensors checkpoint the GGUF was converted
from, in its own dtype, bf16 for the bench checkpoint) on the same prompt ids with the same
protocol (prefill, then `n_decode` timed greedy single-token steps: time(prompt + n_decode + 1 new)
- time(prompt + 1 new) for the engine), and the ratio engine / llama.cpp, e.g.

  python bench/bench_llamacpp.py --model /work/bench_data/mixtral-1.4g-bf16.gguf --threads 2 1
  python bench/bench_llamacpp.py --threads 1 --n-decode 4 --repeats 1 --warmup-decode 1 --no-record   # quick check

The run is appended to bench/RESULTS.md (bench/results.py) unless --no-record. When llama-cpp-python
cannot be imported or the GGUF is missing, the script says why and what to run, and records that
instead of numbers (the issue asks for the reason in RESULTS.md when llama.cpp cannot be built).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402


def _greedy_sampler(llama_cpp):
    return llama_cpp.llama_sampler_init_greedy()


def run_one(llm, llama_cpp, sampler, prompt, n_decode):
    """Returns (prefill_seconds, decode_seconds, generated_token_ids)."""
    llm.reset()  # n_tokens = 0; the next eval() drops the KV cache from position 0
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(n_decode):
        llm.eval([tok])
        tok = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
        out.append(tok)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


class LlamaCppSide:
    """llama.cpp on the GGUF: load once, warm up, then `run()` one timed repeat."""

    def __init__(self, model_path, n_threads, n_batch, n_prompt, n_decode, warmup_decode, seed):
        import llama_cpp
        from llama_cpp import Llama

        self.llama_cpp, self.model_path, self.n_threads, self.n_batch = llama_cpp, model_path, n_threads, n_batch
        self.n_prompt, self.n_decode = n_prompt, n_decode
        t_load0 = time.perf_counter()
        self.llm = Llama(model_path=model_path, n_ctx=512, n_threads=n_threads, n_threads_batch=n_threads,
                         n_batch=n_batch, n_ubatch=n_batch, logits_all=False, use_mmap=True, verbose=False)
        self.load_s = time.perf_counter() - t_load0
        assert n_prompt + n_decode + 1 <= self.llm.n_ctx(), "context too small"
        self.prompt = prompt_ids(seed, n_prompt, self.llm.n_vocab())
        self.sampler = _greedy_sampler(llama_cpp)
        # warm-up (page in the mmap'd weights, build graphs, spin up threads)
        run_one(self.llm, llama_cpp, self.sampler, self.prompt, warmup_decode)
        self.prefill, self.decode, self.gens = [], [], []

    def run(self) -> float:
        p, d, out = run_one(self.llm, self.llama_cpp, self.sampler, self.prompt, self.n_decode)
        assert len(out) == self.n_decode + 1
        self.prefill.append(p)
        self.decode.append(d)
        self.gens.append(out)
        return self.n_decode / d

    def result(self) -> dict:
        decode_tps = [self.n_decode / d for d in self.decode]
        prefill_tps = [self.n_prompt / p for p in self.prefill]
        return {
            "engine": "llama.cpp",
            "decode_tokens_per_s": round(statistics.median(decode_tps), 3),
            "runs": [round(x, 3) for x in decode_tps],
            "prefill_tokens_per_s": round(statistics.median(prefill_tps), 3),
            "prefill_runs": [round(x, 3) for x in prefill_tps],
            "gguf_bytes": os.path.getsize(self.model_path),
            "n_threads": self.n_threads,
            "n_batch": self.n_batch,
            "n_prompt": self.n_prompt,
            "n_decode": self.n_decode,
            "load_s": round(self.load_s, 3),
            "deterministic": all(g == self.gens[0] for g in self.gens),
            "llama_cpp_python": self.llama_cpp.__version__,
            "system_info": self.llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        }

    def close(self) -> None:
        self.llama_cpp.llama_sampler_free(self.sampler)
        del self.llm


def prompt_ids(seed: int, n_prompt: int, n_vocab: int) -> list[int]:
    """The benchmark prompt: the same ids for llama.cpp and the engine."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(100, min(32000, n_vocab), size=n_prompt)]


class EngineSide:
    """moe-engine, every expert in RAM, the checkpoint's own dtype, the same prompt and decode protocol."""

    def __init__(self, model_dir, n_threads, n_prompt, n_decode, warmup_decode, seed):
        import torch

        import moe_engine
        torch.set_num_threads(n_threads)
        self.n_threads, self.n_prompt, self.n_decode = n_threads, n_prompt, n_decode
        self.eng = moe_engine.load(model_dir, device="cpu", progress=False)
        self.ids = torch.tensor([prompt_ids(seed, n_prompt, self.eng.spec.vocab_size)])
        self._timed(warmup_decode + 1)
        self.decode, self.gens = [], []

    def _timed(self, new):
        t0 = time.perf_counter()
        out = self.eng.generate(self.ids, max_new_tokens=new, do_sample=False, eos_token_id=[])
        return time.perf_counter() - t0, out[0, self.n_prompt:].tolist()

    def run(self) -> float:
        t1, _ = self._timed(1)
        tn, out = self._timed(self.n_decode + 1)
        self.decode.append(self.n_decode / max(tn - t1, 1e-9))
        self.gens.append(out)
        return self.decode[-1]

    def result(self) -> dict:
        return {"engine": "moe-engine", "decode_tokens_per_s": round(statistics.median(self.decode), 3),
                "runs": [round(x, 3) for x in self.decode], "n_threads": self.n_threads, "n_prompt": self.n_prompt,
                "n_decode": self.n_decode, "dtype": str(self.eng.dtype).replace("torch.", ""),
                "deterministic": all(g == self.gens[0] for g in self.gens)}

    def close(self) -> None:
        self.eng.close()


def unavailable(model_path: str) -> str | None:
    """Why llama.cpp cannot be measured here (None when it can)."""
    try:
        import llama_cpp
    except ImportError as e:
        return (f"llama-cpp-python cannot be imported ({e}); build it from the registry with "
                f"`pip install llama-cpp-python` (needs a C++ compiler and cmake), see this script's docstring")
    if not os.path.exists(model_path):
        return (f"no GGUF at {model_path} (llama-cpp-python {llama_cpp.__version__} is installed); make it with "
                f"the conversion steps in bench/bench_llamacpp.py's docstring, or pass --model")
    return None


def table(rows: list[tuple[dict, dict | None]]) -> str:
    lines = ["| threads | llama.cpp decode tok/s (runs) | moe-engine decode tok/s (runs) | engine / llama.cpp "
             "(medians) | run-by-run ratios (median) |", "|---|---|---|---|---|"]
    for lc, en in rows:
        e_cell = f"{en['decode_tokens_per_s']:.1f} ({', '.join(f'{x:.1f}' for x in en['runs'])})" if en else "not run"
        ratio = f"**{en['decode_tokens_per_s'] / lc['decode_tokens_per_s']:.2f}x**" if en else ""
        paired = [e / c for e, c in zip(en["runs"], lc["runs"])] if en else []
        pairs = f"{', '.join(f'{r:.2f}' for r in paired)} ({statistics.median(paired):.2f}x)" if paired else ""
        lines.append(f"| {lc['n_threads']} | {lc['decode_tokens_per_s']:.1f} "
                     f"({', '.join(f'{x:.1f}' for x in lc['runs'])}) | {e_cell} | {ratio} | {pairs} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/bench_data/mixtral-1.4g-bf16.gguf")
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                    help="thread counts to measure, one JSON line each (default: 2 1)")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--n-prompt", type=int, default=16)
    ap.add_argument("--n-decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup-decode", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-model", default="/work/bench_data/mixtral-1.4g",
                    help="the safetensors checkpoint the GGUF was made from; moe-engine runs it all in RAM")
    ap.add_argument("--no-engine", action="store_true", help="measure llama.cpp only")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    title = "decode tok/s all in RAM: llama.cpp (llama-cpp-python) vs moe-engine, same checkpoint and precision"
    why = unavailable(args.model)
    if why:
        print(f"llama.cpp not measured: {why}", file=sys.stderr)
        if wants_record(args):
            record(title, "| llama.cpp | moe-engine |\n|---|---|\n| not measured | not measured |",
                   None, f"llama.cpp could not be measured on this machine: {why}.")
        return 1
    if not args.no_engine and not os.path.isdir(args.engine_model):
        raise SystemExit(f"--engine-model {args.engine_model} is not a directory; pass the safetensors checkpoint "
                         f"the GGUF was converted from, or --no-engine to measure llama.cpp alone")
    rows = []
    for t in args.threads:
        lc = LlamaCppSide(args.model, t, args.n_batch, args.n_prompt, args.n_decode, args.warmup_decode, args.seed)
        en = None if args.no_engine else EngineSide(args.engine_model, t, args.n_prompt, args.n_decode,
                                                    args.warmup_decode, args.seed)
        for _ in range(args.repeats):      # interleaved: the VM's memory bandwidth drifts between minutes
            lc.run()
            if en is not None:
                en.run()
        rows.append((lc.result(), en.result() if en else None))
        lc.close()
        if en is not None:
            en.close()
        for res in rows[-1]:
            if res is not None:
                print(json.dumps(res), flush=True)
    text = table(rows)
    print(text)
    compare = "; ".join(f"{lc['n_threads']} thread(s): engine / llama.cpp "
                        f"{en['decode_tokens_per_s'] / lc['decode_tokens_per_s']:.2f}x"
                        for lc, en in rows if en) or "moe-engine not run (--no-engine)"
    print(compare)
    if wants_record(args):
        import torch
        torch.set_num_threads(args.threads[0])   # the Machine line names one count; each row says its own
        lc = rows[0][0]
        record(title, text, compare,
               f"GGUF {args.model} ({lc['gguf_bytes'] / 1e9:.2f} GB), llama.cpp via llama-cpp-python "
               f"{lc['llama_cpp_python']}; moe-engine on {args.engine_model} "
               f"({rows[0][1]['dtype'] if rows[0][1] else 'not run'}). {args.n_prompt}-token random prompt "
               f"(seed {args.seed}), {args.n_decode} timed greedy decode steps, median of {args.repeats} runs, "
               f"sides interleaved run by run in one process, both with the row's thread count. llama.cpp system info: {lc['system_info']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
