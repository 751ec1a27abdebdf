"""What a model family is: a config -> ModelSpec function and a naming of checkpoint tensors.

The generic decoder names its weights `embed.weight`, `layers.{l}.attn.q_proj.weight`, ... (see
model/decoder.py). A family maps each generic name onto the checkpoint's name and names the
three tensors of each routed expert. Most families only override a few prefixes.

Families whose checkpoints differ more say so with two optional fields: `expert_format` (experts
stored stacked, fused, transposed or quantized; see checkpoint/expert_format.py) and `fused`
(a generic tensor that is one of several equal row blocks of a checkpoint tensor, e.g. gate and
up of a fused input_linear).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...model.rope import RopeSpec
from ...model.spec import ModelSpec
from ..expert_format import ExpertFormat

# generic prefix -> checkpoint prefix, applied longest first; {l} is the layer index
LLAMA_STYLE_NAMES = {
    "embed.": "model.embed_tokens.",
    "norm.": "model.norm.",
    "lm_head.": "lm_head.",
    "layers.{l}.attn_norm.": "model.layers.{l}.input_layernorm.",
    "layers.{l}.ffn_norm.": "model.layers.{l}.post_attention_layernorm.",
    "layers.{l}.attn.": "model.layers.{l}.self_attn.",
    "layers.{l}.moe.router.": "model.layers.{l}.mlp.gate.",
    "layers.{l}.moe.shared.gate.": "model.layers.{l}.mlp.shared_expert.gate_proj.",
    "layers.{l}.moe.shared.up.": "model.layers.{l}.mlp.shared_expert.up_proj.",
    "layers.{l}.moe.shared.down.": "model.layers.{l}.mlp.shared_expert.down_proj.",
    "layers.{l}.moe.shared_gate.": "model.layers.{l}.mlp.shared_expert_gate.",
    "layers.{l}.mlp.gate.": "model.layers.{l}.mlp.gate_proj.",
    "layers.{l}.mlp.up.": "model.layers.{l}.mlp.up_proj.",
    "layers.{l}.mlp.down.": "model.layers.{l}.mlp.down_proj.",
}
LLAMA_STYLE_EXPERT = ("model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
                      "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
                      "model.layers.{l}.mlp.experts.{e}.down_proj.weight")


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]            # config.json "architectures" values it handles
    model_types: tuple[str, ...]              # config.json "model_type" values it handles
    build_spec: Callable[[object], ModelSpec]  # transformers config -> spec
    names: dict                               # generic prefix -> checkpoint prefix
    expert_names: tuple[str, ...]             # gate, up, down templates with {l} and {e}
    # config -> how experts are stored, when not as the three expert_names per expert
    expert_format: Callable[[object], ExpertFormat] | None = None
    # generic name template -> (checkpoint name template, part, parts): rows block `part` of `parts` (dim 0)
    fused: dict = field(default_factory=dict)
    experts_field: str = "num_local_experts"  # config.json's name for the routed experts per layer

    def checkpoint_name(self, generic: str) -> str:
        """'layers.3.attn.q_proj.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
        layer = generic.split(".")[1] if generic.startswith("layers.") else None
        for gen, ckpt in sorted(self.names.items(), key=lambda kv: -len(kv[0])):
            gen = gen.replace("{l}", layer) if layer is not None else gen
            if generic.startswith(gen):
                return ckpt.replace("{l}", layer or "") + generic[len(gen):]
        raise KeyError(f"{self.name}: no checkpoint name for {generic!r}")

    def expert_tensor_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        return tuple(t.format(l=layer, e=expert) for t in self.expert_names)

    def expert_format_for(self, cfg) -> ExpertFormat:
        return self.expert_format(cfg) if self.expert_format is not None else ExpertFormat(self.expert_names)

    def fused_source(self, generic: str) -> tuple[str, int, int] | None:
        """(checkpoint name, part, parts) when `generic` is a row block of a fused checkpoint tensor, else None."""
        layer = generic.split(".")[1] if generic.startswith("layers.") else ""
        for gen, (ckpt, part, parts) in self.fused.items():
            if gen.replace("{l}", layer) == generic:
                return ckpt.replace("{l}", layer), part, parts
        return None


def _dtype_name(cfg) -> str:
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    return str(dt).removeprefix("torch.")


