"""Fused ops of a bf16 decode step on the CPU (moe_engine._C, csrc/decode_ops.cpp), each next to its torch twin.

    rms_norm(x, weight, eps)                       x [..., D] -> RMSNorm as model.attention.RMSNorm computes it
    add_rms_norm(x, delta, weight, eps)            (x + delta, rms_norm(x + delta)): a residual add and the next norm
    route(logits, k, normalize)                    router logits [N, E] -> softmax top-k (weights float32, ids int64)
    rope_qkv(qkv, cos, sin, h, hkv, dh)            fused projection [B, 1, (H + 2 Hkv) Dh] -> rotated q [B, H, 1, Dh],
                                                   rotated k and v [B, Hkv, 1, Dh] (rotate-half on cos' width)
    attend(q, k, v, mask, scale, sinks)            one query per row: q [B, H, 1, Dh] over k, v [B, Hkv, S, Dh] ->
                                                   [B, 1, H Dh] (GQA; mask [B, 1, 1, S] bool; sinks [H] or None)
    attend_rows(q, ks, vs, masks, scale, sinks)    attend with each row's keys/values in a buffer of its own:
                                                   ks[i], vs[i] [Hkv, S_i, Dh], masks[i] [S_i] bool (a batch of
                                                   sequences read in their own KV caches, no gather)
    moe_experts(x, weights, ids, experts, packed, inter, acc=None)
                                                   routed SwiGLU experts for N <= BF16_N_MAX tokens: the layer's
                                                   combined output, or (acc) sums added into a float32 [N, D]
    moe_experts_quant(x, weights, ids, experts, mats, inter, acc=None)
                                                   the same over quantized experts (mats: each expert's (W1, W2)
                                                   QMatrix, any widths); two thread-pool runs per layer

They exist because a decode step is hundreds of tiny torch ops whose call overhead, not arithmetic, cost
~4 ms per token on the bench checkpoint. Every op takes backend="auto" | "c" | "torch" like the rest of _ops;
the twins (`*_reference`) round where the torch ops of the model round, so "c" matches them up to float32
summation order (rope_qkv bit for bit). DecodeOps bundles the C ops for the decoder (Decoder.set_decode_ops):
the runtime injects it for a bf16 model on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import HAS_C_EXT, _C, _resolve
from .matmul import BF16_N_MAX, QLINEAR_ISAS, bf16_linear
from .qmatrix import QMatrix, int8_acts, qlinear_int8_reference, qlinear_reference


# ----------------------------------------------------------------------------------------- torch twins

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference(x, delta, weight, eps: float):
    s = x + delta
    return s, rms_norm_reference(s, weight, eps)


def route_reference(logits: torch.Tensor, k: int, normalize: bool):
    """model.moe.route: float32 softmax, top k, optionally renormalized."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True) if normalize else weights), ids


def rope_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, h: int, hkv: int, dh: int):
    b, t, _ = qkv.shape
    q, k, v = qkv.view(b, t, h + 2 * hkv, dh).transpose(1, 2).split([h, hkv, hkv], dim=1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v.contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)     # [B, 1, T, R]
    x1, x2 = x[..., :rot // 2], x[..., rot // 2:rot]
    rotated = x[..., :rot] * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x[..., rot:]), dim=-1)


