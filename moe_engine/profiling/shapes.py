"""Model shapes for the simulator: bytes of one expert and of the non-expert weights a decode token reads.

From a checkpoint's config.json alone (no weights needed: simulate before downloading), or a named
preset (PRESETS, `shape_preset`), which is a config.json of the published model held here and read the same way. Expert
bytes = 3 x D x I parameters (gate, up, down) x bits / 8; the non-expert bytes a decode token streams = per
layer the attention projections (q, k, v, o) and the router, plus lm_head, at `dense_bits` (embedding rows
and norms are negligible). Presets, from the models' published configs:

  mixtral-8x7b    32 layers, 8 experts top-2, D 4096, I 14336, 32/8 heads x 128, vocab 32000, bf16
  gpt-oss-20b     24 layers, 32 experts top-4, D 2880, I 2880, 64/8 heads x 64, vocab 201088; experts in
                  MXFP4 (4.25 bits: 4-bit values + one 8-bit scale per 32), the rest bf16
  qwen3-30b-a3b   48 layers, 128 experts top-8, D 2048, I 768, 32/4 heads x 128, vocab 151936, bf16
  olmoe-1b-7b     16 layers, 64 experts top-8, D 2048, I 1024, 16/16 heads x 128, vocab 50304, bf16

How many experts a `--gpu-mem` budget holds is the engine's own placement plan (experts/plan.make_plan: the
non-expert weights, the KV reserve, the loaders' IO buffers and workspace, then expert slots spread over the
layers), computed from the shape's ModelSpec; `engine_quotas` returns its experts per MoE layer.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..checkpoint.checkpoint import load_config
from ..errors import ConfigError
from ..model.spec import ModelSpec

DTYPE_BITS = {"float32": 32.0, "float16": 16.0, "bfloat16": 16.0}
LOADER_THREADS = 2                      # the engine's default --io-threads (its IO buffers are in the plan)


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
    kv_bytes_per_token: int = 0     # KV cache bytes per token over all layers
    embed_params: int = 0           # input embedding (resident beside lm_head unless tied)
    spec: ModelSpec | None = field(default=None, compare=False, repr=False)   # for the engine's plan (--gpu-mem)

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

    def engine_quotas(self, budget_bytes: int, kv_tokens: int | None = None, device: str = "cuda") -> list[int]:
        """Experts per MoE layer that the engine's placement plan gives a `--gpu-mem` of `budget_bytes` with a
        KV reserve of `kv_tokens` (None: the engine's default, min(context, 4096)); a budget too small fails with
        the plan's own error, naming the minimum."""
        if self.spec is None:
            raise ConfigError(f"--gpu-mem needs the model's layers and non-expert weights, which {self.name} does "
                              f"not give; use MODEL_DIR or --model-shape, or --cache-experts")
        import torch

        from ..checkpoint.families.base import torch_dtype
        from ..experts.plan import make_plan
        from ..runtime.build import non_expert_bytes
        dtype = torch_dtype(self.spec.dtype if self.spec.dtype in DTYPE_BITS else "bfloat16")
        dense = non_expert_bytes(SimpleNamespace(spec=self.spec), dtype)   # reads only .spec: no checkpoint
        own_bits = self.expert_bits == DTYPE_BITS.get(self.spec.dtype)
        plan = make_plan(self.spec, torch.device(device), dtype, dense, int(budget_bytes), None, kv_tokens,
                         LOADER_THREADS, expert_bytes=None if own_bits else self.expert_bytes)
        return [plan.quotas[layer] for layer in self.spec.moe_layers]

    def experts_per_layer(self, budget_bytes: int, kv_tokens: int | None = None) -> int:
        """The fewest experts any MoE layer gets in the engine's plan for `budget_bytes` (engine_quotas)."""
        return min(self.engine_quotas(budget_bytes, kv_tokens))

    def with_expert_bits(self, bits: float) -> ModelShape:
        if not 1 <= bits <= 32:
            raise ConfigError(f"--quant {bits}: expert bits must be between 1 and 32")
        return dataclasses.replace(self, expert_bits=float(bits))

    def to_dict(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        return {**fields, "expert_bytes": self.expert_bytes, "layer_dense_bytes": self.layer_dense_bytes,
                "lm_head_bytes": self.lm_head_bytes}


def _attn(d: int, heads: int, kv_heads: int, head_dim: int, experts: int) -> int:
    return d * head_dim * (heads + 2 * kv_heads) + heads * head_dim * d + d * experts


def _kv(layers: int, kv_heads: int, head_dim: int, nbytes: int = 2) -> int:
    return layers * 2 * kv_heads * head_dim * nbytes


def shape_from_spec(name: str, spec: ModelSpec, expert_bits: float | None = None) -> ModelShape:
    """The shape of a model spec; expert_bits: how its experts are stored when not in the model dtype."""
    bits = DTYPE_BITS.get(spec.dtype, 16.0)
    moe, d = spec.moe, spec.hidden_size
    return ModelShape(name, len(spec.moe_layers), moe.num_experts, moe.top_k, d, moe.intermediate_size,
                      _attn(d, spec.num_heads, spec.num_kv_heads, spec.head_dim, moe.num_experts),
                      spec.vocab_size * d, expert_bits or bits, bits, 3 * d * moe.shared_intermediate_size,
                      kv_bytes_per_token=int(_kv(spec.num_layers, spec.num_kv_heads, spec.head_dim) * bits / 16),
                      embed_params=0 if spec.tie_word_embeddings else spec.vocab_size * d, spec=spec)


def _spec_of(model_type: str, name: str, **config) -> ModelSpec:
    from transformers import AutoConfig

    from ..checkpoint.families import family_for
    return family_for(None, model_type, name).build_spec(AutoConfig.for_model(model_type, dtype="bfloat16", **config))


# name -> (model_type, config.json values that differ from transformers' defaults, expert bits if not bf16)
PRESETS = {
    "mixtral-8x7b": ("mixtral", dict(num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2, hidden_size=4096,
                                     intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                     vocab_size=32000, max_position_embeddings=32768), None),
    "gpt-oss-20b": ("gpt_oss", dict(num_hidden_layers=24, num_local_experts=32, num_experts_per_tok=4, hidden_size=2880,
                                    intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                                    vocab_size=201088, max_position_embeddings=131072), 4.25),
    "qwen3-30b-a3b": ("qwen3_moe", dict(num_hidden_layers=48, num_experts=128, num_experts_per_tok=8, hidden_size=2048,
                                        moe_intermediate_size=768, intermediate_size=6144, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, vocab_size=151936,
                                        max_position_embeddings=40960), None),
    "olmoe-1b-7b": ("olmoe", dict(num_hidden_layers=16, num_experts=64, num_experts_per_tok=8, hidden_size=2048,
                                  intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                                  vocab_size=50304, max_position_embeddings=4096), None),
}


@functools.cache
def shape_preset(name: str) -> ModelShape:
    """The named preset's shape (its config built once; transformers parses it as it would a config.json)."""
    if name not in PRESETS:
        raise ConfigError(f"--model-shape {name!r} is unknown; valid shapes: {', '.join(PRESETS)}")
    model_type, config, bits = PRESETS[name]
    return shape_from_spec(name, _spec_of(model_type, name, **config), bits)


def shape_from_config(model_dir: str | Path, name: str | None = None) -> ModelShape:
    """The shape of a checkpoint from its config.json (weights need not be there); name: default the directory's."""
    model_dir = Path(model_dir)
    family, cfg = load_config(model_dir)
    return shape_from_spec(name or model_dir.name, family.build_spec(cfg))


def expert_bytes_shape(nbytes: int, top_k: int, num_layers: int, num_experts: int) -> ModelShape:
    """A shape that only knows the bytes of one expert (--expert-bytes N): no non-expert compute, no plan."""
    if nbytes <= 0:
        raise ConfigError(f"--expert-bytes {nbytes}: must be > 0")
    return ModelShape(f"{nbytes}-byte experts", num_layers, num_experts, top_k, 1, 1, 0, 0,
                      expert_bits=nbytes * 8 / 3)
