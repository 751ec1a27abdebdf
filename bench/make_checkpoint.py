"""Write a random-weight MoE checkpoint with a real (small) tokenizer, the way Hugging Face saves one.

Used by README's quick start (before a trained model is bundled) and by the benchmarks to get
Mixtral-shaped checkpoints of a chosen size. The tokenizer is a byte-level BPE trained in a few
seconds on Python standard-library sources, with a chat template.

    python bench/make_checkpoint.py /tmp/moe-tiny
    python bench/make_checkpoint.py /tmp/mixtral-1g --hidden 1024 --ffn 3584 --layers 6 --experts 8 --dtype bfloat16

The llama.cpp comparison's checkpoints (bench_llamacpp.py; vocab 32000 and no tokenizer, so that
llamacpp_gguf.py can give the GGUF bench/llama_tokenizer.py's): mixtral-1.4g (1.58 GB, 8 layers) and mixtral-4g
(4.49 GB, 24 layers, for the memory-limited rows; needs ~5 GB of RAM and disk, a few minutes):

    python bench/make_checkpoint.py /work/bench_data/mixtral-1.4g --hidden 1024 --ffn 3584 --layers 8 --heads 16 \
        --kv-heads 4 --experts 8 --top-k 2 --vocab 32000 --context 4096 --dtype bfloat16 --no-tokenizer
    python bench/make_checkpoint.py /work/bench_data/mixtral-4g --hidden 1024 --ffn 3584 --layers 24 --heads 16 \
        --kv-heads 4 --experts 8 --top-k 2 --vocab 32000 --context 4096 --dtype bfloat16 --no-tokenizer
and mixtral-32e (8.5 GB, 32 experts top-4: the int4 memory-limited rows, where an 8-expert top-2 model's
resident minimum of 2 experts per layer does not fit 40% of its Q4_0 file):
    python bench/make_checkpoint.py /work/bench_data/mixtral-32e --hidden 1024 --ffn 1792 --layers 24 --heads 16 \
        --kv-heads 4 --experts 32 --top-k 4 --vocab 32000 --context 4096 --dtype bfloat16 --no-tokenizer
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny_moe import train_tokenizer as train_bpe  # noqa: E402


def train_tokenizer(out: Path, vocab_size: int, max_length: int = 4096) -> None:
    """Byte-level BPE on the first 60 stdlib sources (a few seconds), with a chat template."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:60]
    train_bpe([Path(f) for f in files], vocab_size, out, max_length)


def build_model(args):
    import torch
    import transformers as tf

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_experts_per_tok=args.top_k,
                  max_position_embeddings=args.context, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    if args.family == "mixtral":
        cfg = tf.MixtralConfig(num_local_experts=args.experts, intermediate_size=args.ffn, **common)
        cls = tf.MixtralForCausalLM
    else:
        config_cls, cls = {"qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
                           "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
                           "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM)}[args.family]
        extra = {"moe_intermediate_size": args.ffn} if args.family != "olmoe" else {}
        cfg = config_cls(num_experts=args.experts, intermediate_size=args.ffn, **extra, **common)
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = cls(cfg)
    # storage in the target dtype at once; each weight drawn in float32 and rounded, in parameter order: the same
    # values as drawing the whole float32 model and converting it, without holding a float32 copy (a 4.5 GB bf16
    # checkpoint would need 9 GB more)
    model = model.to(getattr(torch, args.dtype)).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty(p.shape).normal_(0.0, 0.02)) if p.dim() > 1 else p.fill_(1.0)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--family", default="mixtral", choices=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shard-size", default="5GB", help="max shard size for save_pretrained")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer (token-id benchmarks)")
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        print(f"{args.out} exists and is not empty; pass --force to overwrite", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_tokenizer:
        train_tokenizer(args.out, args.vocab, args.context)
    build_model(args).save_pretrained(args.out, max_shard_size=args.shard_size)
    print(f"wrote {args.family} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
