"""Speculative decoding's expert awareness (runtime/drafting.py): restricted drafts read the cache without counting
as use and unseen by routing observers, the verify step's forecast experts are prefetched before it runs, drafts are
cut by their forecast loads, and the draft_model method; outputs stay plain greedy's."""
from __future__ import annotations

import pytest
import torch

import moe_engine
from conftest import write_checkpoint
from moe_engine.errors import ConfigError
from moe_engine.runtime.core import NonFiniteError
from moe_engine.runtime.drafting import Drafter, restricted, vocab_mismatch
from moe_engine.runtime.sampling import SamplingParams
from moe_engine.runtime.speculative import SpeculativeConfig

CODE = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a"
PROACTOR = (   # the head of asyncio/proactor_events.py (a file the bundled model never trained on)
    '"""Event loop using a proactor and related classes.\n'
    '\n'
    'A proactor is a "notify-on-completion" multiplexer.  Currently a\n'
    'proactor is only implemented on Windows with IOCP.\n'
    '"""\n'
    '\n'
    "__all__ = 'BaseProactorEventLoop',\n"
    '\n'
    'import io\n'
    'import os\n'
    'import socket\n'
    'import warnings\n'
    'import signal\n'
    'import threading\n'
    'import collections\n'
    '\n'
    'from . import base_events\n'
    'from . import constants\n'
    'from . import futures\n'
    'from . import exceptions\n'
    'from . import protocols\n'
    'from . import sslproto\n'
    'from . import transports\n'
    'from . import trsock\n'
    'from .log import logger\n'
    '\n'
    '\n'
    'def _set_socket_extra(transport, sock):\n'
    "    transport._extra['socket'] = trsock.TransportSocket(sock)\n"
    '\n'
    '    try:\n'
    '        transport._extra')


@pytest.fixture(scope="module")
def offloaded():
    eng = moe_engine.load(None, dtype="float32", progress=False, gpu_mem="25M")    # a quarter of the experts
    yield eng
    eng.close()


def _prefilled(eng, text: str, max_new: int = 16):
    core = eng.core
    s = core.sequence(eng.encode(text), max_new, SamplingParams())
    core.start(s)
    core.accept(s, core.sample([s], core.step([s]))[0])
    return s


class _Counting:
    def __init__(self):
        self.calls = 0

    def begin_step(self, token_ids, seq_ids):
        self.calls += 1

    def observe(self, layer, router_input, experts, weights):
        self.calls += 1


def test_resident_drafts_count_no_lookup_and_forecast_the_exact_routing(offloaded):
    eng = offloaded
    cache, core = eng.experts, eng.core
    s = _prefilled(eng, CODE)
    drafter = Drafter(core, cache, SpeculativeConfig("resident", num_speculative_tokens=3, adaptive=False))
    table = cache.controller.table
    before = (list(table.hits), list(table.misses), cache.counters.loads)
    with core.observing(_Counting()) as seen:
        routes: dict = {}
        tokens, kv = list(s.tokens), s.kv.length
        draft = drafter._resident([s], [3], routes)[0]
    assert len(draft) == 3 and s.tokens == tokens and s.kv.length == kv    # the sequence is as it was
    assert (list(table.hits), list(table.misses)) == before[:2]            # no lookup counted, no policy update
    assert seen.calls == 0                                                  # observers never hear of a draft
    fed = routes[s.seq_id]
    assert len(fed) == 3 and all(len(layer) == eng.spec.moe.top_k for pos in fed for layer in pos)
    # the first fed token's forecast at the first MoE layer is exactly what the verify step routes there (later
    # layers see hidden states the restricted experts made: a forecast, not the truth)
    with core.observing(_Recorder()) as rec:
        core.step([s], all_logits=True)
    s.kv.length = kv
    assert frozenset(rec.routes[0]) == fed[0][0]


