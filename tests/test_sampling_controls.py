"""Sampling controls beyond temperature / top-k / top-p: per-sequence processors against their slow twin and
transformers, min-p, logprobs against Engine.logits, prompt logprobs, min_tokens, per-sequence failure isolation."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import MinPLogitsWarper

from conftest import load_hf
from moe_engine.errors import ConfigError
from moe_engine.runtime.logits_process import LogitsState, process_reference
from moe_engine.runtime.sampling import SamplingParams, apply_min_p, apply_top_p, resolve_sampling

PROCESS_GRID = [
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7, presence_penalty=0.5),
    dict(frequency_penalty=-1.2, presence_penalty=2.0),
    dict(logit_bias={3: 5.0, 7: -100.0}, min_tokens=4),
    dict(allowed_token_ids=[1, 2, 3, 9], repetition_penalty=2.0, frequency_penalty=0.3),
    dict(min_tokens=2, logit_bias={0: 1.5}, presence_penalty=-0.4),
]


@pytest.mark.parametrize("kw", PROCESS_GRID)
def test_logits_state_matches_its_slow_twin(kw):
    rng = random.Random(str(kw))
    vocab, stop_ids = 13, {0, 5}
    params = SamplingParams(**kw)
    prompt = [rng.randrange(vocab) for _ in range(6)]
    state, generated = LogitsState(params, vocab, prompt, stop_ids), []
    for _ in range(8):
        raw = torch.randn(1, vocab) * 3
        got = state.process(raw)[0]
        want = process_reference(raw[0], params, prompt, generated, stop_ids)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        token = rng.randrange(vocab)
        state.accept(token)
        generated.append(token)


def test_min_p_matches_transformers():
    scores = torch.randn(4, 50) * 4
    for min_p in (0.0, 0.05, 0.3, 0.9):
        want = MinPLogitsWarper(min_p=min_p)(None, scores.clone()) if min_p else scores
        assert torch.equal(torch.isinf(apply_min_p(scores, min_p)), torch.isinf(want))


def test_tiny_top_p_and_temperature_are_safe():
    """A top_p that underflows float32 keeps the top token instead of removing every token (NaN); a temperature
    that overflows the logits is refused with the value named."""
    out = apply_top_p(torch.randn(2, 10), 1e-300)
    assert torch.isfinite(out).sum(-1).tolist() == [1, 1]
    with pytest.raises(ConfigError, match="temperature=1e-50 is too small"):
        SamplingParams(do_sample=True, temperature=1e-50)


@pytest.mark.parametrize("kw, match", [
    (dict(min_p=1.5), "min_p=1.5"), (dict(repetition_penalty=0), "repetition_penalty=0"),
    (dict(presence_penalty=3), "presence_penalty=3"), (dict(logit_bias={1: 200}), r"logit_bias\[1\]"),
    (dict(logit_bias={"x": 1}), "logit_bias key 'x'"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(min_tokens=-1), "min_tokens=-1"), (dict(logprobs=True), "logprobs=True"),
])
def test_bad_values_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kw)


def test_generation_config_supplies_min_p_and_repetition_penalty():
    params = resolve_sampling({"min_p": 0.1, "repetition_penalty": 1.2}, presence_penalty=0.5)
    assert (params.min_p, params.repetition_penalty, params.presence_penalty) == (0.1, 1.2, 0.5)
    with pytest.raises(ConfigError, match="generation_config.json"):
        resolve_sampling({"repetition_penalty": -1})


def test_greedy_repetition_penalty_matches_transformers(eng, tok_dir):
    hf = load_hf(tok_dir)
    ids = torch.tensor([eng.encode("the cat sat on the mat and the cat")])
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.5, pad_token_id=0,
                       eos_token_id=None)[0, ids.shape[1]:].tolist()
    got = eng.generate(ids, max_new_tokens=12, repetition_penalty=1.5, eos_token_id=[])[0, ids.shape[1]:].tolist()
    assert got == want


def _run(core, seqs):
    for s in seqs:
        core.start(s)
    logits = core.step(seqs)
    while True:
        live = [s for s in seqs if not s.done]
        for s, tok in zip(live, core.sample(live, logits)):
            core.accept(s, tok)
        live = [s for s in live if not s.done]
        if not live:
            return
        logits = core.step(live)


def test_logprobs_are_log_softmax_of_engine_logits(eng):
    """Generated and prompt logprobs (sampled with penalties: logprobs are the raw model's) equal log_softmax of
    Engine.logits over the same ids."""
    prompt = eng.encode("one two three four")
    params = SamplingParams(do_sample=True, temperature=0.8, seed=3, repetition_penalty=1.4, logprobs=3,
                            prompt_logprobs=2)
    seq = eng.core.sequence(prompt, 6, params)
    _run(eng.core, [seq])
    ref = torch.log_softmax(eng.logits(torch.tensor([seq.tokens]))[0], -1)     # [T, V]
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
    entries = [(len(prompt) + i, e) for i, e in enumerate(seq.logprobs)] + \
              [(p, e) for p, e in enumerate(seq.prompt_logprobs) if e is not None]
    for pos, (token, lp, top) in entries:
        assert token == seq.tokens[pos]
        assert abs(lp - ref[pos - 1, token].item()) < 1e-4
        k = 3 if pos >= len(prompt) else 2
        assert [i for i, _ in top] == torch.topk(ref[pos - 1], k).indices.tolist()


def test_min_tokens_holds_back_eos(eng):
    prompt = eng.encode("a b")
    free = eng.core.sequence(prompt, 8, SamplingParams(), eos={int(t) for t in range(eng.spec.vocab_size)})
    _run(eng.core, [free])
    assert free.finish_reason == "eos" and len(free.generated) == 1
    held = eng.core.sequence(prompt, 8, SamplingParams(min_tokens=5), eos=set(range(eng.spec.vocab_size - 1)))
    _run(eng.core, [held])
    assert held.generated[:5] == [eng.spec.vocab_size - 1] * 5 and held.finish_reason in ("eos", "length")


def test_a_failing_sequence_ends_alone(eng):
    """An isolated sequence whose rules exclude every token ends with "error"; its batch neighbour is unharmed."""
    prompt = eng.encode("hello there")
    alone = eng.core.sequence(prompt, 5, SamplingParams())
    _run(eng.core, [alone])
    bad = eng.core.sequence(prompt, 5, SamplingParams(allowed_token_ids=[3], min_tokens=3),
                            eos={3}, isolate=True)
    good = eng.core.sequence(prompt, 5, SamplingParams())
    _run(eng.core, [bad, good])
    assert bad.finish_reason == "error" and "every token is excluded" in bad.error
    assert good.generated == alone.generated
    with pytest.raises(ValueError, match="every token is excluded"):
        _run(eng.core, [eng.core.sequence(prompt, 5, SamplingParams(allowed_token_ids=[3], min_tokens=2), eos={3})])


def test_token_ids_outside_the_vocabulary_are_named(eng):
    with pytest.raises(ConfigError, match="logit_bias names token id"):
        eng.generate("x", max_new_tokens=2, logit_bias={10**6: 1.0})
    with pytest.raises(ConfigError, match="unknown sampling argument"):
        resolve_sampling({}, beam_width=2)
