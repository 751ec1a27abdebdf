"""RMSNorm and grouped-query attention with rotary embeddings, q/k norms and an external KV cache.

The KV cache is any object with `update(layer, k, v) -> (k_all, v_all)` that appends this
step's keys/values (k, v [B, Hkv, T, Dh]) and returns everything cached for the layer
([B, Hkv, S, Dh]); masks are built by the decoder and passed in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rotary
from .spec import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        self.q_proj = nn.Linear(d, self.h * self.dh, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, self.hkv * self.dh, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, self.hkv * self.dh, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.dh, d, bias=spec.o_bias)
        self.qk_norm = spec.qk_norm
        self.clip_qkv = spec.clip_qkv
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.dh, spec.rms_norm_eps), RMSNorm(self.dh, spec.rms_norm_eps)
        elif spec.qk_norm == "full":
            self.q_norm = RMSNorm(self.h * self.dh, spec.rms_norm_eps)
            self.k_norm = RMSNorm(self.hkv * self.dh, spec.rms_norm_eps)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
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
        q, k, v = self._qkv(x)
        q, k = apply_rotary(q, k, cos, sin)
        k, v = kv_cache.update(self.layer, k, v)                          # [B, Hkv, S, Dh]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.dh ** -0.5,
                                           enable_gqa=self.h != self.hkv)  # [B, H, T, Dh]
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.dh))
