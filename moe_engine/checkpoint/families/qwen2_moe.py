"""Qwen2-MoE (Qwen1.5-MoE): qkv bias, a shared expert scaled by sigmoid(shared_expert_gate(x)),
decoder_sparse_step / mlp_only_layers choosing dense layers, optional per-layer sliding window."""
from ...model.spec import LayerSpec, ModelSpec, MoeSpec
from .base import LLAMA_STYLE_EXPERT, LLAMA_STYLE_NAMES, Family, common_fields, is_sparse_layer


def _window(cfg, layer: int):
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return cfg.sliding_window if types[layer] == "sliding_attention" and cfg.sliding_window else None
    use = getattr(cfg, "use_sliding_window", False) and layer < getattr(cfg, "max_window_layers", 0)
    return cfg.sliding_window if use else None


def build_spec(cfg) -> ModelSpec:
    moe = MoeSpec(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                  intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=bool(cfg.norm_topk_prob),
                  shared_intermediate_size=cfg.shared_expert_intermediate_size, shared_expert_gate=True)
    layers = tuple(LayerSpec(moe=is_sparse_layer(cfg, i), dense_intermediate_size=cfg.intermediate_size,
                             sliding_window=_window(cfg, i)) for i in range(cfg.num_hidden_layers))
    return ModelSpec(family="qwen2_moe", moe=moe, layers=layers, qkv_bias=bool(getattr(cfg, "qkv_bias", True)),
                     **common_fields(cfg))


FAMILY = Family(name="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), model_types=("qwen2_moe",),
                build_spec=build_spec, names=LLAMA_STYLE_NAMES, expert_names=LLAMA_STYLE_EXPERT,
                experts_field="num_experts")
