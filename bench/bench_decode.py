"""Decode tokens/s of moe-engine vs transformers on the same checkpoint, same dtype, all in RAM, same run.

Both get the same random prompt and greedy-decode the same number of tokens (eos disabled).
Decode time = time(prompt + N new tokens) - time(prompt + 1 new token), so prefill is excluded
the same way for both; each measurement is the median of --repeats runs, engines interleaved.

    python bench/make_checkpoint.py /tmp/mixtral-1g --no-tokenizer --hidden 1024 --ffn 3584 --layers 6 \\
        --experts 8 --heads 16 --kv-heads 4 --vocab 32000 --dtype bfloat16
    python bench/bench_decode.py /tmp/mixtral-1g --dtype bfloat16
    python bench/bench_decode.py moe_engine/models/tiny-moe --dtype float32 --new-tokens 8 --repeats 1 --no-record

Prints the JSON of the run and a markdown table with the ratio engine / transformers; the table is
appended to bench/RESULTS.md (bench/results.py) unless --no-record.
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
    add_record_flag(p)
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
    expert_bytes = eng.experts.nbytes()
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
    text = table(result)
    print(text)
    compare = f"moe-engine / transformers decode tok/s: {result['engine_over_transformers']:.2f}x"
    if wants_record(args):
        record(f"decode tok/s all in RAM, moe-engine vs transformers, {Path(args.model_dir).name} {args.dtype}", text,
               compare, f"Same process, same dtype, batch 1, {args.prompt_len}-token random prompt, greedy, eos off; "
               f"decode = (N - 1) / (time(N new) - time(1 new)), N = {args.new_tokens}; median of {args.repeats} "
               f"repeats, engines interleaved.")
    return 0


def table(r: dict) -> str:
    runs = {k: ", ".join(f"{x:.1f}" for x in v) for k, v in r["all_runs"].items()}
    return ("| checkpoint | dtype | threads | expert bytes | transformers tok/s (runs) | moe-engine tok/s (runs) | "
            "engine / transformers | same first 16 greedy tokens |\n|---|---|---|---|---|---|---|---|\n"
            f"| {Path(r['model_dir']).name} | {r['dtype']} | {r['threads']} | {r['expert_bytes'] / 1e6:.1f} MB | "
            f"{r['transformers_decode_tok_s']:.1f} ({runs['transformers']}) | {r['engine_decode_tok_s']:.1f} "
            f"({runs['engine']}) | **{r['engine_over_transformers']:.2f}x** | {r['same_greedy_tokens_first16']} |")


if __name__ == "__main__":
    raise SystemExit(main())
