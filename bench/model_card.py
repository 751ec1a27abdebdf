"""Measure the bundled model and write its model card (README.md in the model directory).

Runs the held-out split (bench/train_tiny_moe.py's corpus) through moe-engine itself, recording
every routing decision through a routing observer, and reports: held-out perplexity next to
a unigram baseline on the same tokenizer, per-layer expert load and routing entropy, consecutive
token expert reuse, and how well layer L+1's router applied to layer L's router input predicts
layer L+1's experts (recall at k). Chance levels are stated beside each locality number.

    python bench/model_card.py moe_engine/models/tiny-moe
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_tiny_moe import corpus_files, encode_files  # noqa: E402


class RoutingRecords:
    """A routing observer keeping (router input, experts) of every MoE layer call."""

    def __init__(self):
        self.records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def begin_step(self, token_ids, seq_ids):
        pass

    def observe(self, layer, router_input, experts, weights):
        self.records.setdefault(layer, []).append((router_input.float().clone(), experts.clone()))


def heldout_windows(held: torch.Tensor, seq: int, max_tokens: int):
    """Yield (ids [1, seq+1]) consecutive windows of the held-out stream."""
    n = min(len(held) - 1, max_tokens) // seq
    for i in range(n):
        yield held[i * seq:(i + 1) * seq + 1][None]


def perplexity_and_routing(eng, held, seq, max_tokens):
    nll, count = 0.0, 0
    with eng.observing(RoutingRecords()) as rec:
        for x in heldout_windows(held, seq, max_tokens):
            logits = eng.logits(x[:, :-1])[0]
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += seq
    return math.exp(nll / count), rec.records


def unigram_ppl(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 1.0     # add-one smoothing
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[held].mean().item())


@torch.no_grad()
def routing_stats(eng, records, top_k: int, num_experts: int) -> list[dict]:
    layers = sorted(records)
    out = []
    for li, layer in enumerate(layers):
        experts = [e for _, e in records[layer]]                        # windows of [T, K]
        flat = torch.cat(experts).flatten()
        load = torch.bincount(flat, minlength=num_experts).double()
        load = load / load.sum()
        entropy = -(load * load.clamp_min(1e-12).log2()).sum().item()
        reuse = sum(_overlap(e[1:], e[:-1]) * (len(e) - 1) for e in experts) / sum(len(e) - 1 for e in experts)
        row = {"layer": layer, "load": [round(v, 4) for v in load.tolist()], "entropy_bits": round(entropy, 3),
               "max_entropy_bits": round(math.log2(num_experts), 3), "consecutive_reuse": round(reuse, 4)}
        if li + 1 < len(layers):
            row.update(_next_layer_recall(eng, records[layer], records[layers[li + 1]], layers[li + 1], top_k))
        out.append(row)
    return out


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of a's experts (rows [T, K]) also in b's row at the same index."""
    return (a[:, :, None] == b[:, None, :]).any(-1).float().mean().item()


def _next_layer_recall(eng, cur, nxt, next_layer: int, top_k: int) -> dict:
    router = eng.decoder.layers[next_layer].moe.router.weight.detach().float()  # [E, D]
    hits = {top_k: 0.0, 2 * top_k: 0.0}
    total = 0
    for (x, _), (_, actual) in zip(cur, nxt):
        scores = x @ router.T                                           # [T, E]
        for k in hits:
            pred = scores.topk(k, dim=-1).indices
            hits[k] += (actual[:, :, None] == pred[:, None, :]).any(-1).float().sum().item()
        total += actual.numel()
    return {f"next_layer_recall@{k}": round(v / total, 4) for k, v in hits.items()}


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "- (last layer)"


