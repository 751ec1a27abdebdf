"""Granite-MoE and Granite-MoE-Shared: embedding, attention (softmax scale), residual and logit
multipliers; a router without bias (top-k of the logits, softmax over those k: the same weights as
softmax then top-k renormalized); GraniteMoeShared adds a shared SwiGLU MLP to every MoE layer.

Experts are stacked per layer, gate rows then up rows, so each expert's two slices are already
the packed layout [gate | up | down] and are read straight into cache slots:
    block_sparse_moe.input_linear.weight [E, 2I, D], block_sparse_moe.output_linear.weight [E, D, I]
The shared MLP is fused the same way: shared_mlp.input_linear.weight [2S, D] (gate rows, then up rows).
"""
from ...model.spec import LayerSpec, ModelSpec, MoeSpec
from ..expert_format import ExpertFormat
from .base import LLAMA_STYLE_NAMES, Family, common_fields

MOE = "model.layers.{l}.block_sparse_moe."
SHARED = "model.layers.{l}.shared_mlp."


def build_spec(cfg) -> ModelSpec:
    moe = MoeSpec(num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
                  intermediate_size=cfg.intermediate_size, norm_topk_prob=True,
                  shared_intermediate_size=getattr(cfg, "shared_intermediate_size", 0) or 0)
    layers = tuple(LayerSpec(moe=True) for _ in range(cfg.num_hidden_layers))
    bias = bool(getattr(cfg, "attention_bias", False))
    return ModelSpec(family="granitemoe", moe=moe, layers=layers, qkv_bias=bias, o_bias=bias,
                     attention_scale=float(cfg.attention_multiplier),
                     embedding_multiplier=float(cfg.embedding_multiplier),
                     residual_multiplier=float(cfg.residual_multiplier),
                     logits_scaling=float(cfg.logits_scaling), **common_fields(cfg))


def _shapes(spec):
    d, i = spec.hidden_size, spec.moe.intermediate_size
    return (2 * i, d), (d, i)


EXPERT_FORMAT = ExpertFormat(names=(MOE + "input_linear.weight", MOE + "output_linear.weight"), shapes=_shapes,
                             description="stacked input_linear / output_linear")

FAMILY = Family(
    name="granitemoe", architectures=("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"),
    model_types=("granitemoe", "granitemoeshared"), build_spec=build_spec,
    names={**LLAMA_STYLE_NAMES, "layers.{l}.moe.router.": MOE + "router.layer.",
           "layers.{l}.moe.shared.down.": SHARED + "output_linear."},
    expert_names=EXPERT_FORMAT.names, expert_format=lambda cfg: EXPERT_FORMAT,
    fused={"layers.{l}.moe.shared.gate.weight": (SHARED + "input_linear.weight", 0, 2),
           "layers.{l}.moe.shared.up.weight": (SHARED + "input_linear.weight", 1, 2)},
)
