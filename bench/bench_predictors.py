"""Expert predictors' recall@k per lookahead, replayed through predictors.evaluate.replay.

`trace`: trains the `path` predictor on one routing trace and evaluates it on another (or on
sequences held out of the first), next to three baselines evaluated the same way:
  cooc        inter-layer co-occurrence table P(expert at m+d | expert at m), fit on the train trace;
              scores = sum over the token's experts at m of their rows
  prev-token  the experts the previous token of the sequence used at the target layer (ties,
              and a sequence's first token, broken by the train trace's layer frequency)
  frequency   global frequency of each expert per layer in the train trace
recall@k at lookahead d for layer m = share of layer m's experts among the k best scores forecast
when layer m - d ran; averaged over all forecast layers as RecallMeter.summary() does.

    python bench/bench_predictors.py trace --train T_TRAIN.npz --eval T_EVAL.npz [--depth 2] [--json OUT]
    python bench/bench_predictors.py trace --train T_TRAIN.npz --holdout 100      # validation on train seqs
    python bench/bench_predictors.py trace                    # GPT-OSS-20B: fit on dev, report on test (~3 min)
    python bench/bench_predictors.py trace --smoke            # seconds: 8 sequences each, 1 epoch; prints only

Without --train / --eval / --holdout it fits on ../shared/data/routing's dev split and reports on its
test split. The recall table gives each predictor's recall@2k at lookahead 1 as a ratio to the
co-occurrence baseline. A run is appended to bench/RESULTS.md (bench/results.py) unless --no-record.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from predictors.evaluate import replay
from predictors.path import PathPredictor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

ROUTING = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "routing"


class Frequency:
    """Global per-layer expert frequency of the train trace; the same scores for every token."""

    name = "frequency"

    def __init__(self, experts: np.ndarray, num_experts: int):
        counts = np.stack([np.bincount(experts[:, m].ravel(), minlength=num_experts) for m in range(experts.shape[1])])
        self.freq = torch.from_numpy(counts / counts.sum(1, keepdims=True)).float()       # [L, E]
        self._n, self._layer = 0, -1

    def bind(self, routers, top_k, num_experts):
        self.layers = sorted(routers)

    def observe(self, layer, router_input, experts, weights, token_ids=None, seq_ids=None):
        self._n, self._layer = experts.shape[0], layer

    def predict(self, layer, depth):
        i = self.layers.index(layer)
        return {self.layers[t]: self.freq[t].expand(self._n, -1) for t in range(i + 1, min(i + depth + 1, len(self.layers)))}


class Cooc(Frequency):
    """P(expert at m+d | expert at m), one table per layer and lookahead; scores sum the rows of the token's experts."""

    name = "cooc"

    def __init__(self, experts: np.ndarray, num_experts: int, depth: int):
        super().__init__(experts, num_experts)
        n_layers, self.depth = experts.shape[1], depth
        self.table = {}                                                                     # (m, d) -> [E, E]
        for d in range(1, depth + 1):
            for m in range(n_layers - d):
                c = np.zeros((num_experts, num_experts))
                np.add.at(c, (experts[:, m, :, None], experts[:, m + d, None, :]), 1.0)
                self.table[m, d] = torch.from_numpy(c / np.maximum(c.sum(1, keepdims=True), 1.0)).float()
        self._experts = None

    def observe(self, layer, router_input, experts, weights, token_ids=None, seq_ids=None):
        super().observe(layer, router_input, experts, weights, token_ids, seq_ids)
        self._experts = experts.long()

    def predict(self, layer, depth):
        i = self.layers.index(layer)
        return {self.layers[i + d]: self.table[i, d][self._experts].sum(1)                 # [N, E]
                for d in range(1, min(depth, self.depth) + 1) if (i, d) in self.table}


