"""KV caches of the generation core: one per sequence (SeqKV), and the view a step's attention reads (StepKV).

    SeqKV   per layer k [Hkv, capacity, Dk], v [Hkv, capacity, Dv]; `length` slots filled. Sized when the
            sequence starts (prompt + tokens it may generate), so it never grows or copies.
    StepKV  the caches of the rows of one step, right-aligned so their new tokens share slots: row i's cached
            tokens sit at slots [S - len_i, S), its new tokens at [S, S + T) (left-padded when rows bring
            different numbers, as in a batched prefill); slot distance equals position distance, so sliding
            windows hold. `valid` [B, S + T] says which slots hold real tokens (the decoder builds masks from
            it), `commit()` advances the lengths after the forward.

How attention reads a step (model/attention.py; the interface it relies on):
    update(layer, k, v)  write the new k, v into each row's cache and return [B, Hkv, S + T, D] views: the
                         row's own cache when the step has one row (no copy), else the rows gathered
    slots(layer, t)      one row: views of its t new slots and of its whole cache, for attention that writes
                         rotated k, v straight into the cache (the decode ops); None for several rows
    ragged / rows(...)   one new token per row: each row's own cache, no gather (the decode ops' attend_rows)
Keys and values may differ in width (MLA caches its latent as the "key" and the shared rotary key as the
"value"; `ModelSpec.kv_dims`).
"""
from __future__ import annotations

import torch


class SeqKV:
    """One sequence's KV cache: per layer k [Hkv, capacity, Dk], v [Hkv, capacity, Dv]; `length` slots filled."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device,
                 v_head_dim: int | None = None):
        self.k = [torch.empty(kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(kv_heads, capacity, v_head_dim or head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.length = 0

    @classmethod
    def for_spec(cls, spec, capacity: int, dtype, device) -> "SeqKV":
        """Shaped by `spec.kv_dims` (MLA caches its compressed latent, not per-head keys and values)."""
        heads, k_dim, v_dim = spec.kv_dims
        return cls(spec.num_layers, heads, k_dim, capacity, dtype, device, v_head_dim=v_dim)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.k + self.v)


class StepKV:
    """The decoder's KV cache for one step over the rows' SeqKVs (see the module docstring)."""

    def __init__(self, seqs: list[SeqKV]):
        self.seqs = seqs
        self.start = max(s.length for s in seqs)
        self.valid = None
        self.t = 0
        self.new: list[int] = []

    def begin(self, token_mask: torch.Tensor) -> int:
        """token_mask [B, T]: real new tokens, left-padded (a row's real tokens are its last n_i)."""
        b, t = token_mask.shape
        valid = torch.zeros(b, self.start + t, dtype=torch.bool, device=token_mask.device)
        for i, s in enumerate(self.seqs):
            valid[i, self.start - s.length: self.start] = True
        valid[:, self.start:] = token_mask
        self.valid, self.t = valid, t
        self.new = token_mask.sum(1).tolist()                             # [B] real new tokens per row
        for s, m in zip(self.seqs, self.new):
            if s.length + m > s.capacity:       # the caller sized the cache too small: say so, not torch
                raise ValueError(f"a sequence's KV cache holds {s.capacity} tokens; {s.length} + {m} do not fit")
        return self.start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k [B, Hkv, T, Dk], v [B, Hkv, T, Dv] of this step -> every slot so far, [B, Hkv, S + T, D*]."""
        b, h, t, _ = k.shape
        if b == 1 and self.new[0] == t:      # the row's own cache, written in place and read as it is
            s, n = self.seqs[0], self.seqs[0].length
            s.k[layer][:, n:n + t] = k[0]
            s.v[layer][:, n:n + t] = v[0]
            return s.k[layer][None, :, :n + t], s.v[layer][None, :, :n + t]
        for i, s in enumerate(self.seqs):
            n, m = s.length, self.new[i]
            s.k[layer][:, n: n + m] = k[i, :, t - m:]
            s.v[layer][:, n: n + m] = v[i, :, t - m:]
        if self.start == 0:                  # nothing cached yet (a prefill): the step's own keys are all there is
            return k, v
        out_k = k.new_zeros(b, h, self.start + t, k.shape[3])
        out_v = v.new_zeros(b, h, self.start + t, v.shape[3])
        for i, s in enumerate(self.seqs):
            n = s.length
            out_k[i, :, self.start - n: self.start] = s.k[layer][:, :n]
            out_v[i, :, self.start - n: self.start] = s.v[layer][:, :n]
        out_k[:, :, self.start:] = k
        out_v[:, :, self.start:] = v
        return out_k, out_v

    def slots(self, layer: int, t: int):
        """One row: (k_new, v_new) views of its t new slots [1, Hkv, t, D*] and (k_all, v_all) of every slot so far
        including them [1, Hkv, S + t, D*], for a caller that writes the new slots in place; None for several rows."""
        if len(self.seqs) != 1:
            return None
        s, n = self.seqs[0], self.seqs[0].length
        k, v = s.k[layer][None], s.v[layer][None]
        return k[:, :, n:n + t], v[:, :, n:n + t], k[:, :, :n + t], v[:, :, :n + t]

    @property
    def ragged(self) -> bool:
        """This step brings exactly one new token per row, so rows() may replace update()."""
        return self.t == 1 and all(m == 1 for m in self.new)

    def rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """k, v [B, Hkv, 1, D] of a ragged step (see `ragged`), mask [B, 1, 1, start + 1] over the right-aligned
        slots -> per row i: its cache's k, v [Hkv, n_i + 1, D] with the new token written at n_i, and its mask [n_i + 1]."""
        ks, vs, ms = [], [], []
        for i, s in enumerate(self.seqs):
            n = s.length
            s.k[layer][:, n] = k[i, :, 0]
            s.v[layer][:, n] = v[i, :, 0]
            ks.append(s.k[layer][:, :n + 1])
            vs.append(s.v[layer][:, :n + 1])
            ms.append(mask[i, 0, 0, self.start - n:self.start + 1])
        return ks, vs, ms

    def commit(self) -> None:
        for s, m in zip(self.seqs, self.new):
            s.length += m