def attend_reference(q, k, v, mask, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention in float32 with the sink logits (if any) in the denominator, rounded once to q.dtype."""
    b, h, t, dh = q.shape
    rep = h // k.shape[1]
    kf, vf = k.float().repeat_interleave(rep, dim=1), v.float().repeat_interleave(rep, dim=1)   # [B, H, S, Dh]
    scores = (q.float() @ kf.transpose(-1, -2)) * scale                                       # [B, H, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.float().view(1, h, 1, 1).expand(b, h, t, 1)], dim=-1)
    p = torch.softmax(scores, dim=-1)[..., :vf.shape[2]]
    return (p @ vf).to(q.dtype).transpose(1, 2).reshape(b, t, h * dh)


def attend_rows_reference(q, ks, vs, masks, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """attend_reference row by row: row i's query against ks[i], vs[i] [Hkv, S_i, Dh] under masks[i] [S_i]."""
    return torch.cat([attend_reference(q[i:i + 1], k[None], v[None], m.view(1, 1, 1, -1), scale, sinks)
                      for i, (k, v, m) in enumerate(zip(ks, vs, masks))]) if len(ks) else \
        q.new_empty(0, 1, q.shape[1] * q.shape[3])


def _routed_sum(op: str, x, weights, ids, experts, items, ffn, acc):
    """The twins' shared loop: for each expert (items[i] is experts[i]'s weights) y = ffn(x[its tokens], item),
    summed weighted in float32 in the given order; without acc the [N, D] output in x.dtype (every routed expert
    must be given), with acc the sums added into acc, which is returned."""
    n, d = x.shape
    out = torch.zeros(n, d, dtype=torch.float32) if acc is None else acc
    for e, item in zip(experts, items):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if len(tok) == 0:
            continue
        out.index_add_(0, tok, ffn(x[tok], item).float() * weights[tok, slot, None])
    missing = set(ids.flatten().tolist()) - set(experts)
    if acc is None and missing:
        raise ConfigError(f"{op}: tokens are routed to experts {sorted(missing)} not among those passed")
    return out if acc is not None else out.to(x.dtype)


def moe_experts_reference(x, weights, ids, experts, packed, inter: int, acc: torch.Tensor | None = None):
    """x [N, D] bf16, weights [N, K] float32, ids [N, K]; packed[i] is expert experts[i] (gate | up | down).
    Without acc: the combined output [N, D] in x.dtype (every routed expert must be given); with acc: the float32
    sums are added into acc, which is returned."""
    d = x.shape[1]

    def ffn(xe, buf):
        gate_up = bf16_linear(xe, buf[:2 * inter * d].view(2 * inter, d), backend="torch")
        hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        return bf16_linear(hidden, buf[2 * inter * d:3 * inter * d].view(d, inter), backend="torch")
    return _routed_sum("moe_experts", x, weights, ids, experts, packed, ffn, acc)


QUANT_FUSED_MAX_TOKENS = 32   # tokens up to which a MoE block runs its quantized experts in one call (short
                              # prompts too; measured: 16-token int4 prefill 1.07x -> 1.27x llama.cpp,
                              # int8 1.18x -> 1.39x)


def _bf16_qlinear_twin(x: torch.Tensor, m: QMatrix) -> torch.Tensor:
    """The CPU kernel's twin for 16-bit x, on x as float32 (the C op converts it; the float twin would otherwise
    round W to x's dtype), rounded back to x's dtype."""
    twin = qlinear_int8_reference if int8_acts(x, m) else qlinear_reference
    return twin(x.float(), m).to(x.dtype)


def moe_experts_quant_reference(x, weights, ids, experts, mats, inter: int, acc: torch.Tensor | None = None):
    """moe_experts_reference over quantized experts, rounding as quant/kernels.quant_expert_ffn on the CPU:
    gate_up = bf16(qlinear(x)), h = bf16(silu(gate)) * up (bf16), y = bf16(qlinear(h)), sums in float32;
    qlinear is the twin of the CPU kernel's path for bf16 activations: the integer one for 4/8-bit codes, the
    float one (on the activations as float32) for 2/3-bit codes."""
    def ffn(xe, mat):
        gate_up = _bf16_qlinear_twin(xe, mat[0])
        return _bf16_qlinear_twin(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], mat[1])
    return _routed_sum("moe_experts_quant", x, weights, ids, experts, mats, ffn, acc)


# ----------------------------------------------------------------------------------------- C ops

