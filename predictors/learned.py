"""learned: small per-layer networks trained on recorded traces (ExpertFlow / ProMoE style).

At MoE layer position p, one network per layer reads what the engine just observed there and
forecasts the routing of the next `depth` MoE layers:

    router input h [N, D] --standardize--+
    token id [N] --shared embedding [V+1, C]--+--> Linear -> GELU -> Linear --+--> logits [N, depth, E]
    experts chosen at p [N, K] --multi-hot [E]--+                             |
    h --------------------------- linear skip (a learned lookahead gate) -----+

Scores are softmax probabilities over the E experts of each later layer (like a router's). The
networks are trained by `LearnedPredictor.fit` on a trace's router inputs, token ids and experts
(cross-entropy against the experts actually used); they are stored beside the model as
FILENAME and read back by `from_model_dir`. Token ids the engine does not pass (or ids outside the
vocabulary) use a learned "unknown" row, trained by dropping token ids at random.

What it does not do: look at earlier layers than the one just observed, or across tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import PredictorUnavailable

FILENAME = "predictor-learned.pt"
TRAIN_COMMAND = "moe-engine train-predictor MODEL_DIR --trace T.npz"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LearnedConfig:
    num_layers: int                     # L MoE layers (trace positions)
    hidden_size: int                    # D
    num_experts: int                    # E
    vocab_size: int                     # V; row V of the embedding is the unknown token
    depth: int = 2                      # later MoE layers forecast
    embed_dim: int = 32                 # C
    width: int = 256                    # H
    layers: tuple[int, ...] | None = None   # decoder index of each MoE layer, when known
    top_k: int | None = None            # K experts per token the trace was recorded with

    def __post_init__(self):
        if self.num_layers < 2 or self.depth < 1:
            raise ValueError(f"need at least 2 MoE layers and depth >= 1, got {self.num_layers} and {self.depth}")
        if self.layers is not None and len(self.layers) != self.num_layers:
            raise ValueError(f"layers lists {len(self.layers)} decoder indices for {self.num_layers} MoE layers")


class LayerNets(nn.Module):
    """The P = L - 1 per-layer networks, stacked so training runs them side by side."""

    def __init__(self, cfg: LearnedConfig):
        super().__init__()
        p, d, e, c, h = cfg.num_layers - 1, cfg.hidden_size, cfg.num_experts, cfg.embed_dim, cfg.width
        out = cfg.depth * e
        self.cfg = cfg
        self.embed = nn.Parameter(torch.randn(cfg.vocab_size + 1, c) * 0.5)          # [V+1, C]
        self.w_h = nn.Parameter(torch.randn(p, d, h) / math.sqrt(d))                # [P, D, H]
        self.w_tok = nn.Parameter(torch.randn(p, c, h) / math.sqrt(c))              # [P, C, H]
        self.w_cur = nn.Parameter(torch.randn(p, e, h) / math.sqrt(2))              # [P, E, H]
        self.b_in = nn.Parameter(torch.zeros(p, h))
        self.w_out = nn.Parameter(torch.randn(p, h, out) * 0.1 / math.sqrt(h))      # [P, H, depth*E]
        self.b_out = nn.Parameter(torch.zeros(p, out))
        self.w_skip = nn.Parameter(torch.zeros(p, d, out))                          # [P, D, depth*E]
        self.register_buffer("mean", torch.zeros(p, d))                            # input standardization
        self.register_buffer("inv_std", torch.ones(p, d))

    def forward(self, h: torch.Tensor, tok: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        """All positions: h [B, P, D], tok [B] (V = unknown), cur multi-hot [B, P, E] -> logits [B, P, depth, E]."""
        z = (h - self.mean) * self.inv_std
        emb = self.embed[tok]                                                         # [B, C]
        a = (torch.einsum("bpd,pdh->bph", z, self.w_h) + torch.einsum("bc,pch->bph", emb, self.w_tok)
             + torch.einsum("bpe,peh->bph", cur, self.w_cur) + self.b_in)
        out = (torch.einsum("bph,pho->bpo", nn.functional.gelu(a), self.w_out) + self.b_out
               + torch.einsum("bpd,pdo->bpo", z, self.w_skip))
        return out.view(*out.shape[:2], self.cfg.depth, self.cfg.num_experts)

    def at(self, p: int, h: torch.Tensor, tok: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        """One position: h [N, D], tok [N], cur [N, E] -> logits [N, depth, E]."""
        z = (h - self.mean[p]) * self.inv_std[p]
        a = z @ self.w_h[p] + self.embed[tok] @ self.w_tok[p] + cur @ self.w_cur[p] + self.b_in[p]
        out = nn.functional.gelu(a) @ self.w_out[p] + self.b_out[p] + z @ self.w_skip[p]
        return out.view(-1, self.cfg.depth, self.cfg.num_experts)


def multi_hot(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """experts [..., K] -> [..., E] with 1/K at each chosen expert."""
    out = torch.zeros(*experts.shape[:-1], num_experts, device=experts.device)
    return out.scatter_(-1, experts.long(), 1.0 / experts.shape[-1])


class LearnedPredictor:
    name = "learned"
    FILENAME = FILENAME

    def __init__(self, config: LearnedConfig | None = None, state: dict | None = None):
        if config is None or state is None:
            raise PredictorUnavailable(f"the learned predictor needs trained weights: build it with "
                                       f"LearnedPredictor.from_model_dir(MODEL_DIR) or load(FILE); train them with "
                                       f"`{TRAIN_COMMAND}`")
        self.config = config
        self.nets = LayerNets(config)
        self.nets.load_state_dict(state)
        self.nets.requires_grad_(False).eval()
        self.layers: list[int] = list(range(config.num_layers))
        self._pos_of = {m: i for i, m in enumerate(self.layers)}
        self._pos = -1
        self._scores: torch.Tensor | None = None       # [N, depth, E] forecast made at position _pos

    # ---- the ExpertPredictor protocol ---------------------------------------------------------
    def bind(self, routers: dict, top_k: int, num_experts: int) -> None:
        cfg, found = self.config, sorted(routers)
        hidden = {int(w.shape[-1]) for w in routers.values() if w is not None}
        problems = []
        if len(found) != cfg.num_layers:
            problems.append(f"{len(found)} MoE layers (trained for {cfg.num_layers})")
        elif cfg.layers is not None and found not in (list(cfg.layers), list(range(cfg.num_layers))):
            problems.append(f"MoE layers {found} (trained for decoder layers {list(cfg.layers)})")
        if cfg.top_k is not None and top_k != cfg.top_k:
            problems.append(f"top-{top_k} routing (trained for top-{cfg.top_k})")
        if num_experts != cfg.num_experts:
            problems.append(f"{num_experts} experts per layer (trained for {cfg.num_experts})")
        if hidden and hidden != {cfg.hidden_size}:
            problems.append(f"hidden size {sorted(hidden)} (trained for {cfg.hidden_size})")
        if problems:
            raise PredictorUnavailable(f"the learned predictor does not match this model: {', '.join(problems)}; "
                                       f"retrain it with `{TRAIN_COMMAND}`")
        self.layers, self._pos, self._scores = found, -1, None
        self._pos_of = {m: i for i, m in enumerate(found)}

    @torch.inference_mode()
    def observe(self, layer, router_input, experts, weights, token_ids=None, seq_ids=None) -> None:
        self._pos, self._scores = -1, None
        p = self._pos_of.get(layer, -1)
        if p < 0 or p >= self.config.num_layers - 1 or router_input is None:
            return
        dev = router_input.device
        if dev != self.nets.mean.device:             # run where the hidden states are (no copy back per layer)
            self.nets = self.nets.to(dev)
        n = router_input.shape[0]
        tok = self._token_rows(token_ids, n).to(dev)
        cur = multi_hot(experts.to(dev), self.config.num_experts)
        logits = self.nets.at(p, router_input.float(), tok, cur)
        self._pos, self._scores = p, torch.softmax(logits, dim=-1)                   # [N, depth, E]

    def predict(self, layer: int, depth: int) -> dict[int, torch.Tensor]:
        if self._scores is None or self.layers[self._pos] != layer:
            return {}
        ahead = self.layers[self._pos + 1:self._pos + 1 + min(depth, self.config.depth)]
        return {m: self._scores[:, j] for j, m in enumerate(ahead)}

    def _token_rows(self, token_ids, n: int) -> torch.Tensor:
        unknown = self.config.vocab_size
        if token_ids is None or token_ids.shape[0] != n:
            return torch.full((n,), unknown, dtype=torch.long)
        tok = token_ids.detach().to("cpu", torch.long)
        return torch.where((tok >= 0) & (tok < unknown), tok, unknown)

    # ---- storage ----------------------------------------------------------------------------
    def save(self, path) -> None:
        state = {k: v.to("cpu", torch.float16) for k, v in self.nets.state_dict().items()}
        cfg = asdict(self.config)
        torch.save({"format": "moe-engine/predictor-learned", "version": FORMAT_VERSION,
                    "config": json.dumps(cfg), "state": state}, str(path))

    @classmethod
    def load(cls, path) -> LearnedPredictor:
        path = Path(path)
        if not path.is_file():
            raise PredictorUnavailable(f"no learned predictor at {path}; train one with `{TRAIN_COMMAND}`")
        try:
            blob = torch.load(str(path), map_location="cpu", weights_only=True)
            if blob.get("format") != "moe-engine/predictor-learned" or blob.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {blob.get('format')!r} version {blob.get('version')!r}")
            cfg = json.loads(blob["config"])
            cfg["layers"] = None if cfg.get("layers") is None else tuple(cfg["layers"])
            config = LearnedConfig(**cfg)
            state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state"].items()}
            return cls(config, state)
        except PredictorUnavailable:
            raise
        except Exception as e:   # noqa: BLE001 - any unreadable file gets the same advice
            why = (str(e).strip().splitlines() or [""])[0][:160]
            raise PredictorUnavailable(f"{path} is not a readable learned-predictor file ({type(e).__name__}: {why}); "
                                       f"delete it and retrain with `{TRAIN_COMMAND}`") from None

    @classmethod
    def from_model_dir(cls, model_dir) -> LearnedPredictor:
        model_dir = Path(model_dir)
        path = model_dir / FILENAME
        if not path.is_file():
            raise PredictorUnavailable(f"{model_dir} has no trained learned predictor ({FILENAME} is missing); "
                                       f"record a trace and train it with `{TRAIN_COMMAND}`")
        pred = cls.load(path)
        pred.check_model_config(model_dir / "config.json")
        return pred

    def check_model_config(self, config_json: Path) -> None:
        """Compare hidden size, vocabulary and expert count with a Hugging Face config.json (if readable)."""
        try:
            hf = json.loads(Path(config_json).read_text())
        except (OSError, ValueError):
            return                                   # the engine reports a bad config.json itself
        hf = hf.get("text_config", hf)
        cfg = self.config
        found = {"hidden size": (hf.get("hidden_size"), cfg.hidden_size),
                 "vocabulary": (hf.get("vocab_size"), cfg.vocab_size),
                 "experts": (hf.get("num_local_experts", hf.get("num_experts")), cfg.num_experts)}
        bad = [f"{k} {have} (trained for {want})" for k, (have, want) in found.items() if have is not None and have != want]
        if bad:
            raise PredictorUnavailable(f"{FILENAME} in {Path(config_json).parent} does not match the model: "
                                       f"{', '.join(bad)}; retrain it with `{TRAIN_COMMAND}`")

    # ---- training ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, router_inputs: np.ndarray, token_ids: np.ndarray | None, experts: np.ndarray, num_experts: int,
            vocab_size: int, depth: int = 2, epochs: int = 6, on_progress=None, seed: int = 0,
            layers=None, **hyperparameters) -> LearnedPredictor:
        """Train on a trace: router_inputs [T, L, D], token_ids [T] (or None), experts [T, L, K].

        Hyperparameters: embed_dim, width, lr, batch, weight_decay, token_dropout, val_fraction,
        patience. The last val_fraction of the rows is held out; the epoch with the lowest held-out
        loss is kept. on_progress(done_fraction, message) is called as training goes.
        """
        hp = dict(DEFAULTS)
        unknown = set(hyperparameters) - set(hp)
        if unknown:
            raise TypeError(f"unknown hyperparameters {sorted(unknown)}; known: {sorted(hp)}")
        hp.update(hyperparameters)
        if epochs < 1:
            raise ValueError(f"epochs={epochs}: train for at least one epoch")
        _, n_layers, d = router_inputs.shape
        cfg = LearnedConfig(n_layers, d, num_experts, vocab_size, depth, hp["embed_dim"], hp["width"],
                            None if layers is None else tuple(int(m) for m in layers), int(experts.shape[-1]))
        data = TrainData(router_inputs, token_ids, experts, cfg)
        state = train(cfg, data, epochs, hp, seed, on_progress or (lambda frac, msg: None))
        return cls(cfg, {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()})




DEFAULTS = {"embed_dim": 32, "width": 256, "lr": 2e-3, "batch": 512, "weight_decay": 0.01, "token_dropout": 0.1,
            "val_fraction": 0.05, "patience": 2, "max_train_rows": None}


class TrainData:
    """A trace as training tensors: inputs at positions 0..L-2, targets at the `depth` positions after each."""

    def __init__(self, router_inputs, token_ids, experts, cfg: LearnedConfig):
        t, n_layers = router_inputs.shape[:2]
        if experts.shape[:2] != (t, n_layers) or (token_ids is not None and len(token_ids) != t):
            raise ValueError(f"router_inputs {router_inputs.shape}, experts {experts.shape} and token_ids "
                             f"{None if token_ids is None else len(token_ids)} do not describe the same [T, L] tokens")
        if int(experts.min()) < 0 or int(experts.max()) >= cfg.num_experts:
            raise ValueError(f"expert ids span {int(experts.min())}..{int(experts.max())}, expected 0..{cfg.num_experts - 1}")
        self.cfg = cfg
        self.h = torch.from_numpy(np.ascontiguousarray(router_inputs[:, :-1]))           # [T, P, D] (as stored)
        self.experts = torch.from_numpy(experts.astype(np.int64))                           # [T, L, K]
        tok = np.full(t, cfg.vocab_size) if token_ids is None else np.asarray(token_ids, dtype=np.int64)
        tok = torch.from_numpy(tok)
        self.tok = torch.where((tok >= 0) & (tok < cfg.vocab_size), tok, cfg.vocab_size)    # [T]
        p = n_layers - 1
        src = torch.arange(p)[:, None] + torch.arange(1, cfg.depth + 1)[None]               # [P, depth] target position
        self.valid = src < n_layers
        self.target_pos = src.clamp(max=n_layers - 1)

    def __len__(self) -> int:
        return self.h.shape[0]

    def batch(self, rows: torch.Tensor):
        """rows [B] -> h [B, P, D] float32, tok [B], cur [B, P, E], target [B, P, depth, E]."""
        ex = self.experts[rows]                                                             # [B, L, K]
        e = self.cfg.num_experts
        return (self.h[rows].float(), self.tok[rows], multi_hot(ex[:, :-1], e),
                multi_hot(ex[:, self.target_pos], e))

    def stats(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position mean and 1/std of the router inputs over `rows`: [P, D] each."""
        h = self.h[rows].float()
        return h.mean(0), 1.0 / (h.std(0) + 1e-4)


