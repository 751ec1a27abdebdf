"""The generic decoder's shape: one frozen spec that every model family maps its config onto.

Imports torch-free types only, so checkpoint/ can build a spec without touching the model code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .rope import RopeSpec


@dataclass(frozen=True)
class ClampedSwiGlu:
    """GPT-OSS expert gating: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit)."""

    alpha: float = 1.702
    limit: float = 7.0


@dataclass(frozen=True)
class MoeSpec:
    """Routed experts of one MoE layer kind (all MoE layers of a model share it)."""

    num_experts: int
    top_k: int
    intermediate_size: int            # I: FFN width of one routed expert
    norm_topk_prob: bool              # renormalize the top-k probabilities to sum to 1
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # sigmoid(x @ w) scales the shared expert output (Qwen2-MoE)
    router_bias: bool = False          # router logits = x @ W^T + b (GPT-OSS)
    expert_bias: bool = False          # each routed expert has gate, up and down biases (GPT-OSS)
    expert_act: ClampedSwiGlu | None = None   # None: act(gate) * up with the model's hidden_act

    def __post_init__(self):
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: attention window and whether its FFN is MoE or dense."""

    moe: bool
    dense_intermediate_size: int = 0   # used when moe is False
    sliding_window: int | None = None  # None: full causal attention


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int                   # D
    num_heads: int                     # H
    num_kv_heads: int                  # Hkv
    head_dim: int                      # Dh
    rms_norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    moe: MoeSpec
    layers: tuple[LayerSpec, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"              # "none" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    clip_qkv: float | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    dtype: str = "float32"             # the checkpoint's dtype as config.json states it
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default=())
    pad_token_id: int | None = None
    attention_sinks: bool = False      # a learned logit per head joins each softmax's denominator (GPT-OSS)
    attention_scale: float | None = None   # softmax scale; None: head_dim ** -0.5 (Granite: attention_multiplier)
    embedding_multiplier: float = 1.0  # embeddings scaled before the first layer (Granite)
    residual_multiplier: float = 1.0   # attention and FFN outputs scaled before each residual add (Granite)
    logits_scaling: float = 1.0        # logits divided by it (Granite)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm={self.qk_norm!r}: expected none, head or full")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.moe]
