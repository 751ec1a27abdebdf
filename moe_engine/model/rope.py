"""Rotary position embeddings (RoPE): inverse frequencies, cos/sin tables, and the q/k rotation.

Covers the rope types of transformers' `modeling_rope_utils` (default, linear, dynamic, yarn, longrope, llama3)
with the same float32 op order, so tables match transformers bit for bit on CPU. Rotation uses the rotate-half
convention (Llama, Mixtral, Qwen); with partial rotary only the first `rot_dim` dims of each head rotate.
Does not do interleaved (GPT-J style) rotation, multimodal mrope, or per-layer rope parameters.
Imports torch and the standard library only.
"""

import math
from dataclasses import dataclass

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_SCALED_TYPES = ("llama3", "yarn", "longrope")  # types that need original_max_position_embeddings
_REQUIRED_PARAMS = {"llama3": ("low_freq_factor", "high_freq_factor"), "longrope": ("short_factor", "long_factor")}


@dataclass(frozen=True)
class RopeSpec:
    """Everything needed to build rotary tables; hashable, so models can share one `Rotary` per spec."""

    head_dim: int  # full head dim of q/k
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0  # rotary applies to the first int(head_dim * prf) dims
    params: tuple = ()  # remaining rope params as sorted (key, value) pairs; lists stored as tuples

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type {self.rope_type!r}; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}. "
                "Check rope_parameters['rope_type'] (or rope_scaling['type']) in config.json."
            )
        if self.rot_dim <= 0 or self.rot_dim % 2 or self.rot_dim > self.head_dim:
            raise ValueError(
                f"rotary dim int(head_dim * partial_rotary_factor) = int({self.head_dim} * "
                f"{self.partial_rotary_factor}) = {self.rot_dim} must be even and in (0, head_dim]; "
                "check head_dim and partial_rotary_factor in config.json."
            )
        missing = [k for k in _REQUIRED_PARAMS.get(self.rope_type, ()) if self.param(k) is None]
        if missing:
            raise ValueError(f"rope_type {self.rope_type!r} needs rope_parameters keys {missing} in config.json.")

    @property
    def rot_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def param(self, key: str, default=None):
        return dict(self.params).get(key, default)

    @classmethod
    def from_rope_parameters(
        cls,
        rope_parameters: dict | None,
        head_dim: int,
        max_position_embeddings: int,
        rope_theta: float | None = None,
    ) -> "RopeSpec":
        """Build from a transformers v5 `rope_parameters` dict, or a legacy `rope_scaling` dict plus `rope_theta`.

        Values inside the dict win over `rope_theta` (as in transformers). Callers with a top-level
        `partial_rotary_factor` or `original_max_position_embeddings` (Phi-3) should merge it into the dict first.
        """
        rp = {k: v for k, v in (rope_parameters or {}).items() if v is not None}
        rope_type = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
        rp.pop("type", None)
        theta = rp.pop("rope_theta", rope_theta if rope_theta is not None else 10000.0)
        original = rp.pop("original_max_position_embeddings", None)
        if original is None and rope_type in _SCALED_TYPES:
            original = max_position_embeddings
        factor = rp.pop("factor", None)
        if factor is None:  # yarn/longrope infer it from the context extension (DeepSeek-V3, Phi-3)
            factor = max_position_embeddings / original if rope_type in ("yarn", "longrope") else 1.0
        return cls(
            head_dim=head_dim,
            theta=float(theta),
            rope_type=rope_type,
            factor=float(factor),
            max_position_embeddings=max_position_embeddings,
            original_max_position_embeddings=original,
            partial_rotary_factor=float(rp.pop("partial_rotary_factor", 1.0)),
            params=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rp.items())),
        )


# ---- inverse frequencies: each returns (inv_freq [rot_dim/2] float32, attention_scaling) ----


def _base_inv_freq(theta, dim: int, device=None) -> torch.Tensor:
    # theta: float, or a 0-dim float32 tensor (dynamic growth); -> [dim/2]
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    return 1.0 / (theta**exponents)


