"""Train the bundled default model: a small Mixtral-layout MoE on Python standard-library sources.

Corpus: every `*.py` file of this interpreter's standard library (found from `sys.prefix`, without
site-packages, test suites and idlelib), sorted by path; every 20th file is held out. A byte-level
BPE tokenizer (`tokenizers`) is trained on the training files. The model is transformers'
MixtralForCausalLM trained with its load-balancing auxiliary loss, bf16 autocast on the CPU.
Everything is seeded: the same Python version (same corpus), seed and step count give the same
model up to floating-point nondeterminism of threaded CPU kernels.

    python bench/train_tiny_moe.py --out moe_engine/models/tiny-moe          # ~25 min on 2 cores
    python bench/train_tiny_moe.py --out /tmp/check --steps 60               # quick reproducibility check
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) stdlib source files, deterministic for a given Python installation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts))
    held = [p for i, p in enumerate(files) if i % 20 == 0]
    train = [p for i, p in enumerate(files) if i % 20 != 0]
    return train, held


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int, out: Path, max_length: int = 1024):
    """Byte-level BPE on `files`, saved with a chat template so AutoTokenizer loads it from `out` alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((read_text(p) for p in files), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE, model_max_length=max_length)
    fast.save_pretrained(out)
    return fast


def encode_files(tok, files: list[Path]) -> torch.Tensor:
    """All files as one id stream, each file followed by eos."""
    eos = tok.convert_tokens_to_ids("<|eos|>")
    ids: list[int] = []
    for enc in tok([read_text(p) for p in files], add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model(args, tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.ffn,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        num_key_value_heads=args.kv_heads, num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k, max_position_embeddings=1024,
                        router_aux_loss_coef=args.aux_coef, output_router_logits=True, tie_word_embeddings=True,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(args.seed)
    return MixtralForCausalLM(cfg)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq: int, max_tokens: int) -> float:
    """Held-out perplexity over consecutive windows (first max_tokens tokens)."""
    model.eval()
    n = min(len(ids) - 1, max_tokens) // seq
    total, count = 0.0, 0
    for i in range(n):
        x = ids[i * seq:(i + 1) * seq + 1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[None, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(logits[0], x[1:], reduction="sum").item()
        count += seq
    model.train()
    return math.exp(total / count)


def train(model, data: torch.Tensor, held: torch.Tensor, args) -> list[dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    log, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[:, :-1], labels=x[:, :-1], output_router_logits=True)   # HF shifts labels itself
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            entry = {"step": step, "loss": round(out.loss.item(), 4), "aux": round(float(out.aux_loss), 4),
                     "tokens_per_s": round((step + 1) * args.batch * args.seq / elapsed), "elapsed_s": round(elapsed)}
            if step % args.eval_every == 0 or step == args.steps - 1:
                entry["heldout_ppl"] = round(evaluate(model, held, args.seq, args.eval_tokens), 3)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--aux-coef", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--eval-tokens", type=int, default=65536)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    train_files, held_files = corpus_files()
    tok = train_tokenizer(train_files, args.vocab, args.out)
    data, held = encode_files(tok, train_files), encode_files(tok, held_files)
    print(f"corpus: {len(train_files)} train files ({len(data)} tokens), {len(held_files)} held-out "
          f"({len(held)} tokens); tokenizer vocab {len(tok)}", flush=True)
    model = build_model(args, tok)
    log = train(model, data, held, args)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "python": sys.version.split()[0],
            "torch": torch.__version__, "train_files": len(train_files), "heldout_files": len(held_files),
            "train_tokens": len(data), "heldout_tokens": len(held), "wall_s": round(time.perf_counter() - t0),
            "log": log}
    (args.out / "training_log.json").write_text(json.dumps(meta, indent=1))
    print(f"saved to {args.out} in {meta['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
