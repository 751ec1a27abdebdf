"""Multi-head latent attention (DeepSeek-V2/V3) over a compressed KV cache.

    x -> q (q_proj, or q_a -> RMSNorm -> q_b)      -> [q_nope | q_pe]   per head, rotary on q_pe
    x -> kv_a_proj_with_mqa -> [c_kv | k_pe]        c_kv: RMSNorm'd latent [R]; k_pe: one rotary key [Dr]
    cache.update(layer, c_kv, k_pe)                 the cache holds only the latent and the shared k_pe
    kv_b_proj(c_kv) -> per head [k_nope | v];  k = [k_nope | k_pe];  attention;  o_proj

The cache sees c_kv as a one-head "key" [B, 1, T, R] and k_pe as a one-head "value" [B, 1, T, Dr]
(ModelSpec.kv_dims), so its bytes per token are R + Dr instead of 2 * H * Dh.

Two ways to attend, equal up to floating-point reassociation:
  expanded  (steps with several new tokens per row: prefill) keys and values expanded from the latent
            by kv_b_proj, then ordinary attention; cheapest when queries are as many as keys.
  absorbed  (decode: one new token per row) kv_b_proj's key half folded into the query and its value
            half applied after attention, so attention runs over the cached latent itself, one shared
            head of R + Dr dims, and nothing per cached token is recomputed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import RMSNorm
from .linear import Linear
from .rope import apply_rotary, rotate_interleaved
from .spec import ModelSpec

LATENT_NORM_EPS = 1e-6   # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not config.rms_norm_eps


class MlaAttention(nn.Module):
    """Causal MLA with H heads; q/k heads of Dn + Dr dims, value heads of Dv dims."""

    def __init__(self, layer: int, spec: ModelSpec):
        super().__init__()
        mla = spec.mla
        self.layer, self.mla = layer, mla
        self.h, d = spec.num_heads, spec.hidden_size
        if mla.q_lora_rank is None:
            self.q_proj = Linear(d, self.h * mla.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(d, mla.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, self.h * mla.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=spec.qkv_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(mla.kv_lora_rank, self.h * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = Linear(self.h * mla.v_head_dim, d, bias=spec.o_bias)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> q [B, H, T, Dn + Dr]."""
        b, t, _ = x.shape
        if self.mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(b, t, self.h, self.mla.qk_head_dim).transpose(1, 2)

    def _latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> c_kv [B, 1, T, R] (normalized), k_pe [B, 1, T, Dr] (before rotary)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.mla.kv_lora_rank, self.mla.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv).unsqueeze(1), k_pe.unsqueeze(1)

    def _rotary(self, q_pe, k_pe, cos, sin):
        if self.mla.rope_interleave:
            return rotate_interleaved(q_pe, cos, sin), rotate_interleaved(k_pe, cos, sin)
        return apply_rotary(q_pe, k_pe, cos, sin)

    def _expand(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached c_kv [B, 1, S, R], k_pe [B, 1, S, Dr] -> keys [B, H, S, Dn + Dr], values [B, H, S, Dv]."""
        b, _, s, _ = c_kv.shape
        dn, dv = self.mla.qk_nope_head_dim, self.mla.v_head_dim
        kv = self.kv_b_proj(c_kv[:, 0]).view(b, s, self.h, dn + dv).transpose(1, 2)   # [B, H, S, Dn + Dv]
        k_nope, v = kv.split([dn, dv], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(b, self.h, s, -1)), dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache,
                mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; cos/sin [B, T, Dr]; mask [B, 1, T, S] bool (True = attend) -> [B, T, D]."""
        b, t, _ = x.shape
        q_nope, q_pe = self._query(x).split([self.mla.qk_nope_head_dim, self.mla.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self._latent(x)
        q_pe, k_pe = self._rotary(q_pe, k_pe, cos, sin)
        c_kv, k_pe = kv_cache.update(self.layer, c_kv, k_pe)              # [B, 1, S, R], [B, 1, S, Dr]
        attend = self.attend_absorbed if t == 1 else self.attend_expanded
        o = attend(q_nope, q_pe, c_kv, k_pe, mask)                        # [B, H, T, Dv]
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.mla.v_head_dim))

    def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """q_nope [B, H, T, Dn], q_pe [B, H, T, Dr], c_kv [B, 1, S, R], k_pe [B, 1, S, Dr] -> [B, H, T, Dv]."""
        k, v = self._expand(c_kv, k_pe)
        q = torch.cat((q_nope, q_pe), dim=-1)                             # [B, H, T, Dn + Dr]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.mla.scale)

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Same contract as attend_expanded; attention over the latent (h heads, n = Dn, v = Dv, r = R)."""
        dn = self.mla.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(self.h, dn + self.mla.v_head_dim, self.mla.kv_lora_rank)   # [H, Dn+Dv, R]
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w[:, :dn])         # [B, H, T, R]
        q = torch.cat((q_lat, q_pe), dim=-1)                              # [B, H, T, R + Dr]
        k = torch.cat((c_kv, k_pe), dim=-1)                               # [B, 1, S, R + Dr]
        o_lat = F.scaled_dot_product_attention(q, k, c_kv, attn_mask=mask, scale=self.mla.scale,
                                               enable_gqa=True)           # [B, H, T, R]
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w[:, dn:])          # [B, H, T, Dv]
