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
    scoring: str = "softmax"          # router scores: "softmax" | "sigmoid" | "sparsemixer" (see model/routing.py)
    n_group: int = 1                  # experts split into n_group equal groups (DeepSeek grouped top-k)
    topk_group: int = 1               # only the topk_group best groups are eligible
    group_score_top: int = 1          # a group scores the sum of its best group_score_top experts (1: max)
    correction_bias: bool = False     # per-expert bias added to the scores to choose experts, not to weight them
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' combined output
    router_fp32: bool = False         # router matmul in float32 whatever the model dtype (DeepSeek)
    jitter_eps: float = 0.0           # sparsemixer: experts within a relative margin 2 * jitter_eps share the softmax
    router_bias: bool = False          # router logits = x @ W^T + b (GPT-OSS)
    expert_bias: bool = False          # each routed expert has gate, up and down biases (GPT-OSS)
    expert_act: ClampedSwiGlu | None = None   # None: act(gate) * up with the model's hidden_act

    def __post_init__(self):
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"router scoring {self.scoring!r} is not supported; supported: {', '.join(SCORINGS)}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}; check config.json")
        per_group = self.num_experts // self.n_group
        if not 0 < self.topk_group <= self.n_group or self.topk_group * per_group < self.top_k:
            raise ValueError(f"topk_group={self.topk_group} groups of {per_group} experts cannot hold top_k={self.top_k} "
                             f"experts (need 1 <= topk_group <= n_group={self.n_group}); check config.json")
        if not 0 < self.group_score_top <= per_group:
            raise ValueError(f"group_score_top={self.group_score_top} must be in 1..{per_group} (experts per group)")


SCORINGS = ("softmax", "sigmoid", "sparsemixer")
NORMS = ("rms", "layer")


@dataclass(frozen=True)
class MlaSpec:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one compressed latent.

    Per token the cache holds the latent c_kv [kv_lora_rank] and one rotary key k_pe [qk_rope_head_dim]
    shared by all heads, instead of per-head keys and values.
    """

    kv_lora_rank: int                  # R: width of the compressed latent c_kv
    qk_nope_head_dim: int              # per-head q/k dims without rotary
    qk_rope_head_dim: int              # per-head q dims (and the shared k_pe) with rotary
    v_head_dim: int                    # per-head value dim
    q_lora_rank: int | None = None     # None: q = q_proj(x); else q = q_b(norm(q_a(x)))
    rope_interleave: bool = True       # rotary pairs (0,1), (2,3), ... instead of (i, i + d/2)
    softmax_scale: float | None = None  # None: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.qk_head_dim ** -0.5


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
    mla: MlaSpec | None = None         # None: grouped-query attention; else multi-head latent attention
    norm: str = "rms"                  # "rms" (RMSNorm) | "layer" (LayerNorm with bias, Phi-MoE)
    lm_head_bias: bool = False
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
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: expected one of {', '.join(NORMS)}")

    @property
    def attention(self) -> str:
        return "gqa" if self.mla is None else "mla"

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        """One layer's KV cache per token as (heads, key dim, value dim).

        GQA caches Hkv heads of keys and values; MLA caches one "head" holding the latent c_kv (as the key)
        and the shared rotary key k_pe (as the value), so budgets count the compressed size.
        """
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank, self.mla.qk_rope_head_dim
        return self.num_kv_heads, self.head_dim, self.head_dim

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.moe]