def _bf16_cpu(*tensors) -> bool:
    return all(t.dtype == torch.bfloat16 and t.is_cpu for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    if _resolve(backend) == "torch" or not _bf16_cpu(x, weight) or weight.shape != x.shape[-1:]:
        if backend == "c":
            raise ConfigError(f"rms_norm: backend='c' takes bf16 CPU x [..., D] and weight [D], got x {x.dtype} "
                              f"{tuple(x.shape)} on {x.device}, weight {weight.dtype} {tuple(weight.shape)}")
        return rms_norm_reference(x, weight, eps)
    return _rms_norm_c(x, weight, eps)


def _rms_norm_c(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    _C.rms_norm_bf16(x.data_ptr(), 0, weight.contiguous().data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps,
                     0, y.data_ptr())
    return y


def add_rms_norm(x, delta, weight, eps: float, *, backend: str = "auto"):
    if x.shape != delta.shape:
        raise ConfigError(f"add_rms_norm: x {tuple(x.shape)} and delta {tuple(delta.shape)} must have one shape")
    if _resolve(backend) == "torch" or not _bf16_cpu(x, delta, weight) or weight.shape != x.shape[-1:]:
        if backend == "c":
            raise ConfigError(f"add_rms_norm: backend='c' takes bf16 CPU x, delta [..., D] and weight [D], got "
                              f"{x.dtype} on {x.device}, weight {weight.dtype} {tuple(weight.shape)}")
        return add_rms_norm_reference(x, delta, weight, eps)
    return _add_rms_norm_c(x, delta, weight, eps)


def _add_rms_norm_c(x, delta, weight, eps: float):
    x, delta = x.contiguous(), delta.contiguous()
    s, y = torch.empty_like(x), torch.empty_like(x)
    _C.rms_norm_bf16(x.data_ptr(), delta.data_ptr(), weight.contiguous().data_ptr(), x.numel() // x.shape[-1],
                     x.shape[-1], eps, s.data_ptr(), y.data_ptr())
    return s, y


def route(logits: torch.Tensor, k: int, normalize: bool, *, backend: str = "auto"):
    if logits.dim() != 2 or not 1 <= k <= logits.shape[1]:
        raise ConfigError(f"route: need logits [N, E] and 1 <= k <= E, got {tuple(logits.shape)} and k={k}")
    if _resolve(backend) == "torch" or not _bf16_cpu(logits):
        if backend == "c":
            raise ConfigError(f"route: backend='c' takes bf16 CPU logits, got {logits.dtype} on {logits.device}")
        return route_reference(logits, k, normalize)
    return _route_c(logits, k, normalize)


def _route_c(logits: torch.Tensor, k: int, normalize: bool):
    logits = logits.contiguous()
    n, e = logits.shape
    weights = torch.empty(n, k, dtype=torch.float32)
    ids = torch.empty(n, k, dtype=torch.int64)
    _C.route_softmax_topk(logits.data_ptr(), n, e, k, normalize, weights.data_ptr(), ids.data_ptr())
    return weights, ids


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, h: int, hkv: int, dh: int,
             k_out: torch.Tensor | None = None, v_out: torch.Tensor | None = None, *, backend: str = "auto"):
    """With k_out and v_out ([B, Hkv, 1, Dh] views, e.g. a KV cache's new slot) k and v are written there and
    returned as those views."""
    b, t, width = qkv.shape
    if (k_out is None) != (v_out is None) or (k_out is not None and (
            k_out.shape != (b, hkv, 1, dh) or v_out.shape != k_out.shape or k_out.dtype != qkv.dtype
            or v_out.dtype != qkv.dtype or k_out.stride(3) != 1 or v_out.stride(3) != 1)):
        raise ConfigError(f"rope_qkv: k_out and v_out must both be given or neither, as [B, Hkv, 1, Dh] = "
                          f"{(b, hkv, 1, dh)} {qkv.dtype} views with contiguous head dims")
    rot = cos.shape[-1]
    if width != (h + 2 * hkv) * dh or cos.shape != (b, t, rot) or sin.shape != cos.shape or rot % 2 or rot > dh:
        raise ConfigError(f"rope_qkv: qkv {tuple(qkv.shape)} must be [B, T, (h + 2 hkv) dh] = [.., .., "
                          f"{(h + 2 * hkv) * dh}] and cos, sin [B, T, rot] with an even rot <= dh={dh}; got cos "
                          f"{tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if _resolve(backend) == "torch" or t != 1 or not _bf16_cpu(qkv, cos, sin):
        if backend == "c":
            raise ConfigError("rope_qkv: backend='c' takes one bf16 CPU token per row (T == 1), got "
                              f"T={t}, qkv {qkv.dtype} on {qkv.device}, cos {cos.dtype}")
        q, k, v = rope_qkv_reference(qkv, cos, sin, h, hkv, dh)
        if k_out is None:
            return q, k, v
        k_out.copy_(k)
        v_out.copy_(v)
        return q, k_out, v_out
    return _rope_qkv_c(qkv, cos, sin, h, hkv, dh, k_out, v_out)


def _rope_qkv_c(qkv, cos, sin, h: int, hkv: int, dh: int, k_out=None, v_out=None):
    b = qkv.shape[0]
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q = torch.empty(b, h, 1, dh, dtype=qkv.dtype)
    k = torch.empty(b, hkv, 1, dh, dtype=qkv.dtype) if k_out is None else k_out
    v = torch.empty(b, hkv, 1, dh, dtype=qkv.dtype) if v_out is None else v_out
    _C.rope_qkv_bf16(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), b, h, hkv, dh, cos.shape[-1], q.data_ptr(),
                     k.data_ptr(), [k.stride(0), k.stride(1)], v.data_ptr(), [v.stride(0), v.stride(1)])
    return q, k, v


def attend(q, k, v, mask, scale: float, sinks: torch.Tensor | None = None, *, backend: str = "auto"):
    b, h, t, dh = q.shape
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != dh or v.shape != k.shape or h % k.shape[1] \
            or mask.shape != (b, 1, t, k.shape[2]) or mask.dtype != torch.bool:
        raise ConfigError(f"attend: need q [B, H, T, Dh], k and v [B, Hkv, S, Dh] with H a multiple of Hkv and a "
                          f"bool mask [B, 1, T, S]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                          f"mask {mask.dtype} {tuple(mask.shape)}")
    if _resolve(backend) == "torch" or t != 1 or not _bf16_cpu(q, k, v) or k.stride(3) != 1 or v.stride(3) != 1:
        if backend == "c":
            raise ConfigError("attend: backend='c' takes one bf16 CPU query per row (T == 1) and k, v with "
                              f"contiguous head dims; got T={t}, {q.dtype} on {q.device}")
        return attend_reference(q, k, v, mask, scale, sinks)
    return _attend_c(q, k, v, mask, scale, sinks)


def _attend_c(q, k, v, mask, scale: float, sinks):
    return _attend_rows_c(q, k.unbind(0), v.unbind(0), mask[:, 0, 0].unbind(0), scale, sinks)


def attend_rows(q, ks, vs, masks, scale: float, sinks: torch.Tensor | None = None, *, backend: str = "auto"):
    """q [B, H, 1, Dh]; ks[i], vs[i] [Hkv, S_i, Dh] (any head stride, contiguous head dim, one slot stride for all
    rows); masks[i] bool [S_i] -> [B, 1, H Dh]: `attend` for a batch whose rows keep their keys and values apart."""
    b, h, t, dh = q.shape
    bad = [i for i, (k, v, m) in enumerate(zip(ks, vs, masks))
           if k.dim() != 3 or k.shape[2] != dh or v.shape != k.shape or h % k.shape[0] or m.shape != (k.shape[1],)
           or m.dtype != torch.bool or k.shape[1] < 1]
    if len(ks) != b or len(vs) != b or len(masks) != b or t != 1 or bad:
        raise ConfigError(f"attend_rows: need q [B, H, 1, Dh] and per row k, v [Hkv, S_i, Dh] with H a "
                          f"multiple of Hkv and a bool mask [S_i], S_i >= 1; got q {tuple(q.shape)}, {len(ks)} k, "
                          f"{len(vs)} v, {len(masks)} masks" + (f", row {bad[0]} wrong" if bad else ""))
    fits = _bf16_cpu(q, *ks, *vs) and all(k.stride(2) == 1 and v.stride(2) == 1 and k.stride(1) == ks[0].stride(1)
                                          and v.stride(1) == vs[0].stride(1) for k, v in zip(ks, vs))
    if _resolve(backend) == "torch" or not fits:
        if backend == "c":
            raise ConfigError("attend_rows: backend='c' takes bf16 CPU tensors with contiguous head dims and one "
                              "slot stride for every row")
        return attend_rows_reference(q, ks, vs, masks, scale, sinks)
    return _attend_rows_c(q, ks, vs, masks, scale, sinks)


def _attend_rows_c(q, ks, vs, masks, scale: float, sinks):
    b, h, _, dh = q.shape
    out = torch.empty(b, 1, h * dh, dtype=q.dtype)
    if b == 0:
        return out
    q = q.contiguous()
    masks = [m if m.is_contiguous() else m.contiguous() for m in masks]
    rows = [(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), m.data_ptr(), k.shape[1])
            for k, v, m in zip(ks, vs, masks)]
    sinks = None if sinks is None else sinks.float().contiguous()
    _C.attend_rows_bf16(q.data_ptr(), rows, ks[0].stride(1), vs[0].stride(1), 0 if sinks is None else sinks.data_ptr(),
                        h, ks[0].shape[0], dh, scale, out.data_ptr(), torch.get_num_threads())
    return out


def moe_experts(x, weights, ids, experts, packed, inter: int, acc: torch.Tensor | None = None, *,
                backend: str = "auto") -> torch.Tensor:
    """out [N, D] = sum over each token's K experts of weight x expert(x), in the order of `experts`; with acc
    (float32 [N, D]) the unrounded sums are added into it instead and acc is returned."""
    n, d = x.shape
    if acc is not None and (acc.shape != (n, d) or acc.dtype != torch.float32 or not acc.is_contiguous()):
        raise ConfigError(f"moe_experts: acc must be a contiguous float32 tensor of shape {(n, d)}, got "
                          f"{acc.dtype} {tuple(acc.shape)}")
    if ids.shape != weights.shape or ids.shape[0] != n or len(experts) != len(packed) \
            or any(p.numel() < 3 * inter * d for p in packed):
        raise ConfigError(f"moe_experts: need ids and weights [N, K] for x [N, D] = {tuple(x.shape)} and one packed "
                          f"buffer of >= 3 * inter * D elements per expert; got ids {tuple(ids.shape)}, weights "
                          f"{tuple(weights.shape)}, {len(experts)} experts, {len(packed)} buffers")
    fits = n <= BF16_N_MAX and _bf16_cpu(x, *packed) and all(p.is_contiguous() for p in packed)
    if _resolve(backend) == "torch" or not fits:
        if backend == "c":
            raise ConfigError(f"moe_experts: backend='c' takes bf16 CPU x with at most {BF16_N_MAX} tokens and "
                              f"contiguous bf16 experts; got {n} tokens of {x.dtype} on {x.device}")
        return moe_experts_reference(x, weights, ids, experts, packed, inter, acc)
    return _moe_experts_c(x, weights, ids, experts, packed, inter, acc)


def _moe_experts_c(x, weights, ids, experts, packed, inter: int, acc: torch.Tensor | None = None) -> torch.Tensor:
    x = x.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty_like(x) if acc is None else None
    _C.moe_experts_bf16(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), x.shape[0], ids.shape[1], x.shape[1],
                        inter, list(experts), [p.data_ptr() for p in packed], 0 if acc is None else acc.data_ptr(),
                        0 if out is None else out.data_ptr(), torch.get_num_threads())
    return out if acc is None else acc


