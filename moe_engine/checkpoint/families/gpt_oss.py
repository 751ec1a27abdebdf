"""GPT-OSS: attention sinks, sliding and full attention layers (layer_types), biases on q/k/v/o,
a router with bias (top-k of the logits, softmax over those k: the same weights as softmax then
top-k renormalized), experts with biases and the clamped SwiGLU ((up + 1) * gate * sigmoid(alpha gate)).

Experts are stacked per layer with gate and up columns interleaved:
    mlp.experts.gate_up_proj [E, D, 2I] (+ _bias [E, 2I]), mlp.experts.down_proj [E, I, D] (+ _bias [E, D])
and, in the released checkpoints (quantization_config.quant_method "mxfp4"), as MXFP4:
    gate_up_proj_blocks [E, 2I, D/32, 16] + _scales [E, 2I, D/32], down_proj_blocks [E, D, I/32, 16] + _scales.
Both are converted at load into the packed layout [gate | up | down | biases] (MXFP4 decoded to the model dtype).
"""
import torch

from ...errors import CheckpointError
from ...model.spec import ClampedSwiGlu, LayerSpec, ModelSpec, MoeSpec
from ..mxfp4 import BLOCK, dequantize_mxfp4
from ..expert_format import ExpertFormat
from .base import LLAMA_STYLE_NAMES, Family, common_fields

EXPERTS = "model.layers.{l}.mlp.experts."


def build_spec(cfg) -> ModelSpec:
    moe = MoeSpec(num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
                  intermediate_size=cfg.intermediate_size, norm_topk_prob=True, router_bias=True, expert_bias=True,
                  expert_act=ClampedSwiGlu(alpha=float(cfg.swiglu_alpha), limit=float(cfg.swiglu_limit)))
    types = cfg.layer_types
    layers = tuple(LayerSpec(moe=True, sliding_window=cfg.sliding_window if types[i] == "sliding_attention" else None)
                   for i in range(cfg.num_hidden_layers))
    bias = bool(getattr(cfg, "attention_bias", True))
    return ModelSpec(family="gpt_oss", moe=moe, layers=layers, qkv_bias=bias, o_bias=bias, attention_sinks=True,
                     **common_fields(cfg))


def _deinterleave(w: torch.Tensor, b: torch.Tensor, down: torch.Tensor, down_b: torch.Tensor) -> list[torch.Tensor]:
    """W1 [2I, D] with gate, up rows alternating (and its bias [2I]) -> sections gate, up, down, biases."""
    return [w[0::2], w[1::2], down, b[0::2], b[1::2], down_b]


def _sections(spec, t: list[torch.Tensor]) -> list[torch.Tensor]:
    gate_up, gate_up_b, down, down_b = t             # [D, 2I], [2I], [I, D], [D]
    return _deinterleave(gate_up.t(), gate_up_b, down.t(), down_b)


def _sections_mxfp4(spec, t: list[torch.Tensor]) -> list[torch.Tensor]:
    gu_blocks, gu_scales, gu_b, d_blocks, d_scales, d_b = t
    gate_up = dequantize_mxfp4(gu_blocks, gu_scales)  # [2I, D] float32, exact
    down = dequantize_mxfp4(d_blocks, d_scales)       # [D, I]
    return _deinterleave(gate_up, gu_b, down, d_b)


def _shapes(spec):
    d, i = spec.hidden_size, spec.moe.intermediate_size
    return (d, 2 * i), (2 * i,), (i, d), (d,)


def _shapes_mxfp4(spec):
    d, i = spec.hidden_size, spec.moe.intermediate_size
    if d % BLOCK or i % BLOCK:
        raise CheckpointError(f"MXFP4 experts need hidden_size ({d}) and intermediate_size ({i}) divisible by "
                              f"{BLOCK}; config.json and the checkpoint do not match")
    return ((2 * i, d // BLOCK, BLOCK // 2), (2 * i, d // BLOCK), (2 * i,),
            (d, i // BLOCK, BLOCK // 2), (d, i // BLOCK), (d,))


FLOAT_FORMAT = ExpertFormat(
    names=tuple(EXPERTS + n for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")),
    shapes=_shapes, to_sections=_sections, description="gate_up_proj / down_proj with biases")
MXFP4_FORMAT = ExpertFormat(
    names=tuple(EXPERTS + n for n in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                                      "down_proj_blocks", "down_proj_scales", "down_proj_bias")),
    shapes=_shapes_mxfp4, to_sections=_sections_mxfp4,
    dtypes=(torch.uint8, torch.uint8, None, torch.uint8, torch.uint8, None), description="MXFP4 blocks + scales")


def quant_method(cfg) -> str | None:
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return None
    return qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)


def expert_format(cfg) -> ExpertFormat:
    method = quant_method(cfg)
    if method is None:
        return FLOAT_FORMAT
    if str(method).lower() == "mxfp4":
        return MXFP4_FORMAT
    raise CheckpointError(f"config.json quantization_config.quant_method={method!r} is not supported for GPT-OSS; "
                          f"supported: mxfp4 (the released checkpoints) or an unquantized checkpoint")


FAMILY = Family(
    name="gpt_oss", architectures=("GptOssForCausalLM",), model_types=("gpt_oss",), build_spec=build_spec,
    names={**LLAMA_STYLE_NAMES, "layers.{l}.moe.router.": "model.layers.{l}.mlp.router."},
    expert_names=FLOAT_FORMAT.names, expert_format=expert_format,
)
