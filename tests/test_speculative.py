"""Speculative decoding's model-free parts: the config, prompt-lookup drafting, greedy verification, and rejection
sampling preserving the target distribution (chi-square over many seeded draws)."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from moe_engine.errors import ConfigError
from moe_engine.runtime.speculative import SpeculativeConfig, propose_ngram, verify_greedy, verify_sampled


def test_config_parses_vllm_json_and_names_bad_keys():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (cfg.method, cfg.num_speculative_tokens, cfg.prompt_lookup_max) == ("ngram", 3, 5)
    for bad, words in [("{", "not valid JSON"), ('{"method": "medusa"}', "medusa"),
                       ('{"method": "ngram", "k": 2}', "unknown key 'k'"),
                       ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens=0"),
                       ('{"method": "draft_model"}', "needs \"model\""),
                       ('{"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}', "prompt_lookup_min")]:
        with pytest.raises(ConfigError, match=words):
            SpeculativeConfig.parse(bad)


def test_prompt_lookup_takes_the_longest_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3]
    assert propose_ngram(tokens, 2, 3, 1) == [4, 5]          # "2 3" last seen before "4 5"
    assert propose_ngram(tokens + [4], 3, 3, 1) == [5, 7, 2]  # "2 3 4" -> 5 7 2
    assert propose_ngram([1, 2, 3], 2, 2, 1) == []
    assert propose_ngram([5, 5], 4, 2, 1) == [5]


def test_greedy_verification_is_plain_greedy():
    torch.manual_seed(0)
    for _ in range(50):
        logits = torch.randn(5, 7)
        best = logits.argmax(-1).tolist()
        draft = [b if torch.rand(()) < 0.7 else (b + 1) % 7 for b in best[:4]]
        out = verify_greedy(logits, draft)
        n = next((i for i, (d, b) in enumerate(zip(draft, best)) if d != b), 4)
        assert out == draft[:n] + [best[n]]


@pytest.mark.parametrize("stochastic_draft", [False, True])
def test_rejection_sampling_preserves_the_target_distribution(stochastic_draft):
    """With position-wise target laws p_0, p_1 and any draft law q, the first emitted token follows p_0 and, when
    the first draft token was kept, the second follows p_1 (chi-square, 20k seeded draws)."""
    vocab, draws = 6, 20000
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, vocab, generator=gen) * 1.5, -1)      # [k+1, V]
    q = torch.softmax(torch.randn(2, vocab, generator=gen) * 1.5, -1)      # [k, V]
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(draws):
        draft = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)] if stochastic_draft else [2, 4]
        out = verify_sampled(p, draft, q if stochastic_draft else None, gen)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    for counts, law in ((first, p[0]), (second, p[1])):
        expected = law * counts.sum()
        assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    # a biased implementation (keeping every draft token) fails the same test
    biased = torch.zeros(vocab)
    for _ in range(2000):
        biased[2] += 1
    assert chisquare(biased.numpy(), (p[0] * biased.sum()).numpy()).pvalue < 1e-6


# ---- verification in the generation core ------------------------------------------------------------------
import moe_engine  # noqa: E402
from conftest import write_checkpoint  # noqa: E402
from moe_engine.runtime.sampling import SamplingParams  # noqa: E402


def _spec_run(core, seqs, drafter):
    """Prefill, then verify steps with drafter(seq) drafts (clipped to room) until every sequence ends."""
    for s in seqs:
        core.start(s)
    for s, tok in zip(seqs, core.sample(seqs, core.step(seqs))):
        core.accept(s, tok)
    steps = 0
    while any(not s.done for s in seqs):
        live = [s for s in seqs if not s.done]
        drafts = [drafter(s)[:core.room(s)] for s in live]
        for s, kept in zip(live, core.speculate(live, drafts)):
            for tok in kept:
                if core.accept(s, tok):
                    break
        steps += 1
    return steps


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("spec"), "mixtral", overrides={"vocab_size": 12})
    eng = moe_engine.load(path, dtype="float32", progress=False)
    yield eng
    eng.close()


def test_greedy_speculation_emits_plain_greedy_tokens(small):
    """Drafts that are partly right (the reference continuation, corrupted at random) and prompt-lookup drafts,
    for two sequences verified in the same steps: the tokens are exactly plain greedy decoding's."""
    core = small.core
    prompts = [[1, 2, 3, 4, 1, 2], [5, 6, 7]]
    ref = [core.sequence(p, 20, SamplingParams()) for p in prompts]
    _spec_run(core, ref, lambda s: [])
    want = {tuple(r.tokens[:r.prompt_len]): r.tokens for r in ref}
    rng = torch.Generator().manual_seed(0)

    def oracle(s):
        truth = want[tuple(s.tokens[:s.prompt_len])][len(s.tokens):len(s.tokens) + 4]
        return [t if float(torch.rand((), generator=rng)) < 0.7 else (t + 1) % 12 for t in truth]
    for drafter in (oracle, lambda s: propose_ngram(s.tokens, 3, 3, 1)):
        seqs = [core.sequence(p, 20, SamplingParams()) for p in prompts]
        steps = _spec_run(core, seqs, drafter)
        assert [s.tokens for s in seqs] == [r.tokens for r in ref]
        assert steps <= 20
    seqs = [core.sequence(p, 20, SamplingParams()) for p in prompts]
    assert _spec_run(core, seqs, oracle) < 19                # the right drafts were kept: fewer steps