def qmatrix_pointers(m: QMatrix) -> tuple:
    """A QMatrix as the C op takes it: (bits, group, rows, cols, low plane, high plane or 0, scales, zeros)."""
    for t in (*m.planes, m.scales, m.zeros):
        if not (t.is_cpu and t.is_contiguous()):
            raise ConfigError("moe_experts_quant: every plane, scale and zero tensor must be contiguous on the CPU")
    return (m.bits, m.group, m.rows, m.cols, m.planes[0].data_ptr(),
            m.planes[1].data_ptr() if len(m.planes) > 1 else 0, m.scales.data_ptr(), m.zeros.data_ptr())


def moe_experts_quant(x, weights, ids, experts, mats, inter: int, acc: torch.Tensor | None = None, *,
                      backend: str = "auto", isa: str = "auto"):
    """Routed SwiGLU experts over quantized matrices: mats[i] = (W1 [2I, D], W2 [D, I]) QMatrix of experts[i].
    "c" needs bf16 CPU x with at most QUANT_FUSED_MAX_TOKENS tokens; the twin is moe_experts_quant_reference. isa: the
    qlinear path (a test hook, see matmul.qlinear_isas)."""
    n, d = x.shape
    if acc is not None and (acc.dtype != torch.float32 or tuple(acc.shape) != (n, d) or not acc.is_contiguous()):
        raise ConfigError(f"moe_experts_quant: acc must be a contiguous float32 tensor of shape {(n, d)}, got "
                          f"{acc.dtype} {tuple(acc.shape)}")
    if ids.shape != weights.shape or ids.shape[0] != n or len(mats) != len(experts):
        raise ConfigError(f"moe_experts_quant: need ids and weights [N, K] for x [N, D] = {tuple(x.shape)} and one "
                          f"(W1, W2) pair per expert, got ids {tuple(ids.shape)}, weights {tuple(weights.shape)}, "
                          f"{len(mats)} pairs for {len(experts)} experts")
    if isa not in QLINEAR_ISAS:
        raise ConfigError(f"moe_experts_quant: isa must be one of {QLINEAR_ISAS}, got {isa!r}")
    if _resolve(backend) == "torch" or not (_bf16_cpu(x) and n <= QUANT_FUSED_MAX_TOKENS):
        if backend == "c":
            raise ConfigError(f"moe_experts_quant: backend='c' takes bf16 CPU x with at most {QUANT_FUSED_MAX_TOKENS} "
                              f"tokens, got {x.dtype} {tuple(x.shape)} on {x.device}")
        return moe_experts_quant_reference(x, weights, ids, experts, mats, inter, acc)
    ptrs = [p for w1, w2 in mats for p in (qmatrix_pointers(w1), qmatrix_pointers(w2))]
    return _moe_experts_quant_c(x, weights, ids, experts, ptrs, inter, acc, isa)


