"""Decode tokens/s of moe-engine vs transformers on the same checkpoint, same dtype, all in RAM, same run.

Both get the same random prompt and greedy-decode the same number of tokens (eos disabled).
Decode time = time(prompt + N new tokens) - time(prompt + 1 new token), so prefill is excluded
the same way for both; each measurement is the median of --repeats runs, engines interleaved.

    python bench/make_checkpoint.py /tmp/mixtral-1g --no-tokenizer --hidden 1024 --ffn 3584 --layers 6 \\
        --experts 8 --heads 16 --kv-heads 4 --vocab 32000 --dtype bfloat16
    python bench/bench_decode.py /tmp/mixtral-1g --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_rate(gen, new_tokens: int) -> float:
    """Tokens/s of decode only: (N - 1) tokens over time(N) - time(1)."""
    t1 = timed(lambda: gen(1))
    tn = timed(lambda: gen(new_tokens))
    return (new_tokens - 1) / (tn - t1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers as tf
    import moe_engine

    dtype = getattr(torch, args.dtype)
    eng = moe_engine.load(args.model_dir, device="cpu", dtype=args.dtype, progress=False)
    cfg = tf.AutoConfig.from_pretrained(args.model_dir)
    hf = getattr(tf, cfg.architectures[0]).from_pretrained(args.model_dir, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    ids = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def run_hf(n):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def run_engine(n):
        return eng.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[])

    same = torch.equal(run_hf(16), run_engine(16))   # warm-up, and a sanity check of the comparison
    expert_bytes = eng.provider.nbytes()
    rate_hf, rate_engine = [], []
    for _ in range(args.repeats):   # interleave so drift affects both alike
        rate_hf.append(decode_rate(run_hf, args.new_tokens))
        rate_engine.append(decode_rate(run_engine, args.new_tokens))
    result = {
        "model_dir": args.model_dir, "dtype": args.dtype, "threads": args.threads,
        "expert_bytes": expert_bytes, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "same_greedy_tokens_first16": same,
        "transformers_decode_tok_s": statistics.median(rate_hf),
        "engine_decode_tok_s": statistics.median(rate_engine),
        "all_runs": {"transformers": rate_hf, "engine": rate_engine},
    }
    result["engine_over_transformers"] = result["engine_decode_tok_s"] / result["transformers_decode_tok_s"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