def test_sampled_speculation_keeps_the_model_distribution(small):
    """Second generated token's law with a fixed 2-token draft equals the model's exact marginal
    sum_x1 p(x1) p(x2 | x1) (chi-square over 3000 seeded runs on a 12-token vocabulary)."""
    core, prompt = small.core, [3, 1, 4, 1, 5]
    first = torch.softmax(small.logits(torch.tensor([prompt]))[0, -1], -1)                     # [V]
    second = torch.stack([torch.softmax(small.logits(torch.tensor([prompt + [x]]))[0, -1], -1) for x in range(12)])
    marginal = first @ second                                                                 # [V]
    counts = torch.zeros(12)
    for seed in range(3000):
        s = core.sequence(prompt, 3, SamplingParams(do_sample=True, temperature=1.0, seed=seed))
        core.start(s)
        core.step([s], feed=[len(prompt) - 1])                 # the prompt but its last id: that one is pending
        kept = core.speculate([s], [[2, 7]])[0]                 # x1 (and x2 when draft[0] was kept)
        if len(kept) > 1:
            x2 = kept[1]
        else:
            core.accept(s, kept[0])
            x2 = core.sample([s], core.step([s]))[0]
        counts[x2] += 1
    from scipy.stats import chisquare
    assert chisquare(counts.numpy(), (marginal * counts.sum()).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("method", ["ngram", "resident"])
def test_generate_with_speculation_equals_greedy(method):
    """The bundled model with a quarter of its experts' budget (resident drafts route among the cached ones):
    greedy text with speculation equals greedy text without, and stats report the drafts."""
    eng = moe_engine.load(None, dtype="float32", progress=False, gpu_mem="25M")
    try:
        prompts = ["def add(a, b):\n    return a + b\n\ndef add(", "import os\nimport sys\nimport"]
        want = eng.generate(prompts, max_new_tokens=24)
        got = eng.generate(prompts, max_new_tokens=24, speculative_config={"method": method,
                                                                           "num_speculative_tokens": 3})
        assert got == want
        spec = eng.stats()["speculation"]
        assert spec["method"] == method and spec["drafted"] > 0 and 0 <= spec["accepted"] <= spec["drafted"]
        assert eng.generate(prompts, max_new_tokens=24, max_batch=1, speculative_config={"method": method}) == want
    finally:
        eng.close()
