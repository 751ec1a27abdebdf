"""DeepSeek-V3 (and R1): MLA as V2, sigmoid router scores with a per-expert correction
bias used only to choose experts (noaux_tc), groups scored by their two best experts, renormalized weights
and a routed scaling factor; rotary interleaved or not (rope_interleave)."""
from __future__ import annotations

from ...errors import CheckpointError
from ...model.spec import ModelSpec, MoeSpec
from .base import LLAMA_STYLE_EXPERT, Family
from .deepseek_v2 import DEEPSEEK_NAMES, deepseek_spec

TOPK_METHODS = ("noaux_tc",)


def build_spec(cfg) -> ModelSpec:
    method = getattr(cfg, "topk_method", None) or "noaux_tc"
    if method not in TOPK_METHODS:
        raise CheckpointError(f"deepseek_v3: topk_method={method!r} in config.json is not supported; supported: "
                              f"{', '.join(TOPK_METHODS)} (greedy / group_limited_greedy are DeepSeek-V2: use "
                              f"DeepseekV2ForCausalLM)")
    moe = MoeSpec(num_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
                  intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=bool(cfg.norm_topk_prob),
                  shared_intermediate_size=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0),
                  scoring="sigmoid", n_group=cfg.n_group or 1, topk_group=cfg.topk_group or 1, group_score_top=2,
                  correction_bias=True, routed_scaling_factor=float(cfg.routed_scaling_factor), router_fp32=True)
    interleave = getattr(cfg, "rope_interleave", True)
    return deepseek_spec(cfg, "deepseek_v3", moe, rope_interleave=True if interleave is None else bool(interleave))


FAMILY = Family(name="deepseek_v3", architectures=("DeepseekV3ForCausalLM",), model_types=("deepseek_v3",),
                build_spec=build_spec, names=DEEPSEEK_NAMES, expert_names=LLAMA_STYLE_EXPERT,
                experts_field="n_routed_experts")
