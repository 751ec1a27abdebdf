"""path: forecasts routing from the experts already chosen; no hidden states needed.

For target MoE layer t at lookahead d (the forecast is made when layer m = t - d has routed), a
linear softmax model over the E experts reads three groups of features of the token:

    cur   this token's experts at layers <= m, multi-hot and the same weighted by routing prob   [2 L E]
    prev  the previous token's experts at every layer (temporal reuse; the previous token's deep
          layers also carry what the model expected next)                                       [L E]
    hist  decayed use over all earlier tokens of the sequence at layers t-W..t+W, one per decay  [nd (2W+1) E]

Weights per lookahead d: `w{d}` [L-d, 3 L E + nd (2W+1) E, E] (one block per target t = d..L-1;
cur rows of layers > t - d are zero, so a forecast never reads a layer that has not run) and
`b{d}` [L-d, E]. Trained by softmax cross-entropy against the K experts used (uniform target).

It works on any routing trace (layers = positions 0..L-1) and in the engine (decoder layer ids;
`sorted(routers)` gives the positions). Per-sequence state (previous token, decayed history) is
kept in slots keyed by seq id; a step is committed when the next one begins. All tokens of one
step read the history as it was before the step, so the rows of a prefill chunk do not see each
other (cheap, and decode steps are exact). It does not learn from the engine's traffic at run time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import PredictorUnavailable

FILENAME = "predictor-path.pt"
TRAIN_HINT = "retrain with `moe-engine train-predictor MODEL_DIR --kind path --trace T.npz`"
DEFAULTS = dict(decays=(0.8, 0.95), window=2, epochs=3, lr=0.02, batch_size=2048, weight_decay=0.0,
                max_seqs=1024)
VERSION = 1
FORMAT = "moe-engine path predictor"


def _onehot(gid: torch.Tensor, vals: torch.Tensor | float, width: int) -> torch.Tensor:
    """[N, F] dense rows with `vals` at the flat ids gid [N, J]."""
    out = torch.zeros(gid.shape[0], width)
    return out.scatter_(1, gid, vals if torch.is_tensor(vals) else torch.full(gid.shape, float(vals)))


def _windows(hist: torch.Tensor, targets: slice | int, window: int) -> torch.Tensor:
    """hist [N, nd, L + 2W, E] (padded) -> features of the targets' layer windows [N, (T,) nd E (2W+1)]."""
    win = hist.unfold(2, 2 * window + 1, 1)[:, :, targets]          # [N, nd, (T,) E, 2W+1]
    if win.dim() == 4:
        return win.reshape(win.shape[0], -1)
    return win.permute(0, 2, 1, 3, 4).reshape(win.shape[0], win.shape[2], -1)


