"""Predictor plumbing: selection routes, the guard against misbehaving predictors, recall, oracle, traces."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_engine
from moe_engine.errors import ConfigError
from moe_engine.runtime.forecast import PredictorWarning
from moe_engine.profiling.record import read_prompts, record_trace
from predictors.evaluate import RecallMeter, replay
from predictors.oracle import OraclePredictor

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "custom_predictor"
PROMPTS = ["def add(a, b):\n    return", "import os\nimport sys\n"]
BUDGET = "16M"          # bundled model: a few slots per layer, so prefetching is exercised


@pytest.fixture(scope="module")
def reference():
    """Greedy continuations with no predictor at all (demand loading)."""
    eng = moe_engine.load(progress=False, gpu_mem=BUDGET, predictor=None, device="cpu")
    out = [eng.generate(p, max_new_tokens=12) for p in PROMPTS]
    eng.close()
    return out


def run(predictor, **kw):
    eng = moe_engine.load(progress=False, gpu_mem=BUDGET, predictor=predictor, device="cpu", **kw)
    try:
        return [eng.generate(p, max_new_tokens=12) for p in PROMPTS], eng.stats()
    finally:
        eng.close()


# ---- selection routes -----------------------------------------------------------------------------
@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("previous_token_predictor", None)


def test_example_by_module_path(example_on_path, reference):
    out, st = run("previous_token_predictor:PreviousTokenPredictor")
    assert out == reference
    assert st["prediction"]["predictor"] == "previous-token"
    assert st["prediction"]["recall"]["k2_d1"] > 0       # temporal reuse predicts something on real text


def test_example_by_entry_point(example_on_path, tmp_path, monkeypatch, reference):
    dist = tmp_path / "moe_engine_previous_token_predictor-0.1.0.dist-info"    # what pip install writes
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: moe-engine-previous-token-predictor\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[moe_engine.predictors]\n"
                                           "previous-token = previous_token_predictor:PreviousTokenPredictor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out, st = run("previous-token")
    assert out == reference and st["prediction"]["predictor"] == "previous-token"


def test_example_as_object_and_class(example_on_path, reference):
    from previous_token_predictor import PreviousTokenPredictor
    for spec in (PreviousTokenPredictor(), PreviousTokenPredictor):
        out, st = run(spec)
        assert out == reference and st["prediction"]["predictor"] == "previous-token"


@pytest.mark.parametrize("spec, words", [
    ("no-such-predictor", ["unknown", "gate-lookahead", "oracle"]),
    ("no_such_module:Thing", ["could not be imported", "no_such_module"]),
    ("predictors.evaluate:NoSuchClass", ["has no attribute", "NoSuchClass"]),
    ("predictors.evaluate:RecallMeter", ["could not be created"]),
    ("collections:OrderedDict", ["not an ExpertPredictor", "bind"]),
    ("gate-lookahead:file.pt", ["takes no file"]),
    ("oracle", ["oracle:TRACE.npz"]),
    ("oracle:/nonexistent/t.npz", ["does not exist", "moe-engine trace"]),
])
def test_bad_predictor_choice_is_a_clear_error(spec, words):
    with pytest.raises(ConfigError) as e:
        moe_engine.load(progress=False, gpu_mem=BUDGET, predictor=spec, device="cpu")
    for w in words:
        assert w in str(e.value)


# ---- the guard --------------------------------------------------------------------------------------
class Raises:
    name = "raises"

    def bind(self, routers, top_k, num_experts):
        self.E = num_experts

    def observe(self, *a, **k):
        pass

    def predict(self, layer, depth):
        raise RuntimeError("boom")


class WrongShape(Raises):
    name = "wrong-shape"

    def observe(self, layer, x, experts, *a, **k):
        self.n = experts.shape[0]

    def predict(self, layer, depth):
        return {layer + 1: torch.zeros(self.n, self.E + 1)} if layer + 1 < 6 else {}


class NaNs(WrongShape):
    name = "nans"

    def predict(self, layer, depth):
        return {layer + 1: torch.full((self.n, self.E), float("nan"))} if layer + 1 < 6 else {}


class BadLayer(WrongShape):
    name = "bad-layer"

    def predict(self, layer, depth):
        return {layer: torch.zeros(self.n, self.E)}


class NotADict(WrongShape):
    name = "not-a-dict"

    def predict(self, layer, depth):
        return torch.zeros(self.n, self.E)


class BindRaises(Raises):
    name = "bind-raises"

    def bind(self, routers, top_k, num_experts):
        raise ValueError("cannot bind")


@pytest.mark.parametrize("cls, words", [(Raises, "raised RuntimeError: boom"), (WrongShape, "shape"),
                                        (NaNs, "non-finite"), (BadLayer, "not a MoE layer after"),
                                        (NotADict, "expected a dict"), (BindRaises, "bind() raised")])
def test_misbehaving_predictor_warns_once_and_falls_back(cls, words, reference):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, st = run(cls())
    ours = [w for w in caught if issubclass(w.category, PredictorWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert words in str(ours[0].message) and cls.name in str(ours[0].message)
    assert "gate-lookahead" in str(ours[0].message)
    assert out == reference                                   # outputs never depend on the predictor
    assert st["prediction"]["predictor"] == "gate-lookahead" and len(st["prediction"]["failures"]) == 1
    assert st["prefetch"]["issued"] > 0                       # the fallback really prefetches


def test_default_predictor_failing_stops_prediction(monkeypatch, reference):
    from predictors.gate_lookahead import GateLookahead
    monkeypatch.setattr(GateLookahead, "predict", lambda self, layer, depth: {layer + 1: "junk"})
    with pytest.warns(PredictorWarning, match="without a predictor"):
        out, st = run("gate-lookahead")
    assert out == reference and st["prediction"]["predictor"] is None


# ---- recall -------------------------------------------------------------------------------------------
def test_recall_meter_counts_exactly():
    meter = RecallMeter([0, 1, 2], depth=2, ks=(1, 2))
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.0, 0.2, 0.3, 0.9]])     # 2 tokens, 4 experts
    meter.forecast(0, {1: scores, 2: scores})
    meter.actual(1, torch.tensor([[0, 2], [3, 1]]))       # top1: {0},{3} -> 2 of 4; top2: {0,1},{3,2} -> 2 of 4
    meter.actual(2, torch.tensor([[0, 1], [3, 2]]))       # top1 -> 2 of 4; top2 -> 4 of 4
    rec = meter.recall()
    assert rec[1, 0].tolist() == [0.5, 0.5] and rec[2, 1].tolist() == [0.5, 1.0]
    assert np.isnan(rec[0]).all() and np.isnan(rec[1, 1]).all()
    assert meter.summary()["recall"]["k2_d2"] == 1.0


def test_replay_oracle_is_perfect_and_blind_is_chance():
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(300 * 4)]).reshape(300, 4, 2)
    probs = np.full(experts.shape, 0.5, dtype=np.float32)
    off = np.array([0, 100, 180, 300])
    m = replay(OraclePredictor(experts, probs, off), experts, probs, off, depth=3)
    assert all(v == 1.0 for v in m.summary()["recall"].values())

    class Blind:
        def bind(self, routers, top_k, num_experts):
            self.e = num_experts

        def observe(self, layer, x, experts, *a):
            self.n = experts.shape[0]

        def predict(self, layer, depth):
            return {m: torch.rand(self.n, self.e) for m in range(layer + 1, min(layer + 1 + depth, 4))}
    r = replay(Blind(), experts, probs, off, depth=1).summary()["recall"]["k2_d1"]
    assert 0.15 < r < 0.35                                  # 2 of 8 by chance


# ---- traces and the oracle in the engine -----------------------------------------------------------------
def test_trace_rows_match_a_full_forward():
    eng = moe_engine.load(progress=False, device="cpu", dtype="float32")
    trace = record_trace(eng, PROMPTS, max_new_tokens=6, router_inputs=True, progress=False)
    lens = trace.extra["prompt_len"]
    assert (np.diff(trace.seq_offsets) == lens + 5).all()              # last generated token is never fed
    assert trace.extra["router_inputs"].shape == (trace.num_steps, 6, eng.spec.hidden_size)
    for s in range(2):                                                 # teacher-forced forward, same routing
        a, b = trace.seq_offsets[s], trace.seq_offsets[s + 1]
        ids = torch.from_numpy(trace.token_ids[a:b].astype(np.int64))[None]
        seen = {}

        class Watch:                                                   # a routing observer of the forward
            def begin_step(self, token_ids, seq_ids):
                pass

            def observe(self, lay, x, experts, weights, seen=seen):
                seen.setdefault(lay, experts)
        with eng.observing(Watch()):
            eng.logits(ids)
        got = np.stack([seen[m].numpy() for m in range(6)], 1)
        assert (got == trace.experts[a:b]).all()
    eng.close()


def test_oracle_from_recorded_trace_is_perfect_live(tmp_path, reference):
    from moe_engine.profiling.trace import save_trace
    eng = moe_engine.load(progress=False, device="cpu")
    save_trace(tmp_path / "t.npz", record_trace(eng, PROMPTS, max_new_tokens=12, progress=False))
    eng.close()
    out, st = run(f"oracle:{tmp_path / 't.npz'}")
    assert out == reference
    assert st["prediction"]["recall"]["k2_d1"] == 1.0
    assert st["prefetch"]["precision"] == 1.0


def test_trace_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    from moe_engine.cli import main
    from moe_engine.profiling.trace import load_trace
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"def f(x):"\n{"prompt": "class A:"}\n')
    out = tmp_path / "t.npz"
    argv = ["trace", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4", "--no-progress",
            "--device", "cpu", "--router-inputs"]
    assert main(argv) == 0
    t = load_trace(out)
    assert t.num_sequences == 2 and t.token_ids is not None and "router_inputs" in t.extra
    before = out.read_bytes()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_read_prompts_errors(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        read_prompts(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")
    plain = tmp_path / "p.txt"
    plain.write_text("a\n\nb\n")
    assert read_prompts(plain) == ["a", "b"]


def test_lookahead_covers_measured_load_time():
    from moe_engine.experts.controller import CacheController
    from moe_engine.experts.policies import make_policy
    from moe_engine.experts.tracker import CacheCounters

    class Transport:                                                   # two loader threads; nothing is loaded
        parallelism, now = 2, staticmethod(lambda: 0.0)
    ctl = CacheController([4], 8, make_policy("lru"), 2, Transport(), CacheCounters(1), max_lookahead=4)
    clock = ctl.clock
    assert ctl.lookahead() == 1                                        # nothing measured yet
    clock.load_s, clock.layer_s, clock.loads_per_layer = 0.004, 0.002, 2.0
    assert ctl.lookahead() == 2                                        # 2 loads x 4 ms / 2 threads = 2 layers
    clock.load_s = 0.1
    assert ctl.lookahead() == 4                                        # capped
    clock.load_s = 0.0001
    assert ctl.lookahead() == 1


@pytest.mark.parametrize("name", ["gate-lookahead", "learned", "path"])
def test_builtins_by_name_on_the_bundled_model(name, reference):
    """The bundled model ships trained learned/path predictors; outputs equal demand loading's."""
    out, st = run(name)
    assert out == reference
    assert st["prediction"]["predictor"] == name and not st["prediction"]["failures"]
    assert st["prediction"]["recall"]["k4_d1"] > 0.5        # far above chance (4 of 16)


