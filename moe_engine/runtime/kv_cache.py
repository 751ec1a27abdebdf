"""KV cache for a batch of sequences that advance together (left-padded prompts).

Slots are shared across the batch; `valid` [B, S] says which slots hold real tokens of each
row (False for padding and for steps of rows that already finished). Storage grows by
doubling, so a caller that knows the final length passes it as `capacity` and never copies.
Keys and values may differ in width (MLA caches its latent as the "key" and the shared rotary key as
the "value"; `ModelSpec.kv_dims`).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device, v_head_dim: int | None = None):
        self.shape = (batch, num_kv_heads, capacity, head_dim)    # [B, Hkv, S_cap, Dh]
        v_shape = (batch, num_kv_heads, capacity, v_head_dim or head_dim)
        self.k = [torch.empty(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0       # slots filled
        self.start = 0        # first slot of the current step

    @classmethod
    def for_spec(cls, spec, batch: int, capacity: int, dtype: torch.dtype, device) -> "KVCache":
        """A cache shaped by the model spec (per-layer heads and key/value widths from `spec.kv_dims`)."""
        heads, k_dim, v_dim = spec.kv_dims
        return cls(spec.num_layers, batch, heads, k_dim, capacity, dtype, device, v_head_dim=v_dim)

    @property
    def capacity(self) -> int:
        return self._valid.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, : self.length]                       # [B, S]

    def begin(self, token_mask: torch.Tensor) -> int:
        """Reserve slots for this step's tokens [B, T]; returns the first slot."""
        t = token_mask.shape[1]
        if self.length + t > self.capacity:
            self._grow(max(2 * self.capacity, self.length + t))
        self.start = self.length
        self._valid[:, self.start:self.start + t] = token_mask
        self.length += t
        return self.start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k [B, Hkv, T, Dk], v [B, Hkv, T, Dv] at the current step's slots; return [B, Hkv, S, D*] views."""
        k_new, v_new, k_all, v_all = self.slots(layer, k.shape[2])
        k_new.copy_(k)
        v_new.copy_(v)
        return k_all, v_all

    def slots(self, layer: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of this step's t slots ([B, Hkv, t, D*], for a caller that writes them in place) and of every slot
        so far including them ([B, Hkv, S, D*]), as update() would return."""
        end = self.start + t
        k, v = self.k[layer], self.v[layer]
        return k[:, :, self.start:end], v[:, :, self.start:end], k[:, :, :end], v[:, :, :end]

    def _grow(self, capacity: int) -> None:
        def grown(buf: torch.Tensor) -> torch.Tensor:
            new = buf.new_empty(*buf.shape[:2], capacity, buf.shape[3])
            new[:, :, : self.length] = buf[:, :, : self.length]
            return new
        self.k = [grown(b) for b in self.k]
        self.v = [grown(b) for b in self.v]
        valid = self._valid.new_zeros(self._valid.shape[0], capacity)
        valid[:, : self.length] = self._valid[:, : self.length]
        self._valid = valid

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.k + self.v)