class PrevToken(Frequency):
    """The experts the previous token of the same sequence used at the target layer."""

    name = "prev-token"

    def bind(self, routers, top_k, num_experts):
        super().bind(routers, top_k, num_experts)
        self.last: dict[int, torch.Tensor] = {}          # seq id -> [L, E] the last token's use
        self._sids = None

    def observe(self, layer, router_input, experts, weights, token_ids=None, seq_ids=None):
        super().observe(layer, router_input, experts, weights, token_ids, seq_ids)
        self._sids = seq_ids.tolist()
        i = self.layers.index(layer)
        for sid, ex in zip(self._sids, experts.long()):
            use = self.last.setdefault(sid, torch.zeros(self.freq.shape))
            use[i] = 0.0
            use[i, ex] = 1.0

    def predict(self, layer, depth):
        out = super().predict(layer, depth)
        for target in out:
            t = self.layers.index(target)
            out[target] = out[target] * 1e-3 + torch.stack([self.last[s][t] for s in self._sids])
        return out


def load_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.load(path)
    return z["experts"].astype(np.int64), z["probs"].astype(np.float32), z["seq_offsets"].astype(np.int64)


def take(trace: tuple, seqs: np.ndarray) -> tuple:
    """The sub-trace of sequences `seqs`."""
    experts, probs, so = trace
    rows = np.concatenate([np.arange(so[s], so[s + 1]) for s in seqs])
    return experts[rows], probs[rows], np.r_[0, np.cumsum(so[seqs + 1] - so[seqs])]


def predict_cost_us(pred, n_layers: int, top_k: int, num_experts: int, depth: int) -> dict:
    """Mean microseconds of one observe + predict(depth) per layer, decode steps of N tokens."""
    out = {}
    for n in (1, 8, 32):
        pred.bind({m: None for m in range(n_layers)}, top_k, num_experts)
        sid, w = torch.arange(n), torch.full((n, top_k), 1.0 / top_k)
        ex = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(n)])
        for step in range(40):
            if step == 10:
                t0 = time.perf_counter()
            for m in range(n_layers):
                pred.observe(m, None, ex, w, None, sid)
                pred.predict(m, depth)
        out[f"N{n}"] = (time.perf_counter() - t0) / (30 * n_layers) * 1e6
    return out


def recall_table(results: dict, keys: list[str], headline: str, base: str = "cooc") -> str:
    """Recall per predictor and key, and the `headline` recall as a ratio to the `base` predictor's."""
    lines = ["| predictor | " + " | ".join(keys) + f" | {headline} / {base} |", "|---" * (len(keys) + 2) + "|"]
    ref = results[base]["recall"][headline]
    for name, s in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{s['recall'][k]:.4f}" for k in keys)
                     + f" | {s['recall'][headline] / ref:.2f}x |")
    return "\n".join(lines)


