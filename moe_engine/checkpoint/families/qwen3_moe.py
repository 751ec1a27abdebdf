"""Qwen3-MoE: RMSNorm on each q/k head before rotary, norm_topk_prob, decoder_sparse_step / mlp_only_layers."""
from ...model.spec import LayerSpec, ModelSpec, MoeSpec
from .base import LLAMA_STYLE_EXPERT, LLAMA_STYLE_NAMES, Family, common_fields, is_sparse_layer


def build_spec(cfg) -> ModelSpec:
    moe = MoeSpec(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                  intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=bool(cfg.norm_topk_prob))
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", False) else None
    layers = tuple(LayerSpec(moe=is_sparse_layer(cfg, i), dense_intermediate_size=cfg.intermediate_size,
                             sliding_window=window or None) for i in range(cfg.num_hidden_layers))
    bias = bool(getattr(cfg, "attention_bias", False))
    return ModelSpec(family="qwen3_moe", moe=moe, layers=layers, qkv_bias=bias, o_bias=bias, qk_norm="head",
                     **common_fields(cfg))


FAMILY = Family(name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_types=("qwen3_moe",),
                build_spec=build_spec, names=LLAMA_STYLE_NAMES, expert_names=LLAMA_STYLE_EXPERT,
                experts_field="num_experts")
