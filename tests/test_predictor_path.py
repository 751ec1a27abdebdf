"""The `path` predictor: learns planted inter-layer and temporal patterns, its streaming state
matches the vectorized twin, prefill chunks fold into history like single steps, storage and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from predictors.base import PredictorUnavailable
from predictors.evaluate import replay
from predictors.path import FILENAME, PathPredictor

L, E, K = 5, 16, 2
FAST = dict(epochs=6, lr=0.05, batch_size=128)


def _offsets(rng, n_seq: int, lo: int = 20, hi: int = 60) -> np.ndarray:
    return np.r_[0, np.cumsum(rng.integers(lo, hi, n_seq))].astype(np.int64)


def chain_trace(seed: int = 0, n_seq: int = 40, pattern: int = 0) -> tuple:
    """Layer l+1 uses perm_l(expert at layer l) (perms drawn from `pattern`); layer 0 random per token."""
    perms = [np.random.default_rng([pattern, m]).permutation(E) for m in range(L)]
    rng = np.random.default_rng(seed)
    so = _offsets(rng, n_seq)
    ex = np.zeros((so[-1], L, K), dtype=np.int64)
    ex[:, 0] = np.stack([rng.choice(E, K, replace=False) for _ in range(so[-1])])
    for m in range(1, L):
        ex[:, m] = perms[m][ex[:, m - 1]]
    probs = np.sort(rng.dirichlet(np.ones(K), size=(so[-1], L)), -1)[..., ::-1].astype(np.float32)
    return ex, probs, so


def reuse_trace(seed: int = 1, n_seq: int = 400) -> tuple:
    """Each (short) sequence repeats one random expert set per layer, independent across layers and sequences."""
    rng = np.random.default_rng(seed)
    so = _offsets(rng, n_seq, 4, 12)
    ex = np.zeros((so[-1], L, K), dtype=np.int64)
    for a, b in zip(so[:-1], so[1:]):
        ex[a:b] = np.stack([rng.choice(E, K, replace=False) for _ in range(L)])[None]
    return ex, np.full(ex.shape, 1.0 / K, dtype=np.float32), so


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chain(one_thread):
    ex, pr, so = chain_trace()
    return PathPredictor.fit(ex, pr, so, E, depth=2, **FAST), (ex, pr, so)


class Recorder:
    """Wraps a predictor and keeps every prediction (layer -> target -> list of [N, E])."""

    def __init__(self, inner):
        self.inner, self.name, self.out = inner, inner.name, []

    def bind(self, *a):
        self.inner.bind(*a)

    def observe(self, *a):
        self.inner.observe(*a)

    def predict(self, layer, depth):
        p = self.inner.predict(layer, depth)
        self.out.append((layer, {t: s.clone() for t, s in p.items()}))
        return p


def test_learns_inter_layer_pattern(chain):
    pred, _ = chain
    rec = replay(pred, *chain_trace(seed=5, n_seq=15), depth=2).summary()["recall"]    # held-out tokens
    assert rec["k2_d1"] > 0.9 and rec["k2_d2"] > 0.9       # chance: K / E = 0.125
    other = replay(pred, *chain_trace(seed=5, n_seq=15, pattern=1), depth=2).summary()["recall"]
    assert other["k2_d1"] < 0.5                          # other permutations: it learned the planted pattern


def test_learns_temporal_reuse():
    ex, pr, so = reuse_trace()
    pred = PathPredictor.fit(ex, pr, so, E, depth=1, **{**FAST, "epochs": 20})
    held = reuse_trace(seed=7, n_seq=50)
    rec = replay(pred, *held, depth=1).summary()["recall"]["k2_d1"]
    first_share = (len(held[2]) - 1) / held[2][-1]       # first tokens have no history: chance K / E
    assert rec > 0.9 * (1 - first_share)


def test_forecast_reads_only_layers_that_ran(chain):
    """Scores for layer t at lookahead d ignore this token's layers > t - d; every target reads the previous token."""
    pred, (ex, pr, so) = chain
    sub = so[:3]
    base = pred.score_trace(ex[:sub[-1]], pr[:sub[-1]], sub)
    row = sub[1] + 2                                      # a token with history, in the second sequence
    for m in range(L):
        moved = ex[:sub[-1]].copy()
        moved[row, m:] = (moved[row, m:] + 1) % E         # change this token's layers >= m only
        after = pred.score_trace(moved, pr[:sub[-1]], sub)
        for d in range(1, pred.depth + 1):
            t = m - 1 + d                                 # forecast made at layer m - 1
            if d <= t < L:
                torch.testing.assert_close(after[d - 1][row, t - d], base[d - 1][row, t - d])
            if m > 0 and t < L:
                assert not torch.equal(after[d - 1][row + 1, m - 1], base[d - 1][row + 1, m - 1])  # next token sees it
    le = L * E
    for d, w in enumerate(pred.w, start=1):
        assert all(w[t - d, 2 * le:3 * le].abs().sum() > 0 for t in range(d, L))