def card_text(model_dir: Path, spec, stats: dict, meta: dict) -> str:
    """The model card (README.md) from the training log and the measured stats."""
    a, log = meta["args"], meta["log"]
    final = log[-1]
    rows = "\n".join(
        f"| {r['layer']} | {r['entropy_bits']:.2f} / {r['max_entropy_bits']:.0f} | {max(r['load']):.3f} | "
        f"{min(r['load']):.3f} | {r['consecutive_reuse']:.3f} | "
        f"{_cell(r, f'next_layer_recall@{spec.moe.top_k}')} | "
        f"{_cell(r, f'next_layer_recall@{2 * spec.moe.top_k}')} |" for r in stats["layers"])
    curve = ", ".join(f"{e['step']}: {e['heldout_ppl']}" for e in log if "heldout_ppl" in e)
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file()) / 1e6
    k, e = spec.moe.top_k, spec.moe.num_experts
    return f"""# tiny-moe: the bundled default model of moe-engine

A small Mixture-of-Experts language model trained from scratch on Python standard-library sources, so
that a fresh install has a real model with learned (not uniform) routing to run, profile and offload.
Written by `bench/train_tiny_moe.py` and measured by `bench/model_card.py`; both are in the repository.

## Data
- Corpus: every `*.py` file of the Python {meta['python']} standard library (found from `sys.prefix`),
  excluding site-packages, test suites and idlelib, sorted by path. Every 20th file is held out:
  {meta['train_files']} training files ({meta['train_tokens']:,} tokens), {meta['heldout_files']} held-out
  files ({meta['heldout_tokens']:,} tokens).
- Tokenizer: byte-level BPE trained with `tokenizers` on the training files, vocabulary {spec.vocab_size}
  (special tokens `<|pad|> <|bos|> <|eos|> <|user|> <|assistant|> <|system|> <|end|>`), with a chat template;
  loads with `AutoTokenizer.from_pretrained` from this directory.

## Shape
Mixtral layout (`MixtralForCausalLM`): hidden {spec.hidden_size}, {spec.num_layers} layers, {spec.num_heads}
attention heads / {spec.num_kv_heads} KV heads (head dim {spec.head_dim}), {e} experts per layer of FFN
{spec.moe.intermediate_size}, top-{k}, tied embeddings, RoPE theta 10000, context {spec.max_position_embeddings}.
Stored in bfloat16; the directory is {size:.1f} MB.

## Training
{a['steps']} steps of batch {a['batch']} x {a['seq']} tokens ({int(a['steps']) * int(a['batch']) * int(a['seq']):,}
tokens), AdamW (lr {a['lr']}, {a['warmup']} warm-up steps, cosine to 10%, weight decay 0.1, clip 1.0),
load-balancing auxiliary loss coefficient {a['aux_coef']}, bf16 autocast, seed {a['seed']}, {a['threads']} CPU
threads: {meta['wall_s'] / 60:.1f} minutes wall-clock in all on the 2-core development VM (torch {meta['torch']}),
~{final['tokens_per_s']:,} training tokens/s. Final training loss {final['loss']}.
Held-out perplexity during training (step: ppl, bf16 autocast, first {a['eval_tokens']} held-out tokens): {curve}.

## Evaluation (moe-engine, float32, {stats['heldout_tokens_scored']:,} held-out tokens in windows of 256)
| metric | value |
|---|---|
| held-out perplexity | **{stats['heldout_ppl']:.2f}** |
| unigram baseline perplexity (same tokenizer, add-one smoothed training counts) | {stats['unigram_ppl']:.1f} |

## Routing
Per layer, over the same held-out tokens: routing entropy of the expert load (bits; uniform = log2 {e}),
the most and least used expert's share of routed slots, consecutive-token reuse (share of a token's
experts that the previous token also used; chance = k/E = {stats['chance_reuse']}), and next-layer
predictability (share of layer L+1's experts found in the top-k of layer L+1's router applied to layer
L's router input; chance = k/E: {stats['chance_recall']['@' + str(k)]} at k={k},
{stats['chance_recall']['@' + str(2 * k)]} at k={2 * k}).

| layer | entropy (bits) | max load | min load | consecutive reuse | next-layer recall@{k} | next-layer recall@{2 * k} |
|---|---|---|---|---|---|---|
{rows}

## Reproducibility
`python bench/train_tiny_moe.py --out DIR` (seeded data order, init and tokenizer; same Python {meta['python']}
standard library) rebuilds this model. Two independent 60-step runs of the script on the development VM
(`--steps 60 --eval-every 1000 --eval-tokens 16384`) produced bit-identical weights and the same held-out
perplexity, so a full run is expected to reproduce the perplexity above exactly on the same machine and
torch build, and within 2% elsewhere (different CPU kernels change rounding; not measured here). A full
second 1500-step run was not repeated in this session.

Full numbers: `card_stats.json`; training curve: `training_log.json`.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=125_000)
    args = p.parse_args(argv)
    import moe_engine

    eng = moe_engine.load(args.model_dir, device="cpu", dtype="float32", progress=False)
    train_files, held_files = corpus_files()
    train_ids, held_ids = encode_files(eng.tokenizer, train_files), encode_files(eng.tokenizer, held_files)
    ppl, records = perplexity_and_routing(eng, held_ids, args.seq, args.max_tokens)
    spec = eng.spec
    stats = {"heldout_ppl": round(ppl, 3), "unigram_ppl": round(unigram_ppl(train_ids, held_ids, spec.vocab_size), 2),
             "heldout_tokens_scored": (min(len(held_ids) - 1, args.max_tokens) // args.seq) * args.seq,
             "chance_reuse": round(spec.moe.top_k / spec.moe.num_experts, 4),
             "chance_recall": {f"@{k}": round(k / spec.moe.num_experts, 4) for k in (spec.moe.top_k, 2 * spec.moe.top_k)},
             "layers": routing_stats(eng, records, spec.moe.top_k, spec.moe.num_experts)}
    (args.model_dir / "card_stats.json").write_text(json.dumps(stats, indent=1))
    meta = json.loads((args.model_dir / "training_log.json").read_text())
    (args.model_dir / "README.md").write_text(card_text(args.model_dir, spec, stats, meta))
    print(json.dumps({k: v for k, v in stats.items() if k != "layers"}, indent=1))
    for row in stats["layers"]:
        print({k: v for k, v in row.items() if k != "load"})
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
