"""RMSNorm and grouped-query attention with rotary embeddings, q/k norms and an external KV cache.

The KV cache (runtime/kv_cache.StepKV) has `update(layer, k, v) -> (k_all, v_all)`, which appends this
step's keys/values (k, v [B, Hkv, T, Dh]) and returns everything cached for the layer ([B, Hkv, S, Dh]);
masks are built by the decoder and passed in. A one-token step through the decode ops uses `slots` (one
sequence: write the new k, v in place) or `ragged` + `rows` (several: each row's own cache, no gather).

Decode ops (optional, injected by the runtime through Decoder.set_decode_ops; see _ops/decode.py for the
interface): with them a one-token step runs RMSNorm as one call, and attention as fused q|k|v projection
(the build fuses the weights before reading them: fuse_qkv) -> rope_qkv -> cache update -> attend -> o_proj.
The torch code below is the reference they match.

Quantized dense weights (--quant-scope all): the runtime may replace q_proj, k_proj and v_proj by one module
computing q|k|v (`set_qkv_proj`, quant/dense.py); both paths then call it once per step.

Attention sinks (GPT-OSS): a learned logit per head joins every softmax's denominator and is
dropped from its output, so a query may give part of its attention to "nothing".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear
from .rope import apply_rotary
from .spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = None     # decode ops (Decoder.set_decode_ops): ops.rms_norm(x, weight, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention; H query heads share Hkv key/value heads (GQA)."""

    def __init__(self, layer: int, spec: ModelSpec):
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
        d = spec.hidden_size
        self.q_proj = Linear(d, self.h * self.dh, bias=spec.qkv_bias)
        self.k_proj = Linear(d, self.hkv * self.dh, bias=spec.qkv_bias)
        self.v_proj = Linear(d, self.hkv * self.dh, bias=spec.qkv_bias)
        self.o_proj = Linear(self.h * self.dh, d, bias=spec.o_bias)
        self.qk_norm = spec.qk_norm
        self.clip_qkv = spec.clip_qkv
        self.scale = spec.attention_scale if spec.attention_scale is not None else self.dh ** -0.5
        self.sinks = nn.Parameter(torch.zeros(self.h)) if spec.attention_sinks else None   # [H] logits
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.dh, spec.rms_norm_eps), RMSNorm(self.dh, spec.rms_norm_eps)
        elif spec.qk_norm == "full":
            self.q_norm = RMSNorm(self.h * self.dh, spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.hkv * self.dh, spec.rms_norm_eps)
        self.ops = None                  # decode ops (set_decode_ops)
        self.qkv_weight: torch.Tensor | None = None   # q|k|v weights as one tensor (fuse_qkv); not a parameter
        self.qkv_bias: torch.Tensor | None = None
        self.qkv_proj: nn.Module | None = None        # x -> q|k|v in one call, replacing q/k/v_proj (set_qkv_proj)

    def fuse_qkv(self) -> None:
        """Keep q, k and v weights (and biases) in one tensor that their parameters view, so one GEMV computes all
        three (the decode ops' path). Done once by the build, before the weights are read into the views; models
        with q/k norms or clipping keep three projections. Idempotent."""
        if not self.fusable or self.qkv_weight is not None or self.qkv_proj is not None:
            return
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = _fuse([p.weight for p in projs])
        self.qkv_bias = _fuse([p.bias for p in projs]) if self.q_proj.bias is not None else None

    @property
    def fusable(self) -> bool:
        """The decode ops can run this attention: no q/k norms, no clipping between projection and rotary."""
        return self.qk_norm not in ("head", "full") and self.clip_qkv is None

    def set_qkv_proj(self, proj: nn.Module) -> None:
        """Replace q_proj, k_proj and v_proj (and a fused q|k|v tensor) by `proj`: x [..., D] -> [..., (H + 2 Hkv) Dh]
        in q, k, v order (the build's quantized q|k|v; the dense weights are dropped)."""
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_weight = self.qkv_bias = None
        self.qkv_proj = proj

    def set_decode_ops(self, ops) -> None:
        """Use `ops` for one-token steps of a fused projection (fuse_qkv or set_qkv_proj); None: the torch code."""
        self.ops = ops

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.h * self.dh, self.hkv * self.dh, self.hkv * self.dh], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)     # [B, T, H*Dh], [B, T, Hkv*Dh] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t_.clamp(-self.clip_qkv, self.clip_qkv) for t_ in (q, k, v))
        q, k, v = q.view(b, t, self.h, self.dh), k.view(b, t, self.hkv, self.dh), v.view(b, t, self.hkv, self.dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H|Hkv, T, Dh]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache,
                mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; cos/sin [B, T, rot]; mask [B, 1, T, S] bool (True = attend) -> [B, T, D]."""
        fused = self.ops is not None and (
            (self.qkv_proj is not None and self.fusable) or
            (self.qkv_weight is not None and self.q_proj.weight.data_ptr() == self.qkv_weight.data_ptr()))
        if fused and x.shape[1] == 1:     # (a module moved after fuse_qkv no longer views qkv_weight)
            return self._decode(x, cos, sin, kv_cache, mask)
        q, k, v = self._qkv(x)
        q, k = apply_rotary(q, k, cos, sin)
        k, v = kv_cache.update(self.layer, k, v)                          # [B, Hkv, S, Dh]
        if self.sinks is not None:
            k, v, mask = with_sink(k, v, mask, self.sinks)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.h != self.hkv)  # [B, H, T, Dh]
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.dh))

    def _decode(self, x, cos, sin, kv_cache, mask) -> torch.Tensor:
        """One token per row through the decode ops (the same math as forward's torch path)."""
        ops = self.ops
        qkv = (self.qkv_proj(x) if self.qkv_proj is not None
               else ops.linear(x, self.qkv_weight, self.qkv_bias))          # [B, 1, (H + 2 Hkv) Dh]
        slots = kv_cache.slots(self.layer, 1)
        if slots is not None:     # one sequence: rotated k and v written straight into its cache's new slot
            k_new, v_new, k, v = slots                                      # [1, Hkv, 1, Dh], [1, Hkv, S, Dh]
            q = ops.rope_qkv(qkv, cos, sin, self.h, self.hkv, self.dh, k_new, v_new)[0]
        elif kv_cache.ragged:     # several sequences with caches of their own: no gather
            q, k, v = ops.rope_qkv(qkv, cos, sin, self.h, self.hkv, self.dh)
            ks, vs, ms = kv_cache.rows(self.layer, k, v, mask)                # per row [Hkv, S_i, Dh], [S_i]
            return self.o_proj(ops.attend_rows(q, ks, vs, ms, self.scale, self.sinks))
        else:
            q, k, v = ops.rope_qkv(qkv, cos, sin, self.h, self.hkv, self.dh)     # [B, H|Hkv, 1, Dh]
            k, v = kv_cache.update(self.layer, k, v)                        # [B, Hkv, S, Dh]
        return self.o_proj(ops.attend(q, k, v, mask, self.scale, self.sinks))


def _fuse(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenate parameters along dim 0 and make each a view of the result (no extra memory kept)."""
    fused = torch.cat([p.data for p in params])
    start = 0
    for p in params:
        p.data = fused[start:start + p.shape[0]]
        start += p.shape[0]
    return fused


def with_sink(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor):
    """Attention sinks as one extra key: k, v [B, Hkv, S, Dh], mask bool [B, 1, T, S], sinks [H] ->
    k, v [B, Hkv, S+1, Dh] and an additive float mask [B, H, T, S+1].

    The extra key and value are zero, so its score is exactly the mask's value there, the sink
    logit: softmax over [scores, sink] with the sink's share dropped (its value is 0), as in
    softmax(concat(scores, sink))[..., :-1] @ v.
    """
    b, hkv, s, dh = k.shape
    t, h = mask.shape[2], sinks.shape[0]
    zero = k.new_zeros(b, hkv, 1, dh)
    k, v = torch.cat([k, zero], dim=2), torch.cat([v, zero], dim=2)
    bias = torch.zeros(mask.shape, dtype=k.dtype, device=k.device).masked_fill(~mask, float("-inf"))   # [B, 1, T, S]
    sink = sinks.to(k.dtype).view(1, h, 1, 1).expand(b, h, t, 1)
    return k, v, torch.cat([bias.expand(b, h, t, s), sink], dim=-1)        # [B, H, T, S+1]
