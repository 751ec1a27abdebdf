"""moe_engine.model.rope against transformers' RoPE (modeling_rope_utils and the Llama / Qwen3-Next modules)."""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, Qwen3NextConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import apply_rotary_pos_emb as qwen3_next_apply  # noqa: E402

from moe_engine.model.rope import SUPPORTED_ROPE_TYPES, RopeSpec, Rotary, apply_rotary  # noqa: E402

TOL = 1e-6
HEAD_DIM = 16
MPE = 256  # max_position_embeddings of the test configs

LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 64,  # factor inferred: 256 / 64 = 4
    "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
    "long_factor": [1.0, 1.3, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0],
}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}

# (id, rope_parameters, seq_len the tables are for)
CASES = [
    ("default", {"rope_type": "default", "rope_theta": 5000.0}, 40),
    ("linear", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 40),
    ("dynamic_below", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0}, 200),
    ("dynamic_above", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0}, 700),
    ("yarn", YARN, 40),
    ("yarn_attention_factor", {**YARN, "attention_factor": 0.8}, 40),
    ("yarn_mscale", {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}, 40),
    ("yarn_untruncated_betas", {**YARN, "truncate": False, "beta_fast": 16.0, "beta_slow": 2.0}, 40),
    ("yarn_partial", {**YARN, "partial_rotary_factor": 0.5}, 40),
    (
        "llama3",
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        40,
    ),
    ("longrope_short", LONGROPE, 50),
    ("longrope_long", LONGROPE, 200),
    ("longrope_explicit", {**LONGROPE, "factor": 2.0, "attention_factor": 1.3}, 200),
]
IDS = [c[0] for c in CASES]


def llama_config(rope_parameters: dict, head_dim: int = HEAD_DIM, mpe: int = MPE) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=mpe,
        rope_parameters=copy.deepcopy(rope_parameters),
    )


def ours(rope_parameters: dict, head_dim: int = HEAD_DIM, mpe: int = MPE) -> Rotary:
    spec = RopeSpec.from_rope_parameters(copy.deepcopy(rope_parameters), head_dim, mpe)
    return Rotary(spec)