def _moe_experts_quant_c(x, weights, ids, experts, ptrs, inter: int, acc: torch.Tensor | None = None,
                         isa: str = "auto") -> torch.Tensor:
    """ptrs: W1 then W2 of each expert as qmatrix_pointers / QMatrixLayout.pointers give them."""
    x = x.contiguous()
    ids = ids.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = torch.empty_like(x) if acc is None else None
    _C.moe_experts_quant(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), x.shape[0], ids.shape[1], x.shape[1],
                         inter, list(experts), ptrs, 0 if acc is None else acc.data_ptr(),
                         0 if out is None else out.data_ptr(), torch.get_num_threads(), isa)
    return out if acc is None else acc


class DecodeOps:
    """The C ops as the decoder calls them (Decoder.set_decode_ops): no argument checks beyond what the callers
    guarantee (bf16 CPU tensors of a consistent model), so the hot path pays one Python call per op."""

    max_expert_tokens = BF16_N_MAX    # MoE blocks with more tokens (prefill) keep their per-expert loop
    max_quant_expert_tokens = QUANT_FUSED_MAX_TOKENS
    linear = staticmethod(bf16_linear)
    rms_norm = staticmethod(_rms_norm_c)
    add_rms_norm = staticmethod(_add_rms_norm_c)
    route = staticmethod(_route_c)
    rope_qkv = staticmethod(_rope_qkv_c)
    attend = staticmethod(_attend_c)
    attend_rows = staticmethod(_attend_rows_c)
    moe_experts = staticmethod(_moe_experts_c)
    moe_experts_quant = staticmethod(_moe_experts_quant_c)


def decode_ops() -> DecodeOps | None:
    """The fused decode ops when the extension loaded (for a bf16 model on the CPU), else None."""
    return DecodeOps() if HAS_C_EXT else None
