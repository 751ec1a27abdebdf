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
  * repeat N times; report the median and all runs.

Making the GGUF (llama-cpp-python 0.3.36 from PyPI, built from source; its sdist carries llama.cpp's converter):

  pip install llama-cpp-python gguf sentencepiece
  pip download --no-binary :all: --no-deps llama-cpp-python -d sdist && tar xzf sdist/llama_cpp_python-*.tar.gz
  mkdir SRC && ln -s MODEL_DIR/{config.json,generation_config.json,model.safetensors} SRC/
  python bench/llama_tokenizer.py SRC     # a made-up 32000-token Llama tokenizer: the converter needs one
  python llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py SRC --outtype bf16 --outfile MODEL.gguf

One JSON line is printed per thread count, e.g.

  python bench/bench_llamacpp.py --model /work/bench_data/mixtral-1.4g-bf16.gguf --threads 2 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


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


def bench(model_path, n_threads, n_batch, n_prompt, n_decode, repeats, warmup_decode, seed):
    import llama_cpp
    from llama_cpp import Llama

    t_load0 = time.perf_counter()
    llm = Llama(
        model_path=model_path,
        n_ctx=512,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_batch=n_batch,
        n_ubatch=n_batch,
        logits_all=False,
        use_mmap=True,
        verbose=False,
    )
    load_s = time.perf_counter() - t_load0
    n_vocab = llm.n_vocab()
    assert n_prompt + n_decode + 1 <= llm.n_ctx(), "context too small"

    rng = np.random.default_rng(seed)
    prompt = [int(x) for x in rng.integers(100, min(32000, n_vocab), size=n_prompt)]

    sampler = _greedy_sampler(llama_cpp)
    try:
        # warm-up (page in the mmap'd weights, build graphs, spin up threads)
        run_one(llm, llama_cpp, sampler, prompt, warmup_decode)

        prefill, decode, gens = [], [], []
        for _ in range(repeats):
            p, d, out = run_one(llm, llama_cpp, sampler, prompt, n_decode)
            assert len(out) == n_decode + 1
            prefill.append(p)
            decode.append(d)
            gens.append(out)
    finally:
        llama_cpp.llama_sampler_free(sampler)

    decode_tps = [n_decode / d for d in decode]
    prefill_tps = [n_prompt / p for p in prefill]
    result = {
        "engine": "llama.cpp",
        "decode_tokens_per_s": round(statistics.median(decode_tps), 3),
        "runs": [round(x, 3) for x in decode_tps],
        "prefill_tokens_per_s": round(statistics.median(prefill_tps), 3),
        "prefill_runs": [round(x, 3) for x in prefill_tps],
        "gguf_bytes": os.path.getsize(model_path),
        "n_threads": n_threads,
        "n_batch": n_batch,
        "n_prompt": n_prompt,
        "n_decode": n_decode,
        "load_s": round(load_s, 3),
        "deterministic": all(g == gens[0] for g in gens),
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }
    del llm
    return result


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
    args = ap.parse_args(argv)

    for t in args.threads:
        res = bench(args.model, t, args.n_batch, args.n_prompt, args.n_decode,
                    args.repeats, args.warmup_decode, args.seed)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
