"""Model shapes for the simulator: bytes of one expert and of the non-expert weights a decode token reads.

From a checkpoint's config.json alone (no weights needed: simulate before downloading), or a named
preset (SHAPES). Expert bytes = 3 x D x I parameters (gate, up, down) x bits / 8; the non-expert bytes a
decode token streams = per layer the attention projections (q, k, v, o) and the router, plus lm_head,
at `dense_bits` (embedding rows and norms are negligible). Presets, from the models' published configs:

  mixtral-8x7b    32 layers, 8 experts top-2, D 4096, I 14336, 32/8 heads x 128, vocab 32000, bf16
  gpt-oss-20b     24 layers, 32 experts top-4, D 2880, I 2880, 64/8 heads x 64, vocab 201088; experts in
                  MXFP4 (4.25 bits: 4-bit values + one 8-bit scale per 32), the rest bf16
  qwen3-30b-a3b   48 layers, 128 experts top-8, D 2048, I 768, 32/4 heads x 128, vocab 151936, bf16
  olmoe-1b-7b     16 layers, 64 experts top-8, D 2048, I 1024, 16/16 heads x 128, vocab 50304, bf16
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.checkpoint import load_config
from ..errors import ConfigError


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int                 # L MoE layers
    num_experts: int                # E routed experts per layer
    top_k: int                      # K
    hidden_size: int                # D
    expert_intermediate: int        # I
    attn_params_per_layer: int      # q, k, v, o projections and the router
    lm_head_params: int
    expert_bits: float = 16.0
    dense_bits: float = 16.0
    shared_expert_params: int = 0   # per layer, always computed
    kv_bytes_per_token: int = 0     # KV cache bytes per token over all layers (for --gpu-mem)
    embed_params: int = 0           # input embedding (resident beside lm_head unless tied)

    @property
    def expert_bytes(self) -> int:
        return int(round(3 * self.hidden_size * self.expert_intermediate * self.expert_bits / 8))

    @property
    def layer_dense_bytes(self) -> int:
        """Non-expert bytes one decode token reads per MoE layer (attention, router, shared expert)."""
        return int((self.attn_params_per_layer + self.shared_expert_params) * self.dense_bits / 8)

    @property
    def lm_head_bytes(self) -> int:
        return int(self.lm_head_params * self.dense_bits / 8)

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.num_layers * self.num_experts

    @property
    def resident_dense_bytes(self) -> int:
        """Non-expert weights kept on the compute device: per-layer dense bytes, lm_head and the embedding."""
        return (self.layer_dense_bytes * self.num_layers + self.lm_head_bytes
                + int(self.embed_params * self.dense_bits / 8))

    def experts_per_layer(self, budget_bytes: int, kv_tokens: int = 4096) -> int:
        """Experts per MoE layer that fit `budget_bytes` after the non-expert weights and a KV reserve."""
        free = budget_bytes - self.resident_dense_bytes - kv_tokens * self.kv_bytes_per_token
        per_layer = free // max(1, self.expert_bytes * self.num_layers)
        if per_layer < self.top_k:
            need = self.resident_dense_bytes + kv_tokens * self.kv_bytes_per_token \
                + self.top_k * self.expert_bytes * self.num_layers
            raise ConfigError(f"--gpu-mem {budget_bytes / 2**30:.2f} GiB holds {max(0, per_layer)} experts per layer "
                              f"of {self.name} ({self.expert_bytes / 2**20:.1f} MiB each) after "
                              f"{self.resident_dense_bytes / 2**30:.2f} GiB of non-expert weights and a "
                              f"{kv_tokens}-token KV reserve; top_k={self.top_k} need at least "
                              f"{need / 2**30:.2f} GiB (or fewer --quant bits)")
        return int(min(per_layer, self.num_experts))

    def with_expert_bits(self, bits: float) -> ModelShape:
        if not 1 <= bits <= 32:
            raise ConfigError(f"--quant {bits}: expert bits must be between 1 and 32")
        return dataclasses.replace(self, expert_bits=float(bits))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "expert_bytes": self.expert_bytes,
                "layer_dense_bytes": self.layer_dense_bytes, "lm_head_bytes": self.lm_head_bytes}


def _attn(d: int, heads: int, kv_heads: int, head_dim: int, experts: int) -> int:
    return d * head_dim * (heads + 2 * kv_heads) + heads * head_dim * d + d * experts


def _kv(layers: int, kv_heads: int, head_dim: int, nbytes: int = 2) -> int:
    return layers * 2 * kv_heads * head_dim * nbytes


SHAPES = {
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 32, 8, 2, 4096, 14336, _attn(4096, 32, 8, 128, 8), 32000 * 4096,
                               kv_bytes_per_token=_kv(32, 8, 128), embed_params=32000 * 4096),
    "gpt-oss-20b": ModelShape("gpt-oss-20b", 24, 32, 4, 2880, 2880, _attn(2880, 64, 8, 64, 32), 201088 * 2880,
                              expert_bits=4.25, kv_bytes_per_token=_kv(24, 8, 64), embed_params=201088 * 2880),
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 48, 128, 8, 2048, 768, _attn(2048, 32, 4, 128, 128),
                                151936 * 2048, kv_bytes_per_token=_kv(48, 4, 128), embed_params=151936 * 2048),
    "olmoe-1b-7b": ModelShape("olmoe-1b-7b", 16, 64, 8, 2048, 1024, _attn(2048, 16, 16, 128, 64), 50304 * 2048,
                              kv_bytes_per_token=_kv(16, 16, 128), embed_params=50304 * 2048),
}


def shape_preset(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ConfigError(f"--model-shape {name!r} is unknown; valid shapes: {', '.join(SHAPES)}")
    return SHAPES[name]


def shape_from_config(model_dir: str | Path) -> ModelShape:
    """The shape of a checkpoint from its config.json (weights need not be there)."""
    model_dir = Path(model_dir)
    family, cfg = load_config(model_dir)
    spec = family.build_spec(cfg)
    bits = {"float32": 32.0, "float16": 16.0, "bfloat16": 16.0}.get(spec.dtype, 16.0)
    moe, d = spec.moe, spec.hidden_size
    return ModelShape(model_dir.name, len(spec.moe_layers), moe.num_experts, moe.top_k, d, moe.intermediate_size,
                      _attn(d, spec.num_heads, spec.num_kv_heads, spec.head_dim, moe.num_experts),
                      spec.vocab_size * d, bits, bits, 3 * d * moe.shared_intermediate_size,
                      kv_bytes_per_token=int(_kv(spec.num_layers, spec.num_kv_heads, spec.head_dim) * bits / 16),
                      embed_params=0 if spec.tie_word_embeddings else spec.vocab_size * d)


def expert_bytes_shape(nbytes: int, top_k: int, num_layers: int, num_experts: int) -> ModelShape:
    """A shape that only knows the bytes of one expert (--expert-bytes N): no non-expert compute."""
    if nbytes <= 0:
        raise ConfigError(f"--expert-bytes {nbytes}: must be > 0")
    return ModelShape(f"{nbytes}-byte experts", num_layers, num_experts, top_k, 1, 1, 0, 0,
                      expert_bits=nbytes * 8 / 3)