def layer_table(results: dict, keys: list[str], n_layers: int) -> str:
    cols = [(name, k) for k in keys for name in results]
    lines = ["| layer | " + " | ".join(f"{name} {k}" for name, k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in range(1, n_layers):
        vals = [results[name]["per_layer_recall"][k][m] for name, k in cols]
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def first(trace: tuple, n: int | None) -> tuple:
    """The first n sequences of a trace (all when n is None)."""
    return trace if n is None else take(trace, np.arange(min(n, len(trace[2]) - 1)))


def cmd_trace(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.max_seqs, args.epochs = args.max_seqs or 8, 1
    if args.eval is None and not args.holdout:
        args.eval = str(ROUTING / "gptoss20b_test.npz")
    train = load_trace(args.train)
    if args.holdout:
        perm = np.random.default_rng(args.seed).permutation(len(train[2]) - 1)
        train, evaluation = take(train, np.sort(perm[args.holdout:])), take(train, np.sort(perm[:args.holdout]))
    else:
        evaluation = load_trace(args.eval)
    train, evaluation = first(train, args.max_seqs), first(evaluation, args.max_seqs)
    num_experts = int(max(train[0].max(), evaluation[0].max())) + 1
    n_layers, top_k = train[0].shape[1:]

    shown = set()

    def progress(frac: float, msg: str) -> None:
        if int(frac * 10) not in shown:
            shown.add(int(frac * 10))
            print(f"  training path: {frac:4.0%} {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    path = PathPredictor.fit(*train, num_experts, depth=args.depth, epochs=args.epochs, on_progress=progress,
                             seed=args.seed)
    train_s = time.perf_counter() - t0
    if args.save:
        path.save(args.save)
    predictors = [path, Cooc(train[0], num_experts, args.depth), PrevToken(train[0], num_experts),
                  Frequency(train[0], num_experts)]
    results = {}
    for pred in predictors:
        t0 = time.perf_counter()
        results[pred.name] = replay(pred, *evaluation, depth=args.depth, num_experts=num_experts).summary()
        print(f"  replayed {pred.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    cost = predict_cost_us(path, n_layers, top_k, num_experts, args.depth)
    keys = [f"k{k}_d{d}" for d in range(1, args.depth + 1) for k in (top_k, 2 * top_k)]
    print(f"train: {args.train}" + (f" minus {args.holdout} held-out sequences" if args.holdout else ""))
    print(f"eval: {args.eval or f'{args.holdout} held-out train sequences (seed {args.seed})'}"
          f" ({len(evaluation[0])} tokens, {len(evaluation[2]) - 1} sequences)")
    print(f"path training: {train_s:.1f} s on {args.threads} thread(s), {len(train[0])} tokens, depth {args.depth}, "
          f"{args.epochs} epochs")
    print("path observe+predict per layer (us, CPU): " + ", ".join(f"{k} {v:.0f}" for k, v in cost.items()))
    headline = f"k{2 * top_k}_d1"
    text = recall_table(results, keys, headline) + "\n\n" + layer_table(results, keys[1::2] if args.depth > 1
                                                                       else keys, n_layers)
    print()
    print(text)
    vs = ", ".join(f"{name} {s['recall'][headline] / results['cooc']['recall'][headline]:.2f}x"
                   for name, s in results.items())
    compare = f"recall@{2 * top_k} at lookahead 1 as a ratio to cooc: {vs}"
    print(compare)
    if wants_record(args):
        record("expert predictors' recall@k on routing traces: path vs cooc, prev-token, frequency", text, compare,
               f"Fit on {args.train}" + (f" minus {args.holdout} held-out sequences" if args.holdout else "")
               + f"; reported on {args.eval or f'{args.holdout} held-out train sequences (seed {args.seed})'} "
               f"({len(evaluation[0])} tokens, {len(evaluation[2]) - 1} sequences). `path` trained in {train_s:.0f} s "
               f"({args.threads} thread(s), depth {args.depth}, {args.epochs} epochs); observe+predict per layer: "
               + ", ".join(f"{k} {v:.0f} us" for k, v in cost.items()) + ". Replayed with predictors.evaluate.replay;"
               " recall@k at lookahead d averaged over the forecast layers (RecallMeter.summary()).")
    out = dict(train=args.train, eval=args.eval, holdout=args.holdout, depth=args.depth, epochs=args.epochs,
               seed=args.seed, train_seconds=train_s, threads=args.threads, path_observe_predict_us=cost,
               results=results)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("trace", help="train `path` on one routing trace, compare with baselines on another")
    tr.add_argument("--train", default=str(ROUTING / "gptoss20b_dev.npz"),
                    help="routing trace (npz) to fit on (default: the GPT-OSS-20B dev split)")
    src = tr.add_mutually_exclusive_group()
    src.add_argument("--eval", help="routing trace (npz) to report on (default, without --holdout: the test split)")
    src.add_argument("--holdout", type=int, default=0, help="report on N random train sequences held out of fitting")
    tr.add_argument("--depth", type=int, default=2, help="lookahead in MoE layers")
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    tr.add_argument("--save", help="write the trained predictor here (predictor-path.pt)")
    tr.add_argument("--json", help="write all figures here")
    tr.add_argument("--max-seqs", type=int, default=None, help="use the first N sequences of each trace (quick checks)")
    tr.add_argument("--smoke", action="store_true", help="8 sequences each, 1 epoch; never records")
    add_record_flag(tr)
    tr.set_defaults(func=cmd_trace)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
