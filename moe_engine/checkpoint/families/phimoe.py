"""Phi-MoE (Phi-3.5-MoE): sparsemixer top-2 routing, LayerNorm with bias, attention and lm_head biases,
longrope with its own short/long attention factors, Mixtral's tensor names."""
from __future__ import annotations

from ...errors import CheckpointError
from ...model.rope import RopeSpec
from ...model.spec import LayerSpec, ModelSpec, MoeSpec
from .base import LLAMA_STYLE_NAMES, Family, common_fields
from .mixtral import FAMILY as MIXTRAL


def _rope(cfg, head_dim: int) -> RopeSpec:
    """rope_parameters with a top-level original_max_position_embeddings (Phi-3.5-MoE) merged in."""
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    original = getattr(cfg, "original_max_position_embeddings", None)
    if original and "original_max_position_embeddings" not in rp:
        rp["original_max_position_embeddings"] = original
    return RopeSpec.from_rope_parameters(rp, head_dim, cfg.max_position_embeddings,
                                         rope_theta=getattr(cfg, "rope_theta", None))


def build_spec(cfg) -> ModelSpec:
    if cfg.num_experts_per_tok != 2:
        raise CheckpointError(f"phimoe: num_experts_per_tok={cfg.num_experts_per_tok} in config.json; Phi-MoE's "
                              f"sparsemixer router always picks 2 experts (as transformers does): set it to 2")
    moe = MoeSpec(num_experts=cfg.num_local_experts, top_k=2, intermediate_size=cfg.intermediate_size,
                  norm_topk_prob=False, scoring="sparsemixer", jitter_eps=float(cfg.router_jitter_noise))
    window = getattr(cfg, "sliding_window", None) or None
    layers = tuple(LayerSpec(moe=True, sliding_window=window) for _ in range(cfg.num_hidden_layers))
    fields = common_fields(cfg)
    fields["rope"] = _rope(cfg, fields["head_dim"])
    bias = bool(getattr(cfg, "attention_bias", False))
    return ModelSpec(family="phimoe", moe=moe, layers=layers, qkv_bias=bias, o_bias=bias, norm="layer",
                     lm_head_bias=bool(getattr(cfg, "lm_head_bias", False)), **fields)


FAMILY = Family(name="phimoe", architectures=("PhimoeForCausalLM", "PhiMoEForCausalLM"), model_types=("phimoe",),
                build_spec=build_spec, names={**LLAMA_STYLE_NAMES, **MIXTRAL.names}, expert_names=MIXTRAL.expert_names)