def loss_of(nets: LayerNets, data: TrainData, rows: torch.Tensor, drop: float = 0.0, gen=None):
    """Mean cross-entropy of the forecasts against the experts used, over valid (position, lookahead) pairs."""
    h, tok, cur, target = data.batch(rows)
    if drop:
        tok = torch.where(torch.rand(tok.shape, generator=gen) < drop, data.cfg.vocab_size, tok)
    logp = torch.log_softmax(nets(h, tok, cur), dim=-1)                                   # [B, P, depth, E]
    ce = -(target * logp).sum(-1)                                                         # [B, P, depth]
    return ce[:, data.valid].mean(), logp


@torch.no_grad()
def evaluate(nets: LayerNets, data: TrainData, rows: torch.Tensor, top_k: int, chunk: int = 8192):
    """(loss, recall@top_k) over `rows` with token ids given."""
    losses, hits, total = [], 0, 0
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        loss, logp = loss_of(nets, data, part)
        losses.append(float(loss) * len(part))
        top = logp.topk(top_k, dim=-1).indices                                            # [B, P, depth, k]
        used = data.experts[part][:, data.target_pos]                                     # [B, P, depth, K]
        hit = (used[..., :, None] == top[..., None, :]).any(-1)[:, data.valid]
        hits, total = hits + int(hit.sum()), total + hit.numel()
    return sum(losses) / max(len(rows), 1), hits / max(total, 1)