class _Recorder:
    def __init__(self):
        self.routes = []

    def begin_step(self, token_ids, seq_ids):
        self.routes = []

    def observe(self, layer, router_input, experts, weights):
        self.routes.append(experts[-1].tolist())


def test_restricted_routing_reads_only_ready_experts_and_catches_a_stale_mask(offloaded):
    eng = offloaded
    s = _prefilled(eng, CODE)
    n, kv = eng.spec.moe.num_experts, s.kv.length

    def masks(pick):
        out = {}
        for m in eng.spec.moe_layers:
            out[m] = torch.zeros(n, dtype=torch.bool)
            out[m][pick(m)] = True
        return out
    ready = masks(lambda m: sorted(eng.experts.ready(m)))
    with eng.experts.peeking(), restricted(eng.core.decoder, ready) as routing:
        eng.core.step([s])
    s.kv.length = kv
    assert set(routing.exact) == set(eng.spec.moe_layers)
    assert all(set(routing.used[m][0]) <= eng.experts.ready(m) for m in eng.spec.moe_layers)
    stale = masks(lambda m: sorted(set(range(n)) - eng.experts.ready(m))[:2])
    with pytest.raises(RuntimeError, match="not ready"):
        with eng.experts.peeking(), restricted(eng.core.decoder, stale):
            eng.core.step([s])
    s.kv.length = kv


def test_prefetch_forecast_loads_between_steps_and_keeps_the_wanted(offloaded):
    cache = offloaded.experts
    layer = offloaded.spec.moe_layers[1]
    quota = cache.quotas[layer]
    absent = sorted(set(range(offloaded.spec.moe.num_experts)) - cache.residents(layer))
    want = frozenset(absent[:quota])
    issued = cache.counters.prefetch_issued
    assert cache.prefetch({layer: want}) == len(want)
    assert cache.residents(layer) == want and cache.counters.prefetch_issued == issued + len(want)
    assert cache.prefetch({layer: want}) == 0                   # already there: nothing to do
    more = frozenset(absent[quota:quota + 2])
    started = cache.prefetch({layer: want | more})              # more than fit: none of the wanted evicts another
    assert started <= quota and cache.residents(layer) <= want | more


@pytest.mark.parametrize("method", ["ngram", "resident"])
def test_offloaded_speculation_prefetches_its_forecast_and_keeps_greedy(offloaded, method):
    eng = offloaded
    prompts = [CODE, "import os\nimport sys\nimport os\nimport"]
    want = eng.generate(prompts, max_new_tokens=20)
    got = eng.generate(prompts, max_new_tokens=20,
                       speculative_config={"method": method, "num_speculative_tokens": 3})
    assert got == want
    spec = eng.stats()["speculation"]
    assert spec["drafted"] > 0 and spec["forecast_prefetches"] > 0


def test_drafts_are_cut_where_forecast_loads_cost_more_than_they_earn(offloaded):
    eng = offloaded
    s = _prefilled(eng, CODE)
    drafter = Drafter(eng.core, eng.experts, SpeculativeConfig("ngram", num_speculative_tokens=4))
    layers = eng.spec.moe_layers
    none = [frozenset()] * len(layers)
    heavy = [frozenset(range(eng.spec.moe.num_experts))] * len(layers)
    covered = [set() for _ in layers]
    drafter.accept[s.seq_id], drafter.load_ratio, drafter.extra_cost = 0.9, 0.0, 0.05
    assert drafter._cut(s, [7, 8, 9], [none, none, none, none], covered) == [7, 8, 9]
    drafter.load_ratio = 1.0                                  # each load costs a whole decode step
    assert drafter._cut(s, [7, 8, 9], [none, none, heavy, heavy], covered) == [7]
    assert drafter.truncated == 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    target = write_checkpoint(root / "target", "mixtral", overrides={"vocab_size": 12})
    other = write_checkpoint(root / "other", "mixtral", seed=3, overrides={"vocab_size": 12})
    eng = moe_engine.load(target, dtype="float32", progress=False)
    yield eng, target, other
    eng.close()


