"""The generic MoE decoder every family maps onto. Imports torch only.

    ids -> embed -> [ norm -> attention -> + -> norm -> (MoE | dense MLP) -> + ] x L -> norm -> lm_head

Token-id core: no tokenizer, no sampling, no cache policy. The KV cache is passed in (see
attention.py for its interface, plus `begin(token_mask) -> start` and `valid` [B, S] used
here to build masks). Padding tokens (token_mask False) attend nowhere useful and are not
routed to experts.

Built once (runtime/build.py): weights filled, q/k/v fused where the decode ops run (`fuse_qkv`, before
the weights are read), kernels and decode ops set, then `bind_experts` gives every MoE block its
expert-compute strategy. `observers` (model/experts.Observers) is the one stack of routing observers
the decoder reports each step to; the runtime adds and removes observers there, never replaces it.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, RMSNorm
from .linear import Linear, LinearKernel
from .mla import MlaAttention
from .experts import Observers
from .moe import GatedMlp, MoeBlock
from .rope import Rotary
from .spec import LayerSpec, ModelSpec


class DecoderLayer(nn.Module):
    def __init__(self, layer: int, spec: ModelSpec, lspec: LayerSpec):
        super().__init__()
        self.sliding_window = lspec.sliding_window
        self.residual_multiplier = spec.residual_multiplier
        self.attn_norm = make_norm(spec)
        self.attn = Attention(layer, spec) if spec.mla is None else MlaAttention(layer, spec)
        self.ffn_norm = make_norm(spec)
        self.ops = None             # decode ops (Decoder.set_decode_ops): residual add fused into the ffn norm
        if lspec.moe:
            self.moe = MoeBlock(layer, spec.hidden_size, spec.moe, spec.hidden_act)
        else:
            self.mlp = GatedMlp(spec.hidden_size, lspec.dense_intermediate_size, spec.hidden_act)

    def forward(self, x, cos, sin, kv_cache, mask, token_mask):
        """token_mask [B, T] bool, or None when every token is real."""
        attn = self.attn(self.attn_norm(x), cos, sin, kv_cache, mask)
        if self.ops is not None and self.residual_multiplier == 1.0 and isinstance(self.ffn_norm, RMSNorm):
            x, h = self.ops.add_rms_norm(x, attn, self.ffn_norm.weight, self.ffn_norm.eps)
        else:
            x = x + self._scaled(attn)
            h = self.ffn_norm(x)
        if not hasattr(self, "moe"):
            out = self.mlp(h)
        elif token_mask is None:
            out = self.moe(h.flatten(0, 1)).view_as(h)
        else:
            out = torch.zeros_like(h)
            out[token_mask] = self.moe(h[token_mask])      # real tokens only: [N, D]
        return x + self._scaled(out)

    def _scaled(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.residual_multiplier == 1.0 else h * self.residual_multiplier


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        # the weights are always read from the checkpoint: an uninitialized table skips nn.Embedding's random
        # init, whose normal_ on the meta device imports torch._dynamo (~1 s and ~150 MiB of RSS)
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size,
                                  _weight=torch.empty(spec.vocab_size, spec.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(i, spec, ls) for i, ls in enumerate(spec.layers))
        self.norm = make_norm(spec)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=spec.lm_head_bias)
        self.tie_weights()
        self.rotary: Rotary | None = None     # built by init_rotary on the real device (not under meta)
        self.observers = Observers()          # routing observers, shared with every MoE block
        self.decode_ops = None                # set_decode_ops
        for block in self.moe_blocks():
            block.observers = self.observers

    def tie_weights(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def cast(self, dtype: torch.dtype) -> "Decoder":
        """All weights to `dtype`, except routers' correction biases, which stay float32 (as transformers keeps
        them): a bias of a few units rounded to bfloat16 would change which experts are chosen."""
        self.to(dtype)
        for layer in self.layers:
            bias = getattr(getattr(layer, "moe", None), "correction_bias", None)
            if bias is not None:
                bias.data = bias.data.float()
        return self

    def to_empty(self, *, device, recurse: bool = True) -> "Decoder":
        """nn.Module.to_empty, allocating with torch.empty(shape) instead of empty_like: empty_like of a meta
        tensor runs torch's Python reference, which imports sympy (~0.4 s and ~35 MiB of RSS)."""
        return self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device), recurse=recurse)

    def init_rotary(self, device) -> None:
        self.rotary = Rotary(self.spec.rope, device=device)

    def moe_blocks(self) -> list[MoeBlock]:
        return [layer.moe for layer in self.layers if hasattr(layer, "moe")]

    def fuse_qkv(self) -> None:
        """Every attention that the decode ops can run keeps q|k|v in one tensor its projections view (one GEMV
        per decode step). Called by the build before the weights are read into them."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_qkv()

    def set_linear_kernel(self, kernel: LinearKernel | None) -> None:
        """Every projection (attention, dense MLPs, routers, lm_head) and the routed experts compute their
        matmuls with `kernel(x, weight, bias)` (see linear.py); None restores F.linear."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel = kernel
            elif isinstance(module, MoeBlock):
                module.linear = kernel

    def set_decode_ops(self, ops) -> None:
        """Fused ops for one-token steps (see _ops/decode.py for the interface; None: the torch code throughout).
        The build sets them for a bf16 model on the CPU, before binding the experts; results match the torch
        path up to rounding. MoE blocks take the fused softmax top-k (the expert compute is bound apart)."""
        self.decode_ops = ops
        for module in self.modules():
            if isinstance(module, (Attention, MoeBlock)):
                module.set_decode_ops(ops)
            elif isinstance(module, (RMSNorm, DecoderLayer)):
                module.ops = ops

    def bind_experts(self, strategies: dict) -> None:
        """Give each MoE block its expert-compute strategy (layer -> (layer, x, weights, ids) -> [N, D]).
        Once: a model's experts are never replaced after it is built."""
        blocks = self.moe_blocks()
        if any(b.bound for b in blocks):
            raise RuntimeError("this decoder's experts are already bound; build a new decoder for another source")
        if sorted(strategies) != sorted(b.layer for b in blocks):
            raise ValueError(f"bind_experts needs a strategy for MoE layers {sorted(b.layer for b in blocks)}, "
                             f"got {sorted(strategies)}")
        for block in blocks:
            block.experts = strategies[block.layer]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache,
                token_mask: torch.Tensor, last_only: bool = False, seq_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [B, T]; token_mask [B, T] bool -> logits float32 [B, T or 1, V].

        seq_ids [B]: which sequence each row is (for routing observers, e.g. the cache's predictor; row index
        if None).
        """
        x = self.hidden(input_ids, positions, kv_cache, token_mask, seq_ids)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        if self.spec.logits_scaling != 1.0:
            logits = logits / self.spec.logits_scaling
        return logits.float()

    def first_nonfinite(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache, token_mask: torch.Tensor,
                        rows: list[int], seq_ids: torch.Tensor | None = None) -> int | None:
        """Where NaN/inf first appear in the hidden states of `rows`: -1 (the embedding), a layer index (its output),
        or None (every layer's output is finite: the final norm or lm_head made them). Runs the step again with the
        same arguments (before the caller commits its KV: the same slots are rewritten with the same values), so
        that finding the layer costs nothing until logits are found non-finite."""
        found: list[int] = []

        def watch(layer: int, x: torch.Tensor) -> None:
            if not bool(torch.isfinite(x[rows]).all()):
                found.append(layer)
                raise _Found

        try:
            self.hidden(input_ids, positions, kv_cache, token_mask, seq_ids, watch)
        except _Found:
            pass
        return found[0] if found else None

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache, token_mask: torch.Tensor,
               seq_ids: torch.Tensor | None = None, watch=None) -> torch.Tensor:
        """The hidden states after the last layer [B, T, D] (forward without the head); watch(layer, x), when
        given, sees them after the embedding (layer -1) and after each layer."""
        b, t = input_ids.shape
        if self.observers:     # real tokens in the order the MoE blocks see them
            rows = seq_ids if seq_ids is not None else torch.arange(b, device=input_ids.device)
            self.observers.begin_step(input_ids[token_mask],
                                      rows.to(input_ids.device)[:, None].expand(b, t)[token_mask])
        start = kv_cache.begin(token_mask)
        x = self.embed(input_ids)                                                # [B, T, D]
        if self.spec.embedding_multiplier != 1.0:
            x = x * self.spec.embedding_multiplier
        cos, sin = self.rotary.cos_sin(positions, x.dtype, seq_len=int(positions.max()) + 1)
        masks = {w: attention_mask(kv_cache.valid, start, t, w) for w in {layer.sliding_window for layer in self.layers}}
        if token_mask.all():
            token_mask = None
        if watch is not None:
            watch(-1, x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache, masks[layer.sliding_window], token_mask)
            if watch is not None:
                watch(i, x)
        return x


class _Found(Exception):
    """first_nonfinite's early exit once the layer is known."""


def make_norm(spec: ModelSpec) -> nn.Module:
    """The hidden-state norm of a spec: RMSNorm, or LayerNorm with weight and bias."""
    if spec.norm == "layer":
        return nn.LayerNorm(spec.hidden_size, eps=spec.rms_norm_eps)
    return RMSNorm(spec.hidden_size, spec.rms_norm_eps)


def attention_mask(valid: torch.Tensor, start: int, t: int, window: int | None) -> torch.Tensor:
    """valid [B, S] (cached + new slots) -> bool [B, 1, T, S]; query t sits at slot start + t.

    A key is visible if it is valid, not in the future and (with a window) fewer than `window`
    slots back. Each query also sees its own slot, so padding rows never have an empty softmax.
    """
    s = valid.shape[1]
    q_slot = torch.arange(start, start + t, device=valid.device)[:, None]    # [T, 1]
    k_slot = torch.arange(s, device=valid.device)[None, :]                   # [1, S]
    allowed = k_slot <= q_slot
    if window:
        allowed &= (q_slot - k_slot) < window
    mask = valid[:, None, :] & allowed[None]                                 # [B, T, S]
    mask |= (k_slot == q_slot)[None]
    return mask[:, None]
