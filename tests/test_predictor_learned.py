"""The learned predictor: it learns routing that depends on the hidden state or the token id,
round-trips through its file, keeps the protocol's shape contract and refuses a model it was not
trained for (all CPU, a few seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from predictors.base import PredictorUnavailable
from predictors.evaluate import replay
from predictors.learned import FILENAME, LearnedPredictor

L, D, E, K, V = 4, 16, 8, 2, 32
SMALL = {"embed_dim": 8, "width": 64, "lr": 1e-2, "batch": 256, "val_fraction": 0.1}


def hidden_trace(t: int, seed: int):
    """Experts of layer m are the top-2 of a fixed nonlinear map of the hidden state, which drifts slowly."""
    rng = np.random.default_rng(seed)
    maps = np.random.default_rng(100).normal(size=(L, D, E))
    h = np.cumsum(np.concatenate([rng.normal(size=(t, 1, D)), 0.2 * rng.normal(size=(t, L - 1, D))], 1), 1)
    experts = np.argsort(-np.einsum("tld,lde->tle", np.abs(h), maps), -1)[..., :K]
    return h.astype(np.float16), rng.integers(0, V, t).astype(np.int32), experts.astype(np.int16)


def token_trace(t: int, seed: int):
    """Hidden states are noise; the experts of every layer are a fixed function of the token id."""
    rng = np.random.default_rng(seed)
    table = np.stack([[np.random.default_rng(100 + v * L + m).permutation(E)[:K] for m in range(L)] for v in range(V)])
    tok = rng.integers(0, V, t)
    return rng.normal(size=(t, L, D)).astype(np.float16), tok.astype(np.int32), table[tok].astype(np.int16)


def fit(h, tok, experts, **kw):
    return LearnedPredictor.fit(h, tok, experts, num_experts=E, vocab_size=V, depth=2, **{"epochs": 8, **SMALL, **kw})


def recall(pred, h, tok, experts, use_tokens=True) -> dict:
    offsets = np.arange(0, len(h) + 1, 50, dtype=np.int64)
    probs = np.full(experts.shape, 1.0 / K, dtype=np.float32)
    meter = replay(pred, experts, probs, offsets, depth=2, ks=(K,), router_inputs=h,
                   token_ids=tok if use_tokens else None, num_experts=E)
    return meter.summary()["recall"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hidden_pred(one_thread):
    return fit(*hidden_trace(6000, seed=0))


def test_learns_routing_from_the_hidden_state(hidden_pred):
    rec = recall(hidden_pred, *hidden_trace(1000, seed=1))         # unseen tokens; chance is K/E = 0.25
    assert rec["k2_d1"] > 0.75 and rec["k2_d2"] > 0.7, rec


def test_learns_routing_from_the_token_id():
    pred = fit(*token_trace(6000, seed=0))
    h, tok, experts = token_trace(1000, seed=1)
    with_tokens, without = recall(pred, h, tok, experts), recall(pred, h, tok, experts, use_tokens=False)
    assert with_tokens["k2_d1"] > 0.95 and with_tokens["k2_d2"] > 0.95, with_tokens
    assert without["k2_d2"] < with_tokens["k2_d2"] - 0.2, without  # the ids, not the noise, carried it


def test_fit_is_deterministic_for_a_seed():
    data = token_trace(1500, seed=3)
    a, b, c = fit(*data, epochs=2), fit(*data, epochs=2), fit(*data, epochs=2, seed=1)
    sa, sb, sc = a.nets.state_dict(), b.nets.state_dict(), c.nets.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def observe_all(pred, layers, n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, V, (n,), generator=g)
    out = {}
    for m in layers:
        h = torch.randn(n, D, generator=g).to(dtype)
        ex = torch.randint(0, E, (n, K), generator=g)
        pred.observe(m, h, ex, torch.full((n, K), 0.5), tok, torch.arange(n))
        out[m] = pred.predict(m, 2)
    return out


def test_save_load_round_trip_gives_identical_predictions(hidden_pred, tmp_path):
    hidden_pred.save(tmp_path / FILENAME)
    again = LearnedPredictor.load(tmp_path / FILENAME)
    routers = {m: None for m in range(L)}
    hidden_pred.bind(routers, K, E)
    again.bind(routers, K, E)
    a, b = observe_all(hidden_pred, range(L), 7), observe_all(again, range(L), 7)
    assert a.keys() == b.keys() and all(a[m].keys() == b[m].keys() for m in a)
    assert all(torch.equal(a[m][t], b[m][t]) for m in a for t in a[m])
    assert (tmp_path / FILENAME).stat().st_size < 200_000


@pytest.mark.parametrize("n", [1, 5])
def test_shape_contract_with_decoder_layer_indices(hidden_pred, n):
    layers = [1, 3, 4, 6]                                        # MoE layers of a model with dense layers between
    hidden_pred.bind({m: torch.randn(E, D) for m in layers}, K, E)
    out = observe_all(hidden_pred, layers, n, dtype=torch.bfloat16)
    assert list(out[1]) == [3, 4] and list(out[3]) == [4, 6] and list(out[4]) == [6] and out[6] == {}
    for m in out:
        for scores in out[m].values():
            assert scores.shape == (n, E) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
            assert torch.allclose(scores.sum(-1), torch.ones(n))
    hidden_pred.observe(1, torch.randn(n, D), torch.zeros(n, K, dtype=torch.long), torch.ones(n, K))
    assert list(hidden_pred.predict(1, 1)) == [3]                  # token ids are optional; depth is honoured
    assert list(hidden_pred.predict(1, 4)) == [3, 4]               # never deeper than it was trained for
    assert hidden_pred.predict(3, 2) == {}                         # not the layer just observed


@pytest.mark.parametrize(("routers", "top_k", "experts", "found"), [
    ({m: torch.randn(E, D) for m in range(L + 1)}, K, E, "5 MoE layers"),
    ({m: torch.randn(E, D) for m in range(L)}, K, E + 1, "9 experts"),
    ({m: torch.randn(E, D + 1) for m in range(L)}, K, E, "hidden size [17]"),
    ({m: None for m in range(L)}, K + 1, E, "top-3 routing"),
])
def test_bind_refuses_a_model_it_was_not_trained_for(hidden_pred, routers, top_k, experts, found):
    with pytest.raises(PredictorUnavailable) as err:
        hidden_pred.bind(routers, top_k, experts)
    assert found in str(err.value) and "moe-engine train-predictor" in str(err.value)


def test_from_model_dir_errors_name_the_file_and_the_fix(hidden_pred, tmp_path):
    cfg = {"hidden_size": D, "vocab_size": V, "num_local_experts": E}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PredictorUnavailable, match=f"{FILENAME} is missing.*moe-engine train-predictor"):
        LearnedPredictor.from_model_dir(tmp_path)
    hidden_pred.save(tmp_path / FILENAME)
    assert LearnedPredictor.from_model_dir(tmp_path).config == hidden_pred.config
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": V * 2}))
    with pytest.raises(PredictorUnavailable, match="vocabulary 64 \\(trained for 32\\).*train-predictor"):
        LearnedPredictor.from_model_dir(tmp_path)
    (tmp_path / FILENAME).write_bytes(b"not a torch file")
    with pytest.raises(PredictorUnavailable, match="not a readable learned-predictor file.*train-predictor"):
        LearnedPredictor.load(tmp_path / FILENAME)


def test_no_argument_construction_says_how_to_get_weights():
    with pytest.raises(PredictorUnavailable, match="from_model_dir"):
        LearnedPredictor()


def test_fit_rejects_inconsistent_arrays():
    h, tok, experts = token_trace(100, seed=0)
    with pytest.raises(ValueError, match="same \\[T, L\\] tokens"):
        fit(h, tok[:50], experts)
    with pytest.raises(ValueError, match="expert ids"):
        fit(h, tok, experts + E)