def test_streaming_matches_vectorized_twin(chain):
    pred, (ex, pr, so) = chain
    rec = Recorder(pred)
    sub = so[:4]
    replay(rec, ex[:sub[-1]], pr[:sub[-1]], sub, depth=2, batch=3)
    offline = pred.score_trace(ex[:sub[-1]], pr[:sub[-1]], sub)
    # replay order: batches of 3 sequences, step t, layer m -> rows starts[live] + t
    got = {}
    for first in range(0, len(sub) - 1, 3):
        seqs = np.arange(first, min(first + 3, len(sub) - 1))
        for t in range(int(np.diff(sub)[seqs].max())):
            rows = sub[seqs][t < np.diff(sub)[seqs]] + t
            for m in range(L):
                layer, p = rec.out.pop(0)
                assert layer == m
                for target, s in p.items():
                    got.setdefault(target - m, []).append((rows, target, s))
    for d, items in got.items():
        for rows, target, s in items:
            torch.testing.assert_close(s, offline[d - 1][rows, target - d], atol=1e-4, rtol=1e-4)


def _drive(pred, steps, layers):
    """Feeds steps [(experts [N, L, K], seq_ids [N])]; returns the predictions of the last step per layer."""
    out = []
    for ex, sid in steps:
        out = []
        for i, m in enumerate(layers):
            e = torch.as_tensor(ex[:, i])
            pred.observe(m, None, e, torch.full(e.shape, 1.0 / K), None, torch.as_tensor(sid))
            out.append(pred.predict(m, 2))
    return out


def test_shapes_engine_layers_and_prefill(chain):
    pred, (ex, _, _) = chain
    layers = [1, 3, 4, 7, 9]                              # decoder indices of the MoE layers
    pred.bind({m: None for m in layers}, K, E)
    steps = [(ex[:5], [7, 7, 7, 7, 7]), (ex[5:9], [7, 8, 9, 9]), (ex[9:10], [8]), (ex[10:13], [7, 8, 9])]
    for n in range(1, len(steps) + 1):
        for i, p in enumerate(_drive(pred, steps[:n], layers)):
            assert sorted(p) == layers[i + 1:i + 3]
            for s in p.values():
                assert s.shape == (len(steps[n - 1][1]), E) and torch.isfinite(s).all()
    pred.bind({m: None for m in range(L)}, K, E)


def test_prefill_chunk_folds_like_single_steps(chain):
    pred, (ex, _, _) = chain
    layers = list(range(L))
    pred.bind({m: None for m in layers}, K, E)
    chunked = _drive(pred, [(ex[:6], [3] * 6), (ex[6:7], [3])], layers)
    pred.bind({m: None for m in layers}, K, E)
    single = _drive(pred, [(ex[i:i + 1], [3]) for i in range(7)], layers)
    for a, b in zip(chunked, single):
        for t in a:
            torch.testing.assert_close(a[t], b[t], atol=1e-5, rtol=1e-5)
    pred.bind({m: None for m in layers}, K, E)
    fresh = _drive(pred, [(ex[6:7], [3])], layers)
    assert any(not torch.allclose(a[t], f[t]) for a, f in zip(chunked, fresh) for t in a)   # history matters