class _Trace:
    """A routing trace as training inputs: flat expert ids, previous rows, decayed history."""

    def __init__(self, experts: np.ndarray, probs: np.ndarray, seq_offsets: np.ndarray, num_experts: int,
                 decays: tuple[float, ...], window: int, dtype: torch.dtype = torch.float16):
        t_rows, n_layers, top_k = experts.shape
        self.L, self.E, self.K, self.W = n_layers, num_experts, top_k, window
        ex = torch.from_numpy(np.asarray(experts, dtype=np.int64))
        self.gid = (ex + torch.arange(n_layers)[None, :, None] * num_experts).reshape(t_rows, -1)   # [T, L K]
        self.probs = torch.from_numpy(np.asarray(probs, dtype=np.float32)).reshape(t_rows, -1)     # [T, L K]
        so = np.asarray(seq_offsets, dtype=np.int64)
        pos = np.arange(t_rows) - np.repeat(so[:-1], np.diff(so))
        self.prev = torch.from_numpy(np.where(pos > 0, np.arange(t_rows) - 1, -1))                 # [T]
        self.hist = self._history(so, decays, dtype)                                               # [T, nd, L+2W, E]

    def _history(self, so: np.ndarray, decays, dtype: torch.dtype) -> torch.Tensor:
        """Decayed use before each row, per sequence: h_i = sum_{j<i} (1-lam) lam^(i-1-j) u_j."""
        starts, lens = torch.from_numpy(so[:-1]), torch.from_numpy(np.diff(so))
        lam = torch.tensor(decays, dtype=torch.float32)[None, :, None]
        out = torch.zeros(len(self.gid), len(decays), self.L + 2 * self.W, self.E, dtype=dtype)
        h = torch.zeros(len(starts), len(decays), self.L * self.E)
        for p in range(int(lens.max()) if len(lens) else 0):
            live = torch.nonzero(lens > p).squeeze(1)
            rows = starts[live] + p
            out[rows, :, self.W:self.L + self.W] = h[live].view(-1, len(decays), self.L, self.E).to(dtype)
            u = _onehot(self.gid[rows], 1.0, self.L * self.E)[:, None]
            h[live] = lam * h[live] + (1 - lam) * u
        return out

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense features of `rows`: x [n, 3 L E] (cur binary, cur weighted, prev) and hist [n, nd, L+2W, E]."""
        le = self.L * self.E
        gid = self.gid[rows]
        x = _onehot(gid, 1.0, 3 * le)
        x.scatter_(1, gid + le, self.probs[rows])
        prev = self.prev[rows]
        has = torch.nonzero(prev >= 0).squeeze(1)
        x[has] = x[has].scatter_(1, self.gid[prev[has]] + 2 * le, 1.0)
        return x, self.hist[rows].float()


def _cur_mask(n_layers: int, num_experts: int, d: int) -> torch.Tensor:
    """[3 L E, (L-d) E]: 1 where target t = d..L-1 may read the feature (cur rows only at layers <= t - d)."""
    f = torch.arange(3 * n_layers * num_experts)
    seen = (f // num_experts % n_layers)[:, None] <= torch.arange(n_layers - d)[None]   # layer <= t - d
    readable = (f >= 2 * n_layers * num_experts)[:, None] | seen                        # [F_x, L-d]
    return readable.float().repeat_interleave(num_experts, dim=1)


def _fit_depth(tr: _Trace, rows: torch.Tensor, d: int, hp: dict, gen: torch.Generator, progress) -> tuple:
    """Weights [L-d, F, E] and bias [L-d, E] for lookahead d, Adam with a one-cycle schedule."""
    n_t, le3, nh = tr.L - d, 3 * tr.L * tr.E, len(hp["decays"]) * (2 * tr.W + 1) * tr.E
    mask_x = _cur_mask(tr.L, tr.E, d)                               # [F_x, (L-d) E]
    w_x = torch.zeros(le3, n_t * tr.E, requires_grad=True)          # [F_x, (L-d) E]
    w_h = torch.zeros(n_t, nh, tr.E, requires_grad=True)             # [L-d, F_h, E]
    bias = torch.zeros(n_t, tr.E, requires_grad=True)
    opt = torch.optim.Adam([w_x, w_h, bias], lr=hp["lr"], weight_decay=hp["weight_decay"])
    bs, epochs = int(hp["batch_size"]), int(hp["epochs"])
    n_steps = max(1, epochs * -(-len(rows) // bs))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=n_steps, pct_start=0.1)
    step = 0
    for _ in range(epochs):
        for chunk in rows[torch.randperm(len(rows), generator=gen)].split(bs):
            x, hist = tr.inputs(chunk)
            logits = (x @ (w_x * mask_x)).view(-1, n_t, tr.E)
            logits = logits + torch.bmm(_windows(hist, slice(d, None), tr.W).transpose(0, 1), w_h).transpose(0, 1)
            loss = -(torch.log_softmax(logits + bias, -1) * _targets(tr, chunk, d)).sum(-1).mean(0).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0 or step == n_steps:
                progress(step / n_steps, f"lookahead {d}: loss {loss.item() / n_t:.3f}")
    w = torch.cat([(w_x * mask_x).detach().view(le3, n_t, tr.E).permute(1, 0, 2), w_h.detach()], 1)
    return w.contiguous(), bias.detach().clone()


def _targets(tr: _Trace, rows: torch.Tensor, d: int) -> torch.Tensor:
    """[n, L-d, E]: 1/K on the experts each target layer used."""
    ex = tr.gid[rows].view(-1, tr.L, tr.K)[:, d:] % tr.E            # [n, L-d, K]
    return torch.zeros(len(rows), tr.L - d, tr.E).scatter_(2, ex, 1.0 / tr.K)


class PathPredictor:
    """Routing-path predictor (see the module docstring); build with `fit`, `load` or `from_model_dir`."""

    name = "path"
    FILENAME = FILENAME

    def __init__(self, weights: dict[str, torch.Tensor], config: dict):
        self.config = dict(config)
        self.L, self.E, self.K = (int(config[k]) for k in ("num_layers", "num_experts", "top_k"))
        self.depth, self.W = int(config["depth"]), int(config["window"])
        self.decays = tuple(float(x) for x in config["decays"])
        self.max_seqs = int(config.get("max_seqs", DEFAULTS["max_seqs"]))
        n_in = 3 * self.L * self.E + len(self.decays) * (2 * self.W + 1) * self.E
        self.w, self.b = [], []
        for d in range(1, self.depth + 1):
            w, b = weights.get(f"w{d}"), weights.get(f"b{d}")
            want = (self.L - d, n_in, self.E)
            if _shape(w) != list(want) or _shape(b) != [self.L - d, self.E]:
                raise PredictorUnavailable(f"path predictor weights for lookahead {d}: expected w{d} {list(want)} and "
                                           f"b{d} {[self.L - d, self.E]}, found {_shape(w)} and {_shape(b)}; {TRAIN_HINT}")
            self.w.append(w.float().contiguous())
            self.b.append(b.float().contiguous())
        self.bind({m: None for m in range(self.L)}, self.K, self.E)

    # --- training and storage --------------------------------------------------------------------

    @classmethod
    def fit(cls, experts: np.ndarray, probs: np.ndarray, seq_offsets: np.ndarray, num_experts: int, depth: int = 2,
            epochs: int = DEFAULTS["epochs"], on_progress=None, seed: int = 0, **hyper) -> PathPredictor:
        """Trains on a routing trace: experts/probs [T, L, K] (experts by weight desc), seq_offsets [S+1].

        Hyperparameters (DEFAULTS): decays, window, lr, batch_size, weight_decay, max_seqs.
        on_progress(done_fraction, message) is called now and then. Deterministic for a given seed.
        """
        unknown = set(hyper) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"PathPredictor.fit: unknown hyperparameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        hp = {**DEFAULTS, **hyper, "epochs": int(epochs), "decays": tuple(float(x) for x in hyper.get(
            "decays", DEFAULTS["decays"]))}
        _check_trace(experts, probs, seq_offsets, num_experts, depth)
        gen = torch.Generator().manual_seed(int(seed))
        tr = _Trace(experts, probs, seq_offsets, int(num_experts), hp["decays"], int(hp["window"]))
        rows = torch.arange(experts.shape[0])
        weights, progress = {}, on_progress or (lambda f, m: None)
        for d in range(1, depth + 1):
            def report(f, msg, d=d):
                progress((d - 1 + f) / depth, msg)
            weights[f"w{d}"], weights[f"b{d}"] = _fit_depth(tr, rows, d, hp, gen, report)
        config = dict(version=VERSION, num_layers=tr.L, num_experts=tr.E, top_k=tr.K, depth=int(depth),
                      decays=list(hp["decays"]), window=int(hp["window"]), max_seqs=int(hp["max_seqs"]),
                      trained_on=dict(tokens=int(experts.shape[0]), sequences=len(seq_offsets) - 1, seed=int(seed),
                                      epochs=hp["epochs"], lr=float(hp["lr"]), batch_size=int(hp["batch_size"]),
                                      weight_decay=float(hp["weight_decay"])))
        return cls(weights, config)

    def save(self, path) -> None:
        weights = {f"w{d + 1}": w.cpu() for d, w in enumerate(self.w)}
        weights.update({f"b{d + 1}": b.cpu() for d, b in enumerate(self.b)})
        torch.save({"format": FORMAT, "config": self.config, "weights": weights}, path)

    @classmethod
    def load(cls, path) -> PathPredictor:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise PredictorUnavailable(f"path predictor: {path} not found; {TRAIN_HINT}") from None
        except Exception as e:
            raise PredictorUnavailable(f"path predictor: {path} is not a readable predictor file "
                                       f"({type(e).__name__}: {e}); {TRAIN_HINT}") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise PredictorUnavailable(f"path predictor: {path} is not a path-predictor file (no format tag "
                                       f"'{FORMAT}'); {TRAIN_HINT}")
        config, weights = blob.get("config"), blob.get("weights")
        if not isinstance(config, dict) or config.get("version") != VERSION or not isinstance(weights, dict):
            raise PredictorUnavailable(f"path predictor: {path} has format version "
                                       f"{config.get('version') if isinstance(config, dict) else None}, this code reads "
                                       f"version {VERSION}; {TRAIN_HINT}")
        try:
            return cls(weights, config)
        except PredictorUnavailable as e:
            raise PredictorUnavailable(f"{path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise PredictorUnavailable(f"path predictor: {path} has a broken config ({type(e).__name__}: {e}); "
                                       f"{TRAIN_HINT}") from None

    @classmethod
    def from_model_dir(cls, model_dir) -> PathPredictor:
        path = Path(model_dir) / FILENAME
        if not path.is_file():
            raise PredictorUnavailable(f"the path predictor is not trained for this model: {path} is missing; "
                                       f"{TRAIN_HINT}")
        return cls.load(path)

    @torch.no_grad()
    def score_trace(self, experts: np.ndarray, probs: np.ndarray, seq_offsets: np.ndarray,
                    chunk: int = 4096) -> list[torch.Tensor]:
        """Vectorized twin of observe/predict over a whole trace: per lookahead d, scores [T, L-d, E]."""
        _check_trace(experts, probs, seq_offsets, self.E, self.depth)
        tr = _Trace(experts, probs, seq_offsets, self.E, self.decays, self.W, torch.float32)
        out = [torch.empty(experts.shape[0], self.L - d, self.E) for d in range(1, self.depth + 1)]
        n_x = 3 * self.L * self.E
        for rows in torch.arange(experts.shape[0]).split(chunk):
            x, hist = tr.inputs(rows)
            for d, (w, b) in enumerate(zip(self.w, self.b), start=1):
                s = torch.einsum("nf,tfe->nte", x, w[:, :n_x].cpu())      # w is zero on layers > t - d
                s += torch.bmm(_windows(hist, slice(d, None), self.W).transpose(0, 1), w[:, n_x:].cpu()).transpose(0, 1)
                out[d - 1][rows] = s + b.cpu()
        return out

    # --- protocol ---------------------------------------------------------------------------------

    def bind(self, routers: dict, top_k: int, num_experts: int) -> None:
        """Maps MoE layer ids to positions 0..L-1 and checks the model matches what was trained."""
        wrong = [f"{what}: trained for {want}, this model has {got}" for what, want, got in (
            ("MoE layers", self.L, len(routers)), ("experts per layer", self.E, int(num_experts)),
            ("top-k", self.K, int(top_k))) if want != got]
        if wrong:
            raise PredictorUnavailable(f"path predictor does not fit this model ({'; '.join(wrong)}); "
                                       f"{TRAIN_HINT} (a trace of this model)")
        self.layers = sorted(routers)
        self._pos = {m: i for i, m in enumerate(self.layers)}
        self._reset_state()

    def observe(self, layer, router_input, experts, weights, token_ids=None, seq_ids=None) -> None:
        pos = self._position(layer)
        n = experts.shape[0]
        if self._x is None or pos <= self._last or n != self._x.shape[0]:
            self._begin_step(seq_ids, n, experts.device)
        gid = experts.long().to(self._x.device) + pos * self.E                    # [N, K]
        self._x.scatter_(1, gid, 1.0)
        self._x.scatter_(1, gid + self.L * self.E, weights.float().to(self._x.device))
        self._last = pos

    @torch.no_grad()
    def predict(self, layer: int, depth: int) -> dict[int, torch.Tensor]:
        pos = self._position(layer)
        if self._x is None or pos != self._last:
            return {}
        out, n_x = {}, self._x.shape[1]
        for d in range(1, min(depth, self.depth) + 1):
            t = pos + d
            if t >= self.L:
                break
            w = self.w[d - 1][t - d]                                              # [F, E]
            out[self.layers[t]] = self._x @ w[:n_x] + _windows(self._h, t, self.W) @ w[n_x:] + self.b[d - 1][t - d]
        return out

    # --- per-sequence state -------------------------------------------------------------------------

    def _position(self, layer: int) -> int:
        if layer not in self._pos:
            raise ValueError(f"path predictor: layer {layer} is not one of the bound MoE layers {self.layers}")
        return self._pos[layer]

    def _reset_state(self) -> None:
        self._slot: dict[int, int] = {}                   # seq id -> slot
        self._owner: list[int | None] = []                # slot -> seq id
        self._prev = torch.zeros(0, self.L * self.E)      # [S, L E] previous token's experts
        self._hist = torch.zeros(0, len(self.decays), self.L + 2 * self.W, self.E)   # [S, nd, L+2W, E] padded
        self._seen = torch.zeros(0, dtype=torch.long)     # [S] step that last used the slot
        self._step, self._last = 0, -1
        self._x = self._h = self._rows = None             # this step: [N, 3 L E], [N, nd, L+2W, E], [N]

    def _begin_step(self, seq_ids: torch.Tensor | None, n: int, device: torch.device) -> None:
        """Commits the step that ran, then gathers the state of this step's sequences."""
        self._commit()
        self._step += 1
        ids = torch.arange(n) if seq_ids is None else seq_ids.detach().long().cpu()
        if ids.shape != (n,):
            raise ValueError(f"path predictor: seq_ids {list(ids.shape)} do not match {n} tokens")
        uniq, inv = torch.unique(ids, return_inverse=True)
        slots = torch.tensor([self._slot_of(int(s)) for s in uniq], dtype=torch.long)
        self._rows = slots[inv]
        if self._prev.device != device:
            self._to(device)
        rows = self._rows.to(device)
        self._x = torch.zeros(n, 3 * self.L * self.E, device=device)
        self._x[:, 2 * self.L * self.E:] = self._prev[rows]
        self._h = self._hist[rows]
        self._last = -1

    def _commit(self) -> None:
        """Folds the last step's tokens into their sequences' state, in row order within a sequence."""
        if self._x is None:
            return
        le, dev = self.L * self.E, self._x.device
        u = self._x[:, :le]                                                       # [N, L E] binary
        uniq, inv, counts = torch.unique(self._rows, return_inverse=True, return_counts=True)
        order = torch.argsort(inv, stable=True)
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(len(inv)) - (torch.cumsum(counts, 0) - counts)[inv[order]]
        ahead = (counts[inv] - 1 - rank).to(dev)                                  # later tokens of the same seq
        lam = torch.tensor(self.decays, device=dev)
        coef = (1 - lam) * lam[None] ** ahead[:, None]                            # [N, nd]
        slots, inv = uniq.to(dev), inv.to(dev)
        new = self._hist[slots, :, self.W:self.W + self.L].reshape(len(slots), len(lam), le)
        new = new * lam[None, :, None] ** counts.to(dev)[:, None, None]
        new.index_add_(0, inv, coef[:, :, None] * u[:, None])
        self._hist[slots, :, self.W:self.W + self.L] = new.view(len(slots), len(lam), self.L, self.E)
        last = ahead == 0
        self._prev[self._rows.to(dev)[last]] = u[last]
        self._x = self._h = None

    def _slot_of(self, seq: int) -> int:
        """The slot of `seq`; a new sequence takes a fresh slot, or past `max_seqs` the one idle longest."""
        slot = self._slot.get(seq)
        if slot is None:
            idle = torch.nonzero(self._seen[:len(self._owner)] < self._step).squeeze(1)
            if len(self._owner) < self.max_seqs or len(idle) == 0:
                slot = len(self._owner)
                self._owner.append(None)
                if slot == len(self._seen):
                    self._grow(max(16, 2 * slot))
            else:
                slot = int(idle[torch.argmin(self._seen[idle])])
                del self._slot[self._owner[slot]]
                self._prev[slot] = 0
                self._hist[slot] = 0
            self._slot[seq], self._owner[slot] = slot, seq
        self._seen[slot] = self._step
        return slot

    def _grow(self, size: int) -> None:
        extra = size - len(self._seen)
        self._prev = torch.cat([self._prev, self._prev.new_zeros(extra, *self._prev.shape[1:])])
        self._hist = torch.cat([self._hist, self._hist.new_zeros(extra, *self._hist.shape[1:])])
        self._seen = torch.cat([self._seen, self._seen.new_zeros(extra)])

    def _to(self, device: torch.device) -> None:
        self.w = [w.to(device) for w in self.w]
        self.b = [b.to(device) for b in self.b]
        self._prev, self._hist = self._prev.to(device), self._hist.to(device)


def _shape(t) -> list | None:
    return list(t.shape) if torch.is_tensor(t) else None


def _check_trace(experts, probs, seq_offsets, num_experts: int, depth: int) -> None:
    """Raises ValueError naming what is wrong with a trace's arrays."""
    if experts.ndim != 3 or probs.shape != experts.shape:
        raise ValueError(f"trace: experts [T, L, K] and probs of the same shape expected, got "
                         f"{list(experts.shape)} and {list(probs.shape)}")
    so = np.asarray(seq_offsets)
    if so.ndim != 1 or len(so) < 2 or so[0] != 0 or so[-1] != experts.shape[0] or np.any(np.diff(so) < 0):
        raise ValueError(f"trace: seq_offsets must rise from 0 to T={experts.shape[0]}, got {so[:3]}...{so[-2:]}")
    if experts.size and (experts.min() < 0 or experts.max() >= num_experts):
        raise ValueError(f"trace: expert ids must be in [0, {num_experts}), found {experts.min()}..{experts.max()}")
    if experts.shape[0] == 0:
        raise ValueError("trace: no tokens")
    if not 1 <= depth < experts.shape[1]:
        raise ValueError(f"depth must be in 1..{experts.shape[1] - 1} (L - 1), got {depth}")
