"""OLMoE: RMSNorm over the whole q and k projections, optional clip_qkv, no sliding window."""
from ...model.spec import LayerSpec, ModelSpec, MoeSpec
from .base import LLAMA_STYLE_EXPERT, LLAMA_STYLE_NAMES, Family, common_fields


def build_spec(cfg) -> ModelSpec:
    moe = MoeSpec(num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                  intermediate_size=cfg.intermediate_size, norm_topk_prob=bool(cfg.norm_topk_prob))
    layers = tuple(LayerSpec(moe=True) for _ in range(cfg.num_hidden_layers))
    bias = bool(getattr(cfg, "attention_bias", False))
    return ModelSpec(family="olmoe", moe=moe, layers=layers, qkv_bias=bias, o_bias=bias, qk_norm="full",
                     clip_qkv=getattr(cfg, "clip_qkv", None), **common_fields(cfg))


FAMILY = Family(name="olmoe", architectures=("OlmoeForCausalLM",), model_types=("olmoe",),
                build_spec=build_spec, names=LLAMA_STYLE_NAMES, expert_names=LLAMA_STYLE_EXPERT,
                experts_field="num_experts")