def train(cfg: LearnedConfig, data: TrainData, epochs: int, hp: dict, seed: int, on_progress) -> dict:
    """AdamW with warm-up and cosine decay; returns the state of the epoch with the lowest held-out loss."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    n_val = max(int(n * hp["val_fraction"]), 1) if hp["val_fraction"] else 0
    train_rows, val_rows = torch.arange(n - n_val), torch.arange(n - n_val, n)
    if hp["max_train_rows"] and len(train_rows) > hp["max_train_rows"]:
        train_rows = train_rows[torch.randperm(len(train_rows), generator=gen)[:hp["max_train_rows"]]].sort().values
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        nets = LayerNets(cfg)
    sample = train_rows[torch.randperm(len(train_rows), generator=gen)[:50_000]]
    nets.mean, nets.inv_std = data.stats(sample)
    batch = hp["batch"]
    steps_per_epoch = max(len(train_rows) // batch, 1)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(nets.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    warm = min(100, total // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))) * 0.9 + 0.1))
    best, best_loss, since_best, step = None, math.inf, 0, 0
    top_k = data.experts.shape[-1]
    for epoch in range(epochs):
        nets.train()
        order = train_rows[torch.randperm(len(train_rows), generator=gen)]
        for i in range(steps_per_epoch):
            loss, _ = loss_of(nets, data, order[i * batch:(i + 1) * batch], hp["token_dropout"], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                on_progress(step / total, f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
        nets.eval()
        rows = val_rows if n_val else train_rows[:8192]
        val_loss, val_recall = evaluate(nets, data, rows, top_k)
        on_progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs} held-out loss {val_loss:.4f} "
                                          f"recall@{top_k} {val_recall:.4f}")
        if val_loss < best_loss:
            best, best_loss, since_best = {k: v.detach().clone() for k, v in nets.state_dict().items()}, val_loss, 0
        else:
            since_best += 1
            if since_best >= hp["patience"]:
                break
    return best