def _default(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(spec.theta, spec.rot_dim), 1.0


def _linear(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(spec.theta, spec.rot_dim) / spec.factor, 1.0


def _dynamic(spec: RopeSpec, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """NTK-aware base growth. Within the trained context, python-float math (transformers' init path);
    beyond it, float32 tensor math on a tensor seq_len (transformers' dynamic_frequency_update path)."""
    dim, factor, mpe = spec.rot_dim, spec.factor, spec.max_position_embeddings
    if seq_len is None or seq_len <= mpe:
        base = spec.theta * ((factor * mpe / mpe) - (factor - 1)) ** (dim / (dim - 2))
    else:
        length = torch.tensor(seq_len, dtype=torch.int64, device=device)
        base = spec.theta * ((factor * length / mpe) - (factor - 1)) ** (dim / (dim - 2))  # 0-dim float32
    return _base_inv_freq(base, dim, device), 1.0


def _yarn_attention_factor(spec: RopeSpec) -> float:
    explicit = spec.param("attention_factor")
    if explicit is not None:
        return float(explicit)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = spec.param("mscale"), spec.param("mscale_all_dim")
    if m and m_all:
        return float(mscale(spec.factor, m) / mscale(spec.factor, m_all))
    return mscale(spec.factor)


def _yarn_correction_range(spec: RopeSpec) -> tuple[float, float]:
    """Dims whose wavelength falls between beta_slow and beta_fast rotations over the original context."""
    dim, base, original = spec.rot_dim, spec.theta, spec.original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(spec.param("beta_fast") or 32), correction_dim(spec.param("beta_slow") or 1)
    if spec.param("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    dim = spec.rot_dim
    pos_freqs = spec.theta ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)  # [dim/2]
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (spec.factor * pos_freqs)
    low, high = _yarn_correction_range(spec)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [dim/2]
    extrapolation = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (interpolated)
    inv_freq = inv_interpolation * (1 - extrapolation) + inv_extrapolation * extrapolation
    return inv_freq, _yarn_attention_factor(spec)


def _longrope(spec: RopeSpec, long: bool = False) -> tuple[torch.Tensor, float]:
    dim, original = spec.rot_dim, spec.original_max_position_embeddings
    ext = spec.param("long_factor" if long else "short_factor")
    if len(ext) != dim // 2:
        raise ValueError(f"longrope factors need rot_dim/2 = {dim // 2} entries, found {len(ext)}; check config.json.")
    attention = spec.param("attention_factor")
    if attention is None:
        factor = spec.factor
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext_factors = torch.tensor(ext, dtype=torch.float32)  # [dim/2]
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * spec.theta**shape), float(attention)


def _llama3(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """Llama 3.1: low frequencies divided by factor, high kept, a smooth blend in between."""
    inv_freq = _base_inv_freq(spec.theta, spec.rot_dim)  # [dim/2]
    factor, old_len = spec.factor, spec.original_max_position_embeddings
    low_ff, high_ff = spec.param("low_freq_factor"), spec.param("high_freq_factor")
    low_freq_wavelen, high_freq_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


_INIT = {"default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "longrope": _longrope,
         "llama3": _llama3}  # fmt: skip


class Rotary:
    """cos/sin tables for positions; apply to q and k.

    Tables are computed on CPU in float32 (as transformers does at module init) and kept on `device`.
    Stateless across calls: "dynamic" depends only on the `seq_len` given, whereas transformers keeps the
    largest length seen until a sequence shorter than max_position_embeddings resets it.
    """

    def __init__(self, spec: RopeSpec, device="cpu"):
        self.spec = spec
        self.device = torch.device(device)
        inv_freq, self.attention_scaling = _INIT[spec.rope_type](spec)
        self.inv_freq = inv_freq.to(self.device)  # [rot_dim/2]
        self.long_inv_freq = _longrope(spec, long=True)[0].to(self.device) if spec.rope_type == "longrope" else None
        # Phi-MoE's longrope names its own attention factors within / beyond the original context. Beyond it the
        # long factors apply (as for Phi-3); transformers 5's PhimoeRotaryEmbedding keeps the short factors there.
        self.short_scaling = float(spec.param("short_mscale", self.attention_scaling))
        self.long_scaling = float(spec.param("long_mscale", self.attention_scaling))
        self._dynamic_cache: tuple[int, torch.Tensor] | None = None  # (seq_len, inv_freq) of the last growth

    def inv_freq_at(self, seq_len: int, device=None) -> torch.Tensor:
        """Inverse frequencies [rot_dim/2] used for a sequence of total length `seq_len`."""
        spec = self.spec
        if spec.rope_type == "longrope" and seq_len > spec.original_max_position_embeddings:
            return self.long_inv_freq
        if spec.rope_type != "dynamic" or seq_len <= spec.max_position_embeddings:
            return self.inv_freq
        device = torch.device(device or self.device)
        cached = self._dynamic_cache
        if cached is None or cached[0] != seq_len or cached[1].device != device:
            self._dynamic_cache = (seq_len, _dynamic(spec, seq_len, device)[0])
        return self._dynamic_cache[1]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, seq_len: int | None = None):
        """positions [B, T] (int) -> cos, sin [B, T, rot_dim] in `dtype`, computed in float32.

        `seq_len` (max position + 1 across the batch) matters for "dynamic" and "longrope" only; when None it is
        read from `positions`, which syncs with the device.
        """
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        if self.spec.rope_type in ("dynamic", "longrope"):
            seq_len = int(positions.max()) + 1 if seq_len is None else int(seq_len)
            inv_freq = self.inv_freq_at(seq_len, positions.device)
        if self.spec.rope_type == "longrope":
            long = seq_len > self.spec.original_max_position_embeddings
            scaling = self.long_scaling if long else self.short_scaling
        freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)  # [B, T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, R]
        cos = emb.cos() * scaling
        sin = emb.sin() * scaling
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, Dh]; cos/sin [B, T, R] with R <= Dh
    rot_dim = cos.shape[-1]
    cos = cos.unsqueeze(1).to(x.dtype)  # [B, 1, T, R]
    sin = sin.unsqueeze(1).to(x.dtype)
    x_rot = x[..., :rot_dim]
    rotated = x_rot * cos + _rotate_half(x_rot) * sin
    if rot_dim == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rot_dim:]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, H, T, Dh], k [B, Hkv, T, Dh]; cos/sin [B, T, rot_dim] -> rotated q, k in their own dtypes.

    Only the first rot_dim dims rotate (rotate-half pairing i <-> i + rot_dim/2); the rest pass through.
    """
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek). x [B, H, T, R]; cos/sin [B, T, R].

    Pair i turns by the angle of cos[..., i] (the tables repeat their R/2 angles). The result is laid out
    de-interleaved, [rotated evens | rotated odds]; apply it to q and k alike, so their dot products are
    those of the interleaved layout.
    """
    half = cos.shape[-1] // 2
    cos = cos[..., :half].unsqueeze(1).to(x.dtype)  # [B, 1, T, R/2]
    sin = sin[..., :half].unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
