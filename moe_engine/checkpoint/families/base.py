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