def _eos(cfg) -> tuple[int, ...]:
    eos = getattr(cfg, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def common_fields(cfg) -> dict:
    """ModelSpec fields that every Llama-style config spells the same way."""
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope_params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope=RopeSpec.from_rope_parameters(rope_params, head_dim, cfg.max_position_embeddings,
                                           rope_theta=getattr(cfg, "rope_theta", None)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        hidden_act=getattr(cfg, "hidden_act", "silu"), dtype=_dtype_name(cfg),
        bos_token_id=getattr(cfg, "bos_token_id", None), eos_token_id=_eos(cfg),
        pad_token_id=getattr(cfg, "pad_token_id", None),
    )


def is_sparse_layer(cfg, layer: int) -> bool:
    """Qwen-style decoder_sparse_step / mlp_only_layers rule."""
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return (layer not in (getattr(cfg, "mlp_only_layers", None) or [])
            and cfg.num_experts > 0 and (layer + 1) % step == 0)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---- config.json values: checked before transformers parses them and before any arithmetic on them ----------

POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "moe_intermediate_size", "max_position_embeddings",
                 "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank",
                 "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
                 "decoder_sparse_step")
NON_NEGATIVE_INTS = ("shared_expert_intermediate_size", "shared_intermediate_size", "n_shared_experts",
                     "first_k_dense_replace", "sliding_window", "num_nextn_predict_layers")
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta", "logits_scaling")
NUMBERS = ("routed_scaling_factor", "swiglu_alpha", "swiglu_limit", "embedding_multiplier", "attention_multiplier",
           "residual_multiplier", "partial_rotary_factor", "router_jitter_noise")


def _bad_value(key: str, value, kind: str) -> str:
    return f"field {key!r} is {json_repr(value)} ({type(value).__name__}); it must be {kind}"


def json_repr(value) -> str:
    return repr(value) if not isinstance(value, str) else f'"{value}"'


def check_raw_config(raw: dict) -> str | None:
    """The first numeric field of config.json with a wrong type or range, as a sentence naming it; else None.
    null is left to transformers' defaults."""
    for key in (*POSITIVE_INTS, *NON_NEGATIVE_INTS):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            return _bad_value(key, value, "an integer")
        if value < (1 if key in POSITIVE_INTS else 0):
            return _bad_value(key, value, "at least 1" if key in POSITIVE_INTS else "0 or more")
    for key in (*POSITIVE_NUMBERS, *NUMBERS):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return _bad_value(key, value, "a number")
        if key in POSITIVE_NUMBERS and not value > 0:
            return _bad_value(key, value, "greater than 0")
    return None


def check_config(cfg, family: Family) -> str | None:
    """Relations between the parsed config's fields that the decoder relies on, as a sentence naming the fields
    (None when they hold): experts per token within the experts, heads over key/value heads, the head size."""
    experts = getattr(cfg, family.experts_field, None)
    if not isinstance(experts, int) or experts < 1:
        return f"field {family.experts_field!r} is {experts!r}; a MoE model needs at least 1 routed expert per layer"
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if isinstance(top_k, int) and top_k > experts:
        return (f"field 'num_experts_per_tok' is {top_k}, more than the {experts} experts of "
                f"{family.experts_field!r}; it must be in 1..{experts}")
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        return (f"field 'num_attention_heads' ({heads}) is not a multiple of 'num_key_value_heads' ({kv_heads}); "
                f"each key/value head serves a whole group of query heads")
    if getattr(cfg, "head_dim", None) is None and hidden % heads:
        return (f"field 'hidden_size' ({hidden}) is not a multiple of 'num_attention_heads' ({heads}) and no "
                f"'head_dim' is given; fix hidden_size or set head_dim")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    prf = getattr(cfg, "partial_rotary_factor", None) or 1.0
    if getattr(cfg, "qk_rope_head_dim", None) is None and int(head_dim * prf) % 2:
        source = "'head_dim'" if getattr(cfg, "head_dim", None) else \
            f"'hidden_size' / 'num_attention_heads' = {hidden} / {heads}"
        return (f"the rotary dimension is odd: head size {head_dim} (from {source}) x partial_rotary_factor {prf} = "
                f"{int(head_dim * prf)}; rotary embeddings rotate pairs of dimensions, so it must be even: fix "
                f"{'head_dim' if getattr(cfg, 'head_dim', None) else 'hidden_size or set head_dim'}")
    return None