def test_draft_model_greedy_equals_plain_and_the_same_model_is_always_accepted(pair):
    eng, target, other = pair
    prompts = torch.tensor([[1, 2, 3, 4, 1, 2], [5, 6, 7, 8, 9, 10]])
    want = eng.generate(prompts, max_new_tokens=12)
    same = eng.generate(prompts, max_new_tokens=12, speculative_config={
        "method": "draft_model", "model": str(target), "num_speculative_tokens": 3, "adaptive": False})
    assert torch.equal(same, want)
    spec = eng.stats()["speculation"]
    assert spec["drafted"] > 0 and spec["accepted"] == spec["drafted"]     # the model drafting for itself
    got = eng.generate(prompts, max_new_tokens=12, speculative_config={
        "method": "draft_model", "model": str(other), "num_speculative_tokens": 3})
    assert torch.equal(got, want)


def test_draft_model_errors_name_the_field(pair, tmp_path):
    eng = pair[0]
    with pytest.raises(ConfigError, match="draft_model .* could not be loaded"):
        eng.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2,
                     speculative_config={"method": "draft_model", "model": str(tmp_path / "nowhere")})

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab
    assert vocab_mismatch(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 1, "c": 2})) is None
    assert "'b' is id 2" in vocab_mismatch(Tok({"a": 0, "b": 2}), Tok({"a": 0, "b": 1}))
    assert vocab_mismatch(None, Tok({"a": 0})) is None


@pytest.mark.parametrize("method", ["ngram", "resident"])
def test_bf16_speculation_differs_from_plain_greedy_only_at_near_ties(method):
    """In bfloat16 a verify step computes k+1 tokens in one batch, whose matmuls may round differently from one
    token at a time: greedy tokens may then part ways, but only where plain greedy's two best logits (scored by a
    full forward over the tokens so far) are within bfloat16 rounding of each other."""
    eng = moe_engine.load(None, dtype="bfloat16", progress=False, gpu_mem="25M")
    try:
        parted = 0
        for text in (CODE, PROACTOR):               # the second parts ways at its 4th new token on this model
            ids = eng.encode(text)
            plain = eng.generate(torch.tensor([ids]), max_new_tokens=24, eos_token_id=[])[0].tolist()
            spec = eng.generate(torch.tensor([ids]), max_new_tokens=24, eos_token_id=[],
                                speculative_config={"method": method, "num_speculative_tokens": 3})[0].tolist()
            if spec == plain:
                continue
            parted += 1
            i = next(j for j, (a, b) in enumerate(zip(plain, spec)) if a != b)
            scores = eng.logits(torch.tensor([plain[:i]]))[0, -1]     # a third rounding: the full forward's
            gap = float(scores[plain[i]] - scores[spec[i]])
            assert abs(gap) <= 4 * 2 ** -7 * float(scores.abs().max()), (i, gap)   # a few bf16 steps at that scale
        assert parted <= 1
    finally:
        eng.close()


def test_a_failing_draft_model_drafts_nothing_and_the_request_goes_on(pair, monkeypatch):
    eng, target, _ = pair
    prompts = torch.tensor([[1, 2, 3, 4, 1, 2]])
    want = eng.generate(prompts, max_new_tokens=8)
    cfg = {"method": "draft_model", "model": str(target), "num_speculative_tokens": 3}
    eng.generate(prompts, max_new_tokens=2, speculative_config=cfg)          # loads the draft engine once
    draft = eng.core.draft_engines[str(target)]

    def nan_step(seqs, **kw):
        raise NonFiniteError("the draft's logits are NaN", [s.seq_id for s in seqs], 0)
    monkeypatch.setattr(draft.core, "step", nan_step)
    assert torch.equal(eng.generate(prompts, max_new_tokens=8, speculative_config=cfg), want)
    spec = eng.stats()["speculation"]
    assert spec["drafted"] == 0 and spec["draft_failures"] > 0