def hf_init(rope_parameters: dict, seq_len: int):
    """transformers' (inv_freq, attention_scaling) for this config, on the path its rotary module takes."""
    config = llama_config(rope_parameters)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    if rope_type == "dynamic" and seq_len > MPE:
        # the module's dynamic_frequency_update passes a tensor seq_len (float32 base math)
        return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=torch.tensor(seq_len))
    if rope_type == "longrope":
        # the module picks long factors when seq_len > original (it asks for original + 1)
        original = config.rope_parameters["original_max_position_embeddings"]
        return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=original + 1 if seq_len > original else None)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def positions_for(seq_len: int) -> torch.Tensor:
    # [2, T]: a full prefill row and a row ending at seq_len - 1 (decode-like tail), both within seq_len
    full = torch.arange(seq_len)
    return torch.stack((full, full.flip(0)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inv_freq_and_scaling_match_transformers(case):
    _, params, seq_len = case
    want_inv_freq, want_scaling = hf_init(params, seq_len)
    rotary = ours(params)
    got = rotary.inv_freq_at(seq_len)
    assert got.shape == want_inv_freq.shape
    assert (got - want_inv_freq).abs().max().item() < TOL
    assert math.isclose(rotary.attention_scaling, float(want_scaling), rel_tol=0, abs_tol=TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cos_sin_match_llama_rotary_module(case):
    _, params, seq_len = case
    module = LlamaRotaryEmbedding(llama_config(params))
    positions = positions_for(seq_len)
    want_cos, want_sin = module(torch.zeros(1, dtype=torch.float32), positions)
    got_cos, got_sin = ours(params).cos_sin(positions, torch.float32, seq_len=seq_len)
    assert got_cos.shape == want_cos.shape == (2, seq_len, want_cos.shape[-1])
    assert (got_cos - want_cos).abs().max().item() < TOL
    assert (got_sin - want_sin).abs().max().item() < TOL


def test_scaled_types_really_differ_from_default():
    """Guards the parity tests: each case must exercise its scaling, not collapse to plain RoPE."""
    plain = ours({"rope_type": "default", "rope_theta": 10000.0}).inv_freq
    for name, params, seq_len in CASES[1:]:
        rotary = ours(params)
        if params.get("partial_rotary_factor") or name == "dynamic_below":
            continue
        differs = not torch.allclose(rotary.inv_freq_at(seq_len), plain) or rotary.attention_scaling != 1.0
        assert differs, name


def test_llama3_case_covers_all_three_bands():
    params = dict(CASES[IDS.index("llama3")][1])
    wavelen = 2 * math.pi / ours({"rope_type": "default"}).inv_freq
    old = params["original_max_position_embeddings"]
    assert (wavelen < old / params["high_freq_factor"]).any()
    assert (wavelen > old / params["low_freq_factor"]).any()
    assert ((wavelen >= old / params["high_freq_factor"]) & (wavelen <= old / params["low_freq_factor"])).any()


def test_dynamic_follows_module_growth_and_reset():
    params = CASES[IDS.index("dynamic_above")][1]
    module = LlamaRotaryEmbedding(llama_config(params))
    rotary = ours(params)
    x = torch.zeros(1)
    for seq_len in (100, 700, 900, 100):  # grow twice, then drop back inside the trained context
        positions = torch.arange(seq_len)[None]
        want_cos, _ = module(x, positions)
        got_cos, _ = rotary.cos_sin(positions, torch.float32)  # seq_len read from positions
        assert (got_cos - want_cos).abs().max().item() < TOL, seq_len


def test_dynamic_growth_uses_float32_base_like_module():
    """Beyond max_position_embeddings transformers computes the NTK base in float32 tensor math; python-float
    math rounds differently for this config and moves cos by ~1e-5 at long positions."""
    params = {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 3.7}
    module = LlamaRotaryEmbedding(llama_config(params, head_dim=64, mpe=2048))
    positions = torch.arange(9999)[None]
    want_cos, want_sin = module(torch.zeros(1), positions)
    got_cos, got_sin = ours(params, head_dim=64, mpe=2048).cos_sin(positions, torch.float32, seq_len=9999)
    assert (got_cos - want_cos).abs().max().item() < TOL
    assert (got_sin - want_sin).abs().max().item() < TOL


def test_longrope_reads_seq_len_from_positions_when_not_given():
    rotary = ours(LONGROPE)
    decode_step = torch.tensor([[150]])  # one token at position 150 of a 151-long sequence (> original 64)
    module = LlamaRotaryEmbedding(llama_config(LONGROPE))
    want_cos, _ = module(torch.zeros(1), decode_step)
    got_cos, _ = rotary.cos_sin(decode_step, torch.float32)
    assert (got_cos - want_cos).abs().max().item() < TOL
    short_cos, _ = rotary.cos_sin(decode_step, torch.float32, seq_len=60)
    assert (short_cos - want_cos).abs().max().item() > 1e-3


def test_partial_rotary_matches_qwen3_next():
    config = Qwen3NextConfig(
        hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=MPE, partial_rotary_factor=0.5
    )
    module = Qwen3NextRotaryEmbedding(config)
    params = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"], "partial_rotary_factor": 0.5}
    rotary = ours(params, head_dim=32)
    assert rotary.spec.rot_dim == 16 and rotary.inv_freq.shape == (8,)
    assert (rotary.inv_freq - module.inv_freq).abs().max().item() < TOL
    positions = positions_for(30)
    want_cos, want_sin = module(torch.zeros(1), positions)
    got_cos, got_sin = rotary.cos_sin(positions, torch.float32)
    assert (got_cos - want_cos).abs().max().item() < TOL
    assert (got_sin - want_sin).abs().max().item() < TOL

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 30, 32), torch.randn(2, 2, 30, 32)
    want_q, want_k = qwen3_next_apply(q, k, want_cos, want_sin)
    got_q, got_k = apply_rotary(q, k, got_cos, got_sin)
    assert (got_q - want_q).abs().max().item() < TOL
    assert (got_k - want_k).abs().max().item() < TOL
    assert torch.equal(got_q[..., 16:], q[..., 16:])  # pass-through dims untouched
    assert not torch.allclose(got_q[..., :16], q[..., :16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_llama(dtype):
    torch.manual_seed(0)
    rotary = ours(CASES[IDS.index("yarn")][1])  # attention_scaling != 1 exercises the scaled tables
    positions = positions_for(12)
    cos, sin = rotary.cos_sin(positions, dtype)
    assert cos.dtype == sin.dtype == dtype
    q = torch.randn(2, 4, 12, HEAD_DIM, dtype=dtype)
    k = torch.randn(2, 2, 12, HEAD_DIM, dtype=dtype)
    want_q, want_k = llama_apply(q, k, cos, sin)
    got_q, got_k = apply_rotary(q, k, cos, sin)
    assert got_q.dtype == got_k.dtype == dtype
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_apply_rotary_keeps_input_dtype_with_float32_tables():
    rotary = ours({"rope_type": "default"})
    cos, sin = rotary.cos_sin(positions_for(5), torch.float32)
    q = torch.randn(2, 4, 5, HEAD_DIM, dtype=torch.bfloat16)
    got_q, got_k = apply_rotary(q, q[:, :2], cos, sin)
    assert got_q.dtype == got_k.dtype == torch.bfloat16
    want_q, _ = llama_apply(q, q[:, :2], cos.to(torch.bfloat16), sin.to(torch.bfloat16))
    assert torch.equal(got_q, want_q)


def test_rotation_scores_depend_only_on_relative_position():
    rotary = ours({"rope_type": "default"})
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, HEAD_DIM).double(), torch.randn(1, 1, 1, HEAD_DIM).double()

    def score(m, n):
        cos_m, sin_m = rotary.cos_sin(torch.tensor([[m]]), torch.float64)
        cos_n, sin_n = rotary.cos_sin(torch.tensor([[n]]), torch.float64)
        return (apply_rotary(q, q, cos_m, sin_m)[0] * apply_rotary(k, k, cos_n, sin_n)[1]).sum().item()

    assert math.isclose(score(7, 3), score(14, 10), rel_tol=1e-5)
    assert math.isclose(score(0, 5), score(20, 25), rel_tol=1e-5)
    assert len({round(score(7, n), 6) for n in range(8)}) == 8  # but the offset itself matters


def test_legacy_rope_scaling_matches_v5_dict_and_transformers():
    legacy = RopeSpec.from_rope_parameters({"type": "linear", "factor": 4.0}, HEAD_DIM, MPE, rope_theta=5e5)
    v5 = RopeSpec.from_rope_parameters({"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}, HEAD_DIM, MPE)
    assert legacy == v5 and legacy.theta == 5e5 and legacy.factor == 4.0
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM, max_position_embeddings=MPE,
        rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=5e5,
    )  # fmt: skip
    want, _ = ROPE_INIT_FUNCTIONS["linear"](config, "cpu")
    assert (Rotary(legacy).inv_freq - want).abs().max().item() < TOL


def test_none_rope_parameters_give_default_with_theta():
    spec = RopeSpec.from_rope_parameters(None, HEAD_DIM, MPE, rope_theta=1e6)
    assert spec.rope_type == "default" and spec.theta == 1e6 and spec.factor == 1.0
    assert RopeSpec.from_rope_parameters({}, HEAD_DIM, MPE).theta == 10000.0
    # a theta inside the dict wins over the legacy argument, as in transformers
    assert RopeSpec.from_rope_parameters({"rope_theta": 3.0}, HEAD_DIM, MPE, rope_theta=1e6).theta == 3.0


def test_from_rope_parameters_fills_scaled_defaults_and_params():
    yarn = RopeSpec.from_rope_parameters({"rope_type": "yarn", "original_max_position_embeddings": 64}, 16, MPE)
    assert yarn.factor == MPE / 64  # inferred as transformers does when factor is absent
    llama3 = RopeSpec.from_rope_parameters(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 16, MPE
    )
    assert llama3.original_max_position_embeddings == MPE
    longrope = RopeSpec.from_rope_parameters(LONGROPE, 16, MPE)
    keys = [k for k, _ in longrope.params]
    assert keys == sorted(keys) == ["long_factor", "short_factor"]
    assert longrope.param("short_factor") == tuple(LONGROPE["short_factor"])
    hash(longrope)  # lists became tuples, so the frozen spec is hashable


def test_unknown_rope_type_error_lists_supported_types():
    with pytest.raises(ValueError) as err:
        RopeSpec(head_dim=16, rope_type="ntk-by-parts")
    message = str(err.value)
    assert "ntk-by-parts" in message
    assert all(t in message for t in SUPPORTED_ROPE_TYPES)
    with pytest.raises(ValueError, match="mrope"):
        RopeSpec.from_rope_parameters({"type": "mrope"}, 16, MPE)


def test_bad_rotary_dims_and_missing_params_are_rejected():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        RopeSpec(head_dim=16, partial_rotary_factor=0.1875)  # rot_dim 3 is odd
    with pytest.raises(ValueError, match="low_freq_factor"):
        RopeSpec(head_dim=16, rope_type="llama3", factor=8.0)
    with pytest.raises(ValueError, match="entries"):
        Rotary(RopeSpec.from_rope_parameters({**LONGROPE, "short_factor": [1.0] * 3}, 16, MPE))
