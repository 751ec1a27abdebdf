"""Shared fixtures: tiny random checkpoints written by transformers, one per (family, shape) case."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf

transformers_logging = tf.utils.logging
transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

BASE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, eos_token_id=2, bos_token_id=1, pad_token_id=0)

# multi-head latent attention dims of the DeepSeek cases
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)

# name -> (config class, model class, config kwargs, save kwargs (+ dtype, random_biases))
CASES = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2), {}),
    "mixtral-mha-window-sharded-bf16": (
        tf.MixtralConfig, tf.MixtralForCausalLM,
        dict(intermediate_size=40, num_local_experts=6, num_experts_per_tok=3, num_key_value_heads=4,
             sliding_window=5, head_dim=16), dict(max_shard_size="30KB", dtype="bfloat16")),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False), {}),
    "qwen2_moe-sparse-step-window": (
        tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
        dict(num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
             num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[3],
             use_sliding_window=True, sliding_window=6, max_window_layers=2, tie_word_embeddings=True), {}),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, head_dim=12), {}),
    "qwen3_moe-mlp-only-yarn-sharded": (
        tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
        dict(intermediate_size=64, moe_intermediate_size=24, num_experts=5, num_experts_per_tok=2,
             norm_topk_prob=False, mlp_only_layers=[1], attention_bias=True,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 64}),
        dict(max_shard_size="40KB")),
    "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM,
              dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2), {}),
    "olmoe-clip-fp16": (tf.OlmoeConfig, tf.OlmoeForCausalLM,
                        dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2, clip_qkv=0.5,
                             norm_topk_prob=True, num_key_value_heads=4), dict(dtype="float16")),
    # DeepSeek: MLA needs num_key_value_heads == num_attention_heads in transformers
    "deepseek_v2-lite": (
        tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
        dict(MLA, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2,
             n_shared_experts=2, q_lora_rank=None, first_k_dense_replace=1, topk_method="greedy"), {}),
    "deepseek_v2-qlora-grouped-yarn": (
        tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM,
        dict(MLA, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
             n_shared_experts=1, q_lora_rank=12, first_k_dense_replace=0, topk_method="group_limited_greedy",
             n_group=4, topk_group=2, routed_scaling_factor=2.0,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 64, "mscale": 0.8, "mscale_all_dim": 0.9}),
        {"random_biases": True}),
    "deepseek_v3": (
        tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
        dict(MLA, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, q_lora_rank=12, first_k_dense_replace=1, n_group=4, topk_group=2,
             norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True), {"random_biases": True}),
    "deepseek_v3-no-interleave-yarn-sharded-bf16": (
        tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM,
        dict(MLA, num_hidden_layers=4, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=6,
             num_experts_per_tok=3, n_shared_experts=2, q_lora_rank=None, first_k_dense_replace=2, n_group=1,
             topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5, rope_interleave=False,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                              "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0}),
        {"random_biases": True, "max_shard_size": "40KB", "dtype": "bfloat16"}),
    "phimoe": (tf.PhimoeConfig, tf.PhimoeForCausalLM,
               dict(intermediate_size=24, num_local_experts=4, attention_bias=True, lm_head_bias=True),
               {"random_biases": True}),
    "phimoe-longrope-window-jitter": (
        tf.PhimoeConfig, tf.PhimoeForCausalLM,
        dict(intermediate_size=24, num_local_experts=6, num_key_value_heads=4, sliding_window=7,
             router_jitter_noise=0.3, head_dim=16,
             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                              "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [2.0 + 0.5 * i for i in range(8)],
                              "short_mscale": 1.2, "long_mscale": 1.4}),
        {"random_biases": True}),
    # GPT-OSS: sliding + full layers with windows shorter than the prompts, sinks, biases, clamped SwiGLU
    # (limits low enough that the clamps bite), yarn rope; initializer_range makes the experts matter
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=5,
                     swiglu_limit=0.4, initializer_range=0.1,
                     rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                      "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}),
                {}),
    "gpt_oss-gqa-layer-types-sharded-bf16": (
        tf.GptOssConfig, tf.GptOssForCausalLM,
        dict(num_hidden_layers=4, num_key_value_heads=1, intermediate_size=20, num_local_experts=6,
             num_experts_per_tok=3, head_dim=12, sliding_window=3, swiglu_alpha=1.2, swiglu_limit=0.6,
             attention_bias=False, initializer_range=0.08,
             layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"]),
        dict(max_shard_size="30KB", dtype="bfloat16")),
    # Granite-MoE: every multiplier away from 1 so a missing one fails
    "granitemoe": (tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM,
                   dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=6.0,
                        attention_multiplier=0.3, residual_multiplier=0.4, logits_scaling=2.5,
                        initializer_range=0.1), {}),
    "granitemoe-mha-tied-fp16": (
        tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM,
        dict(intermediate_size=20, num_local_experts=6, num_experts_per_tok=3, num_key_value_heads=4,
             tie_word_embeddings=True, attention_bias=True, embedding_multiplier=3.0, attention_multiplier=0.125,
             residual_multiplier=0.6, logits_scaling=1.5, initializer_range=0.1), dict(dtype="float16")),
    "granitemoeshared": (tf.GraniteMoeSharedConfig, tf.GraniteMoeSharedForCausalLM,
                         dict(intermediate_size=24, shared_intermediate_size=16, num_local_experts=5,
                              num_experts_per_tok=2, embedding_multiplier=4.0, attention_multiplier=0.2,
                              residual_multiplier=0.5, logits_scaling=3.0, initializer_range=0.1), {}),
    "granitemoeshared-sharded-bf16": (
        tf.GraniteMoeSharedConfig, tf.GraniteMoeSharedForCausalLM,
        dict(num_hidden_layers=2, intermediate_size=16, shared_intermediate_size=40, num_local_experts=8,
             num_experts_per_tok=4, head_dim=16, embedding_multiplier=2.0, attention_multiplier=0.0625,
             residual_multiplier=0.7, logits_scaling=0.5, initializer_range=0.1),
        dict(max_shard_size="30KB", dtype="bfloat16")),
}

ROUTER_SUFFIXES = ("gate.weight", "router.weight", "router.layer.weight")
# parameters transformers may initialize to zero (or near it); randomized so that dropping them fails a test
RANDOM_SUFFIXES = {"sinks": 1.0, "_bias": 0.3, "router.bias": 0.5, "proj.bias": 0.1}


def _randomize(model: torch.nn.Module, random_biases: bool) -> None:
    """Spread router logits so that top-k choices are not near-ties; give biases and DeepSeek-V3's
    correction bias non-trivial values (transformers initializes them to zero) so a test can catch them."""
    for name, p in model.named_parameters():
        if (name.endswith("gate.weight") or name.endswith("mlp.router.weight")) and p.shape[0] > 1:
            p.normal_(0, 0.5)
        elif random_biases and name.endswith(".bias"):
            p.normal_(0, 0.2)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.uniform_(-0.3, 0.3)


def write_checkpoint(path: Path, case: str, seed: int = 0, overrides: dict | None = None) -> Path:
    """Save a random model of `case` (config kwargs changed by `overrides`; optionally sharded / in half
    precision) to `path`."""
    config_cls, model_cls, cfg_kw, save_kw = CASES[case]
    return write_model(path, config_cls, model_cls, {**cfg_kw, **(overrides or {})}, save_kw, seed=seed)


def write_model(path: Path, config_cls, model_cls, cfg_kw: dict, save_kw: dict, seed: int = 0) -> Path:
    """Save a random model of config_cls(**BASE, **cfg_kw); save_kw: save_pretrained's, plus dtype and
    random_biases."""
    cfg = config_cls(**{**BASE, **cfg_kw})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():   # spread router logits so that top-k choices are not near-ties
        for name, p in model.named_parameters():
            if name.endswith(ROUTER_SUFFIXES) and p.shape[0] > 1:
                p.normal_(0, 0.5)
            for suffix, std in RANDOM_SUFFIXES.items():
                if name.endswith(suffix):
                    p.normal_(0, std)
    save_kw = dict(save_kw)
    with torch.no_grad():
        _randomize(model, save_kw.pop("random_biases", False))
    dtype = save_kw.pop("dtype", None)
    if dtype:
        model = model.to(getattr(torch, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **save_kw)
    return path


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(case) -> directory with that case's checkpoint (written once per session)."""
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            made[case] = write_checkpoint(tmp_path_factory.mktemp(case), case)
        return made[case]
    return get


def load_hf(path: Path):
    """The transformers model of a checkpoint in float32 (the reference)."""
    config = tf.AutoConfig.from_pretrained(path)
    cls = getattr(tf, config.architectures[0])
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A tiny Mixtral checkpoint with a trained tokenizer and chat template (see tokenized.py)."""
    from tokenized import tokenized_checkpoint
    return tokenized_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def eng(tok_dir):
    """float32 Engine on tok_dir, closed after the module."""
    import moe_engine
    engine = moe_engine.load(tok_dir, device="cpu", dtype="float32", progress=False)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny matmuls and training batches run fastest there (and do not fight
    other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
