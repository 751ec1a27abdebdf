"""Mixtral: softmax top-k router renormalized over the chosen experts; experts w1 (gate), w3 (up), w2 (down)."""
from ...model.spec import LayerSpec, ModelSpec, MoeSpec
from .base import LLAMA_STYLE_NAMES, Family, common_fields


def build_spec(cfg) -> ModelSpec:
    moe = MoeSpec(num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
                  intermediate_size=cfg.intermediate_size, norm_topk_prob=True)
    window = getattr(cfg, "sliding_window", None) or None
    layers = tuple(LayerSpec(moe=True, sliding_window=window) for _ in range(cfg.num_hidden_layers))
    return ModelSpec(family="mixtral", moe=moe, layers=layers, **common_fields(cfg))


FAMILY = Family(
    name="mixtral", architectures=("MixtralForCausalLM",), model_types=("mixtral",), build_spec=build_spec,
    names={**LLAMA_STYLE_NAMES, "layers.{l}.moe.router.": "model.layers.{l}.block_sparse_moe.gate."},
    expert_names=("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
                  "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
                  "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight"),
)
