"""Sampling: parity with transformers' logits warpers, seeding, row independence, validation, defaults."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from moe_engine.errors import ConfigError
from moe_engine.runtime.sampling import (
    Sampler,
    SamplingParams,
    apply_top_k,
    apply_top_p,
    resolve_sampling,
    warp_logits,
)


def _logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale  # [rows, vocab]


def _hf_warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The transformers reference for warp_logits: temperature, top-k, top-p, in generate()'s order."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.float())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


def _assert_same_filter(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different tokens were filtered out"
    kept = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=0, atol=0)


# ---- filters against transformers ------------------------------------------------------------


@pytest.mark.parametrize("vocab", [7, 64, 1000])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_top_k_matches_transformers(vocab, k):
    logits = _logits(4, vocab, seed=vocab + k)
    _assert_same_filter(apply_top_k(logits, k), TopKLogitsWarper(k)(None, logits))


@pytest.mark.parametrize("vocab", [7, 64, 1000])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95])
def test_top_p_matches_transformers(vocab, p):
    logits = _logits(4, vocab, seed=vocab + int(100 * p))
    ours = apply_top_p(logits, p)
    _assert_same_filter(ours, TopPLogitsWarper(p)(None, logits))
    assert (~torch.isinf(ours)).sum(dim=-1).min() >= 1


@pytest.mark.parametrize("vocab", [16, 257])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 1.0])
def test_warp_chain_matches_transformers(vocab, temperature, top_k, top_p):
    logits = _logits(3, vocab, seed=vocab)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    _assert_same_filter(warp_logits(logits, params), _hf_warp(logits, temperature, top_k, top_p))


def test_top_p_keeps_exactly_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = ~torch.isinf(apply_top_p(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.75
    kept = ~torch.isinf(apply_top_p(logits, 0.85))
    assert kept.tolist() == [[True, True, True, False]]  # 0.8 falls short of 0.85


def test_disabled_filters_are_identity():
    logits = _logits(2, 30)
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 30), logits)
    assert torch.equal(apply_top_p(logits, 1.0), logits)


def test_sampler_draws_match_transformers_probs_with_same_generator():
    logits = _logits(3, 100, seed=5)
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    sampler = Sampler(params, batch_size=3)
    probs = _hf_warp(logits, 0.8, 20, 0.9).softmax(dim=-1)  # [3, 100]
    generators = [torch.Generator().manual_seed(11 + row) for row in range(3)]
    for _ in range(20):
        expected = [torch.multinomial(probs[row], 1, generator=generators[row]).item() for row in range(3)]
        assert sampler(logits).tolist() == expected


# ---- seeding and rows ------------------------------------------------------------------------


def _draws(sampler: Sampler, logits: torch.Tensor, steps: int) -> list[list[int]]:
    return [sampler(logits).tolist() for _ in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(2, 1000)  # uniform: every draw is informative
    params = SamplingParams(do_sample=True, seed=1)
    first = _draws(Sampler(params, 2), logits, 30)
    assert first == _draws(Sampler(params, 2), logits, 30)
    other = _draws(Sampler(SamplingParams(do_sample=True, seed=2), 2), logits, 30)
    assert first != other


def test_unseeded_samplers_differ():
    logits = torch.zeros(1, 1000)
    params = SamplingParams(do_sample=True)
    assert _draws(Sampler(params, 1), logits, 20) != _draws(Sampler(params, 1), logits, 20)


def test_rows_get_different_streams():
    logits = torch.zeros(3, 1000)  # identical rows: only the generators tell them apart
    draws = _draws(Sampler(SamplingParams(do_sample=True, seed=3), 3), logits, 30)
    columns = [[step[row] for step in draws] for row in range(3)]
    assert columns[0] != columns[1] and columns[1] != columns[2]


def test_row_tokens_do_not_depend_on_batch_size():
    logits = _logits(3, 500, seed=9, scale=1.0)
    params = SamplingParams(do_sample=True, temperature=1.2, top_p=0.95, seed=42)
    alone = _draws(Sampler(params, 1), logits[:1], 25)
    batched = _draws(Sampler(params, 3), logits, 25)
    assert [step[0] for step in alone] == [step[0] for step in batched]


def test_row_subset_uses_named_generators():
    logits = _logits(3, 500, seed=4, scale=1.0)
    params = SamplingParams(do_sample=True, seed=8)
    full = _draws(Sampler(params, 3), logits, 20)
    subset_sampler = Sampler(params, 3)
    subset = [subset_sampler(logits[[0, 2]], rows=[0, 2]).tolist() for _ in range(20)]
    assert subset == [[step[0], step[2]] for step in full]


def test_row_subset_shape_mismatch_is_an_error():
    sampler = Sampler(SamplingParams(do_sample=True, seed=0), 3)
    with pytest.raises(ValueError, match="rows"):
        sampler(torch.zeros(2, 10), rows=[0])
    with pytest.raises(ValueError, match="outside"):
        sampler(torch.zeros(1, 10), rows=[3])


# ---- greedy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(do_sample=False, temperature=0.7), SamplingParams(do_sample=True, temperature=0)],
)
def test_greedy_equals_argmax(params):
    assert params.greedy
    logits = _logits(5, 300, seed=2)
    assert torch.equal(Sampler(params, 5)(logits), torch.argmax(logits, dim=-1))


def test_greedy_ties_pick_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert Sampler(SamplingParams(), 1)(logits).tolist() == [1]


@pytest.mark.parametrize("params", [
    SamplingParams(do_sample=True, temperature=1.5, top_k=1, seed=0),
    SamplingParams(do_sample=True, temperature=1.5, top_p=1e-4, seed=0),
])
def test_single_survivor_sampling_equals_greedy(params):
    assert not params.greedy
    sampler = Sampler(params, 4)
    for seed in range(10):
        logits = _logits(4, 200, seed=seed, scale=0.5)
        assert torch.equal(sampler(logits), torch.argmax(logits, dim=-1))


def test_sampling_draws_from_the_kept_set_only():
    logits = _logits(2, 50, seed=6)
    sampler = Sampler(SamplingParams(do_sample=True, top_k=3, seed=0), 2)
    allowed = torch.topk(logits, 3, dim=-1).indices  # [2, 3]
    for _ in range(50):
        tokens = sampler(logits)
        assert all(tokens[row].item() in allowed[row].tolist() for row in range(2))


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("seed", True),
        ("seed", "7"),
        ("do_sample", "yes"),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}=") as info:
        SamplingParams(**{field: value})
    assert "\n" not in str(info.value)


def test_temperature_message_names_range():
    with pytest.raises(ConfigError, match=r"temperature=-1.0 is invalid: use a value >= 0 \(0 means greedy\)"):
        SamplingParams(temperature=-1.0)


def test_valid_edge_values_are_accepted():
    params = SamplingParams(do_sample=True, temperature=0, top_k=0, top_p=1, seed=0)
    assert params.temperature == 0.0 and isinstance(params.top_p, float)


# ---- resolve_sampling -----------------------------------------------------------------------


def test_resolve_defaults_are_greedy_without_top_k():
    params = resolve_sampling({})
    assert params == SamplingParams()
    assert params.greedy and params.top_k == 0


def test_resolve_reads_generation_config():
    defaults = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "bos_token_id": 1}
    params = resolve_sampling(defaults, seed=5)
    assert params == SamplingParams(do_sample=True, temperature=0.6, top_k=20, top_p=0.9, seed=5)


def test_resolve_explicit_args_win():
    defaults = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}
    params = resolve_sampling(defaults, do_sample=False, temperature=0.2, top_k=5, top_p=0.5)
    assert params == SamplingParams(do_sample=False, temperature=0.2, top_k=5, top_p=0.5)


def test_resolve_explicit_zero_temperature_forces_greedy():
    assert resolve_sampling({"do_sample": True, "temperature": 0.6}, temperature=0).greedy


def test_resolve_explicit_temperature_implies_sampling():
    params = resolve_sampling({"top_p": 0.9}, temperature=0.7)
    assert params.do_sample and not params.greedy and params.top_p == 0.9


def test_resolve_file_temperature_alone_stays_greedy():
    assert resolve_sampling({"temperature": 0.7}).greedy


def test_resolve_file_do_sample_false_beats_temperature_inference():
    assert resolve_sampling({"do_sample": False}, temperature=0.7).greedy


def test_resolve_top_k_only_when_present():
    assert resolve_sampling({"do_sample": True}).top_k == 0
    assert resolve_sampling({"do_sample": True, "top_k": 50}).top_k == 50


def test_resolve_ignores_null_values():
    params = resolve_sampling({"do_sample": None, "temperature": None, "top_k": None, "top_p": None})
    assert params == SamplingParams()
    assert resolve_sampling(None) == SamplingParams()


def test_resolve_bad_file_value_points_at_generation_config():
    with pytest.raises(ConfigError, match=r"^top_p=1.5 .*generation_config.json; pass top_p"):
        resolve_sampling({"do_sample": True, "top_p": 1.5})
    with pytest.raises(ConfigError, match=r"^top_p=1.5 is invalid: use a value in \(0, 1\] \(1 disables top-p\)$"):
        resolve_sampling({"top_p": 0.9}, top_p=1.5)
