"""DeepSeek-V2 (and V2-Lite): multi-head latent attention, shared experts, softmax routing that is
greedy or group-limited greedy, a routed scaling factor, dense first layers (first_k_dense_replace).

The helpers here (MLA dims, softmax scale, tensor names, layer list) are shared with deepseek_v3.py.
"""
from __future__ import annotations

import math

from ...errors import CheckpointError
from ...model.spec import LayerSpec, MlaSpec, ModelSpec, MoeSpec
from .base import LLAMA_STYLE_EXPERT, LLAMA_STYLE_NAMES, Family, common_fields

TOPK_METHODS = ("greedy", "group_limited_greedy")

DEEPSEEK_NAMES = {
    **LLAMA_STYLE_NAMES,
    "layers.{l}.moe.shared.gate.": "model.layers.{l}.mlp.shared_experts.gate_proj.",
    "layers.{l}.moe.shared.up.": "model.layers.{l}.mlp.shared_experts.up_proj.",
    "layers.{l}.moe.shared.down.": "model.layers.{l}.mlp.shared_experts.down_proj.",
    "layers.{l}.moe.correction_bias": "model.layers.{l}.mlp.gate.e_score_correction_bias",
}


def softmax_scale(cfg) -> float:
    """(Dn + Dr) ** -0.5, times mscale(factor, mscale_all_dim) ** 2 under scaled (yarn) rotary."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rp = getattr(cfg, "rope_parameters", None) or {}
    m_all = rp.get("mscale_all_dim") or 0
    if rp.get("rope_type", "default") != "default" and m_all:
        factor = rp["factor"]
        mscale = 0.1 * m_all * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= mscale * mscale
    return scale


def mla_spec(cfg, rope_interleave: bool) -> MlaSpec:
    return MlaSpec(kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                   qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, q_lora_rank=cfg.q_lora_rank,
                   rope_interleave=rope_interleave, softmax_scale=softmax_scale(cfg))


def deepseek_spec(cfg, family: str, moe: MoeSpec, rope_interleave: bool) -> ModelSpec:
    """The parts V2 and V3 share: MLA, dense first layers, attention biases."""
    if getattr(cfg, "mlp_bias", False):
        raise CheckpointError(f"{family}: mlp_bias=true in config.json is not supported (dense and shared MLPs "
                              f"without biases only); set mlp_bias to false or use a checkpoint without MLP biases")
    dense = cfg.first_k_dense_replace or 0
    layers = tuple(LayerSpec(moe=i >= dense, dense_intermediate_size=cfg.intermediate_size)
                   for i in range(cfg.num_hidden_layers))
    bias = bool(getattr(cfg, "attention_bias", False))
    return ModelSpec(family=family, moe=moe, layers=layers, qkv_bias=bias, o_bias=bias,
                     mla=mla_spec(cfg, rope_interleave), **common_fields(cfg))


def build_spec(cfg) -> ModelSpec:
    method = cfg.topk_method or "greedy"
    if method not in TOPK_METHODS:
        raise CheckpointError(f"deepseek_v2: topk_method={method!r} in config.json is not supported; supported: "
                              f"{', '.join(TOPK_METHODS)} (noaux_tc is DeepSeek-V3: use DeepseekV3ForCausalLM)")
    grouped = method == "group_limited_greedy"
    # transformers' DeepSeek-V2 router never renormalizes (norm_topk_prob is ignored); released V2 configs set false
    moe = MoeSpec(num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
                  intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=False,
                  shared_intermediate_size=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0),
                  n_group=cfg.n_group if grouped else 1, topk_group=cfg.topk_group if grouped else 1,
                  routed_scaling_factor=float(cfg.routed_scaling_factor), router_fp32=True)
    return deepseek_spec(cfg, "deepseek_v2", moe, rope_interleave=True)


FAMILY = Family(name="deepseek_v2", architectures=("DeepseekV2ForCausalLM",), model_types=("deepseek_v2",),
                build_spec=build_spec, names=DEEPSEEK_NAMES, expert_names=LLAMA_STYLE_EXPERT,
                experts_field="n_routed_experts")