def test_state_is_bounded_and_evicted_sequences_restart(chain):
    pred, (ex, _, _) = chain
    pred.max_seqs = 2
    layers = list(range(L))
    pred.bind({m: None for m in layers}, K, E)
    _drive(pred, [(ex[0:2], [10, 11]), (ex[2:3], [12]), (ex[3:4], [13])], layers)
    assert len(pred._owner) == 2 and set(pred._slot) == {12, 13}
    again = _drive(pred, [(ex[4:5], [10])], layers)       # 10 was evicted: no history
    pred.bind({m: None for m in layers}, K, E)
    fresh = _drive(pred, [(ex[4:5], [99])], layers)
    for a, b in zip(again, fresh):
        for t in a:
            torch.testing.assert_close(a[t], b[t])
    pred.max_seqs = 1024


def test_save_load_round_trip_and_determinism(chain, tmp_path):
    pred, (ex, pr, so) = chain
    pred.save(tmp_path / FILENAME)
    loaded = PathPredictor.from_model_dir(tmp_path)
    sub = so[:3]
    a, b = Recorder(pred), Recorder(loaded)
    replay(a, ex[:sub[-1]], pr[:sub[-1]], sub, depth=2)
    replay(b, ex[:sub[-1]], pr[:sub[-1]], sub, depth=2)
    assert len(a.out) == len(b.out) > 0
    for (la, pa), (lb, pb) in zip(a.out, b.out):
        assert la == lb and pa.keys() == pb.keys()
        assert all(torch.equal(pa[t], pb[t]) for t in pa)
    again = PathPredictor.fit(ex, pr, so, E, depth=2, **FAST)
    assert all(torch.equal(x, y) for x, y in zip(pred.w + pred.b, again.w + again.b))


def test_mismatch_and_bad_files_name_the_fix(chain, tmp_path):
    pred, _ = chain
    for layers, k, e, what in [(L + 1, K, E, f"MoE layers: trained for {L}, this model has {L + 1}"),
                               (L, K + 1, E, f"top-k: trained for {K}, this model has {K + 1}"),
                               (L, K, 2 * E, f"experts per layer: trained for {E}, this model has {2 * E}")]:
        with pytest.raises(PredictorUnavailable, match="train-predictor") as err:
            pred.bind({m: None for m in range(layers)}, k, e)
        assert what in str(err.value) and str(err.value).count("trained for") == 1
    pred.bind({m: None for m in range(L)}, K, E)
    with pytest.raises(PredictorUnavailable, match=FILENAME):
        PathPredictor.from_model_dir(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(PredictorUnavailable, match="not a readable"):
        PathPredictor.load(bad)
    torch.save({"weights": {}}, bad)
    with pytest.raises(PredictorUnavailable, match="format tag"):
        PathPredictor.load(bad)
    pred.save(bad)
    blob = torch.load(bad, weights_only=True)
    blob["weights"]["w1"] = blob["weights"]["w1"][:, :10]
    torch.save(blob, bad)
    with pytest.raises(PredictorUnavailable, match="w1"):
        PathPredictor.load(bad)


def test_fit_rejects_bad_input():
    ex, pr, so = chain_trace(n_seq=3)
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        PathPredictor.fit(ex, pr, so, E, learning_rate=0.1)
    with pytest.raises(ValueError, match="seq_offsets"):
        PathPredictor.fit(ex, pr, so[:-1], E)
    with pytest.raises(ValueError, match="expert ids"):
        PathPredictor.fit(ex, pr, so, E // 2)