def test_untrained_predictor_names_the_train_command(tmp_path):
    import shutil
    model = tmp_path / "m"
    shutil.copytree(Path(moe_engine.__file__).parent / "models" / "tiny-moe", model,
                    ignore=shutil.ignore_patterns("predictor-*.pt"))
    for name in ("learned", "path"):
        with pytest.raises(ConfigError, match="train-predictor"):
            moe_engine.load(model, progress=False, gpu_mem=BUDGET, predictor=name, device="cpu")


def test_train_predictor_cli(tmp_path, capsys):
    from moe_engine.cli import main
    prompts = tmp_path / "p.txt"
    prompts.write_text("def f(x):\nclass A:\nimport os\n")
    trace, bare = tmp_path / "t.npz", tmp_path / "bare.npz"
    base = ["--prompts", str(prompts), "--max-new-tokens", "8", "--no-progress", "--device", "cpu"]
    assert main(["trace", *base, "--out", str(trace), "--router-inputs"]) == 0
    assert main(["trace", *base, "--out", str(bare)]) == 0
    for kind in ("path", "learned"):
        out = tmp_path / f"{kind}.pt"
        argv = ["train-predictor", "--kind", kind, "--trace", str(trace), "--out", str(out), "--epochs", "1",
                "--no-progress"]
        assert main(argv) == 0 and out.is_file()
        eng = moe_engine.load(progress=False, gpu_mem=BUDGET, predictor=f"{kind}:{out}", device="cpu")
        eng.generate("def g(", max_new_tokens=4)
        assert eng.stats()["prediction"]["predictor"] == kind
        eng.close()
        assert main(argv) == 2 and "already exists" in capsys.readouterr().err      # never overwritten silently
    argv = ["train-predictor", "--kind", "learned", "--trace", str(bare), "--out", str(tmp_path / "x.pt")]
    assert main(argv) == 2 and "--router-inputs" in capsys.readouterr().err
