"""The fused bf16 decode ops (moe_engine._C through _ops.decode) against their torch twins, and their use by the model.

Tolerances: rope_qkv and the residual sum of add_rms_norm round exactly where torch rounds, on the same float32
values: bit for bit. rms_norm's statistic and attention's dot products are float32 sums in another order than
torch's, which can move a result across a bf16 rounding boundary: at most one bf16 ulp of the result (plus a
float32 accumulation term for attention). The experts round to bf16 after gate_up, after SiLU(gate) * up and
after down, as torch does, so one ulp flipped early propagates: asserted max |diff| <= 2% of max |result|
(measured below 1%) and most elements identical. Accumulating experts one call at a time equals one call for
all of them exactly (same float32 additions in the same order).
"""
from __future__ import annotations

import pytest
import torch

import moe_engine
from moe_engine import _ops
from moe_engine._ops import decode
from moe_engine.errors import ConfigError

needs_c = pytest.mark.skipif(not _ops.HAS_C_EXT, reason=f"moe_engine._C not loaded: {_ops.C_EXT_ERROR}")
BF = torch.bfloat16


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ulp(v: torch.Tensor) -> torch.Tensor:
    mag = v.abs().float().clamp(min=torch.finfo(BF).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def _within_ulp(a: torch.Tensor, b: torch.Tensor, extra: float = 0.0) -> bool:
    return bool(((a.float() - b.float()).abs() <= _ulp(torch.maximum(a.float().abs(), b.float().abs())) + extra).all())


# ------------------------------------------------------------------------------------------- norms and routing

@needs_c
@pytest.mark.parametrize("n,d", [(1, 16), (2, 17), (3, 64), (8, 1000), (1, 1024), (5, 4096)])
def test_rms_norm_and_fused_residual_match_twins(n, d):
    g = _g(d)
    x, delta = torch.randn(n, d, generator=g).to(BF), torch.randn(n, d, generator=g).to(BF)
    w = (torch.rand(d, generator=g) + 0.5).to(BF)
    y = decode.rms_norm(x, w, 1e-5, backend="c")
    assert y.dtype == BF and _within_ulp(y, decode.rms_norm_reference(x, w, 1e-5))
    s, y2 = decode.add_rms_norm(x, delta, w, 1e-6, backend="c")
    s_ref, y2_ref = decode.add_rms_norm_reference(x, delta, w, 1e-6)
    assert torch.equal(s, s_ref) and _within_ulp(y2, y2_ref)


@needs_c
@pytest.mark.parametrize("n,e,k,normalize", [(1, 8, 2, True), (3, 8, 2, False), (8, 64, 6, True), (2, 128, 8, False),
                                             (1, 4, 4, True)])
def test_route_matches_softmax_topk(n, e, k, normalize):
    logits = torch.randn(n, e, generator=_g(e)).to(BF)
    w, ids = decode.route(logits, k, normalize, backend="c")
    w_ref, ids_ref = decode.route_reference(logits, k, normalize)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, ids_ref) and torch.allclose(w, w_ref, rtol=1e-6, atol=1e-7)


@needs_c
def test_route_breaks_ties_by_lower_id():
    w, ids = decode.route(torch.zeros(2, 8, dtype=BF), 3, True, backend="c")
    assert ids.tolist() == [[0, 1, 2]] * 2 and torch.allclose(w, torch.full((2, 3), 1 / 3))


# ------------------------------------------------------------------------------------------- attention

@needs_c
@pytest.mark.parametrize("b,h,hkv,dh,rot",
                         [(1, 4, 4, 16, 16), (2, 8, 2, 64, 64), (3, 6, 3, 32, 16), (1, 16, 4, 128, 64)])
def test_rope_qkv_is_bit_exact(b, h, hkv, dh, rot):
    g = _g(dh)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * dh, generator=g).to(BF)
    ang = torch.rand(b, 1, rot // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(BF), torch.cat([ang.sin()] * 2, -1).to(BF)
    got = decode.rope_qkv(qkv, cos, sin, h, hkv, dh, backend="c")
    ref = decode.rope_qkv_reference(qkv, cos, sin, h, hkv, dh)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and torch.equal(a, r)


@needs_c
def test_rope_qkv_writes_k_and_v_into_cache_slots():
    b, h, hkv, dh = 2, 8, 2, 32
    g = _g(5)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * dh, generator=g).to(BF)
    ang = torch.rand(b, 1, dh // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(BF), torch.cat([ang.sin()] * 2, -1).to(BF)
    cache_k, cache_v = torch.zeros(b, hkv, 10, dh, dtype=BF), torch.zeros(b, hkv, 10, dh, dtype=BF)
    q, k, v = decode.rope_qkv(qkv, cos, sin, h, hkv, dh, cache_k[:, :, 6:7], cache_v[:, :, 6:7], backend="c")
    q_ref, k_ref, v_ref = decode.rope_qkv_reference(qkv, cos, sin, h, hkv, dh)
    assert torch.equal(q, q_ref) and torch.equal(cache_k[:, :, 6:7], k_ref) and torch.equal(cache_v[:, :, 6:7], v_ref)
    assert cache_k[:, :, :6].abs().sum() == 0 and cache_v[:, :, 7:].abs().sum() == 0     # nothing else written
    with pytest.raises(ConfigError, match="both be given"):
        decode.rope_qkv(qkv, cos, sin, h, hkv, dh, cache_k[:, :, 6:7], None)


def test_rope_twin_matches_the_models_rotary():
    from moe_engine.model.rope import apply_rotary
    b, h, hkv, dh, rot = 2, 4, 2, 32, 16
    g = _g(1)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * dh, generator=g).to(BF)
    ang = torch.rand(b, 1, rot // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(BF), torch.cat([ang.sin()] * 2, -1).to(BF)
    q, k, v = qkv.view(b, 1, h + 2 * hkv, dh).transpose(1, 2).split([h, hkv, hkv], dim=1)
    q_ref, k_ref = apply_rotary(q, k, cos, sin)
    q2, k2, v2 = decode.rope_qkv_reference(qkv, cos, sin, h, hkv, dh)
    assert torch.equal(q2, q_ref) and torch.equal(k2, k_ref) and torch.equal(v2, v)


def _attn_inputs(b, h, hkv, s, dh, seed=0, cap_extra=5):
    g = _g(seed)
    q = torch.randn(b, h, 1, dh, generator=g).to(BF)
    cache_k = torch.randn(b, hkv, s + cap_extra, dh, generator=g).to(BF)     # a cache with spare capacity:
    cache_v = torch.randn(b, hkv, s + cap_extra, dh, generator=g).to(BF)     # k, v are strided views of it
    mask = torch.rand(b, 1, 1, s, generator=g) < 0.8
    mask[..., -1] = True                                                       # a query always sees itself
    return q, cache_k[:, :, :s], cache_v[:, :, :s], mask


@needs_c
@pytest.mark.parametrize("b,h,hkv,s,dh", [(1, 4, 4, 1, 16), (1, 16, 4, 37, 64), (2, 8, 2, 130, 64), (3, 4, 1, 9, 128),
                                          (1, 32, 8, 600, 64), (2, 2, 2, 1025, 32)])
@pytest.mark.parametrize("sinks", [False, True])
def test_attend_matches_twin(b, h, hkv, s, dh, sinks):
    q, k, v, mask = _attn_inputs(b, h, hkv, s, dh, seed=s)
    sink = torch.randn(h, generator=_g(9)) if sinks else None
    got = decode.attend(q, k, v, mask, dh ** -0.5, sink, backend="c")
    ref = decode.attend_reference(q, k, v, mask, dh ** -0.5, sink)
    assert got.shape == (b, 1, h * dh) and _within_ulp(got, ref, extra=1e-5)


def test_attend_twin_matches_sdpa():
    q, k, v, mask = _attn_inputs(2, 8, 2, 50, 32)
    q, k, v = q.float(), k.float(), v.float()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    got = decode.attend_reference(q, k, v, mask, 0.3)
    assert torch.allclose(got, ref.transpose(1, 2).reshape(2, 1, -1), atol=1e-5)


def _ragged_inputs(lengths, h, hkv, dh, seed=0):
    """One query per row; each row's keys/values in a cache of its own capacity (strided views), masks [S_i]."""
    g = _g(seed)
    q = torch.randn(len(lengths), h, 1, dh, generator=g).to(BF)
    ks, vs, ms = [], [], []
    for n in lengths:
        cap = n + int(torch.randint(0, 7, (1,), generator=g))
        ks.append(torch.randn(hkv, cap, dh, generator=g).to(BF)[:, :n])
        vs.append(torch.randn(hkv, cap, dh, generator=g).to(BF)[:, :n])
        m = torch.rand(n, generator=g) < 0.8
        m[-1] = True
        ms.append(m)
    return q, ks, vs, ms


@needs_c
@pytest.mark.parametrize("lengths,h,hkv,dh", [([1], 4, 4, 16), ([37, 1, 5], 16, 4, 64), ([130, 129], 8, 2, 64),
                                              ([9, 600, 3, 40], 4, 1, 128), ([1025, 2], 2, 2, 32)])
@pytest.mark.parametrize("sinks", [False, True])
def test_attend_rows_matches_twin(lengths, h, hkv, dh, sinks):
    q, ks, vs, ms = _ragged_inputs(lengths, h, hkv, dh, seed=len(lengths))
    sink = torch.randn(h, generator=_g(4)) if sinks else None
    got = decode.attend_rows(q, ks, vs, ms, dh ** -0.5, sink, backend="c")
    ref = decode.attend_rows_reference(q, ks, vs, ms, dh ** -0.5, sink)
    assert got.shape == (len(lengths), 1, h * dh) and _within_ulp(got, ref, extra=1e-5)


@needs_c
def test_attend_rows_equals_attend_on_a_padded_batch():
    """The ragged op on each row's own cache gives bit for bit what attend gives on those rows right-aligned in one
    padded tensor (the gather the serving loop no longer makes): masked slots take no part in either."""
    lengths, h, hkv, dh = [7, 1, 20], 8, 2, 32
    q, ks, vs, ms = _ragged_inputs(lengths, h, hkv, dh, seed=5)
    s = max(lengths)
    k = torch.zeros(len(lengths), hkv, s, dh, dtype=BF)
    v, mask = torch.zeros_like(k), torch.zeros(len(lengths), 1, 1, s, dtype=torch.bool)
    for i, n in enumerate(lengths):
        k[i, :, s - n:], v[i, :, s - n:], mask[i, 0, 0, s - n:] = ks[i], vs[i], ms[i]
    padded = decode.attend(q, k, v, mask, 0.2, backend="c")
    assert torch.equal(decode.attend_rows(q, ks, vs, ms, 0.2, backend="c"), padded)
    assert torch.equal(decode.attend_rows(q[1:2], ks[1:2], vs[1:2], ms[1:2], 0.2, backend="c"), padded[1:2])


def test_attend_rows_bad_inputs_name_the_problem():
    q, ks, vs, ms = _ragged_inputs([3, 4], 4, 2, 16)
    with pytest.raises(ConfigError, match="row 1 wrong"):
        decode.attend_rows(q, ks, vs, [ms[0], ms[1][:2]], 1.0)
    with pytest.raises(ConfigError, match="2 k, 2 v, 1 masks"):
        decode.attend_rows(q, ks, vs, ms[:1], 1.0)


# ------------------------------------------------------------------------------------------- experts

def _experts(n, k, d, inter, e, seed=0):
    g = _g(seed)
    x = torch.randn(n, d, generator=g).to(BF)
    packed = [(torch.randn(3 * inter * d, generator=g) * d ** -0.5).to(BF) for _ in range(e)]
    w, ids = torch.topk(torch.softmax(torch.randn(n, e, generator=g), -1), k)
    return x, w, ids, packed


@needs_c
@pytest.mark.parametrize("n,k,d,inter,e", [(1, 2, 64, 96, 4), (3, 2, 32, 40, 8), (8, 4, 128, 200, 8), (5, 1, 16, 17, 3),
                                           (2, 2, 1024, 3584, 8)])
def test_moe_experts_match_twin(n, k, d, inter, e):
    x, w, ids, packed = _experts(n, k, d, inter, e, seed=d)
    got = decode.moe_experts(x, w, ids, list(range(e)), packed, inter, backend="c")
    ref = decode.moe_experts_reference(x, w, ids, list(range(e)), packed, inter)
    err = (got.float() - ref.float()).abs()
    assert err.max() <= 0.02 * ref.float().abs().max()
    assert (err == 0).float().mean() >= 0.9


@needs_c
def test_moe_experts_accumulate_per_expert_exactly_like_one_call():
    x, w, ids, packed = _experts(4, 2, 64, 96, 6, seed=3)
    order = [5, 0, 3, 1, 2, 4]
    one = decode.moe_experts(x, w, ids, order, [packed[e] for e in order], 96, backend="c")
    acc = torch.zeros(4, 64)
    for e in order:
        decode.moe_experts(x, w, ids, [e], [packed[e]], 96, acc, backend="c")
    assert torch.equal(acc.to(BF), one)
    ref = torch.zeros(4, 64)
    for e in order:
        decode.moe_experts(x, w, ids, [e], [packed[e]], 96, ref, backend="torch")
    assert (acc - ref).abs().max() <= 0.02 * ref.abs().max()


@needs_c
def test_bad_inputs_name_the_problem():
    x, w, ids, packed = _experts(2, 2, 32, 40, 4)
    with pytest.raises(ValueError, match="routed to expert"):
        decode.moe_experts(x, w, ids, [0], [packed[0]], 40, backend="c")
    with pytest.raises(ConfigError, match="acc must be"):
        decode.moe_experts(x, w, ids, [0], [packed[0]], 40, torch.zeros(3, 32), backend="c")
    with pytest.raises(ConfigError, match="backend='c' takes bf16"):
        decode.rms_norm(x.float(), torch.ones(32), 1e-5, backend="c")
    q, k, v, mask = _attn_inputs(1, 4, 3, 5, 16)
    with pytest.raises(ConfigError, match="multiple of Hkv"):
        decode.attend(q, k, v, mask, 1.0)
    with pytest.raises(ConfigError, match="T == 1"):
        decode.attend(q.expand(1, 4, 2, 16), k[:, :2], v[:, :2], mask.expand(1, 1, 2, 5), 1.0, backend="c")


# ------------------------------------------------------------------------------------------- the model path

@needs_c
def test_bf16_model_decodes_through_the_ops_like_its_torch_path():
    """Greedy decode of the bundled model with the fused ops vs the torch code everywhere (ops off): the same
    tokens, and the last step's logits within a few bf16 ulps of the activations (<= 0.05 std)."""
    from moe_engine.runtime.config import KernelConfig
    eng = moe_engine.load(device="cpu", dtype="bfloat16", progress=False)
    torch_path = moe_engine.load(device="cpu", dtype="bfloat16", progress=False,
                                 kernels=KernelConfig(decode_ops=False))
    try:
        assert eng.decoder.layers[0].attn.qkv_weight is not None
        assert torch_path.decoder.decode_ops is None and torch_path.decoder.layers[0].attn.qkv_weight is None
        prompt = "def fib(n):\n    if n < 2:\n        return n\n"
        fast = eng.generate(prompt, max_new_tokens=24, do_sample=False)
        ids = torch.tensor([eng.encode(prompt + fast)])
        fast_logits = eng.logits(ids)[:, -1]
        slow = torch_path.generate(prompt, max_new_tokens=24, do_sample=False)
        slow_logits = torch_path.logits(ids)[:, -1]
    finally:
        eng.close()
        torch_path.close()
    assert fast == slow
    assert (fast_logits - slow_logits).abs().max() <= 0.05 * slow_logits.std()


@needs_c
def test_fused_qkv_keeps_parameters_and_memory():
    """q|k|v are fused when the weights are read: the projections view one tensor holding the checkpoint's values."""
    eng = moe_engine.load(device="cpu", dtype="bfloat16", progress=False)
    try:
        attn = eng.decoder.layers[0].attn
        before = {n: p.clone() for n, p in attn.named_parameters()}
        attn.fuse_qkv()                               # again: idempotent
        assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
        assert attn.v_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.untyped_storage().data_ptr()
        assert all(torch.equal(before[n], p) for n, p in attn.named_parameters())
        for name in ("q_proj", "k_proj", "v_proj"):
            want = eng.checkpoint.read(f"layers.0.attn.{name}.weight", torch.bfloat16)
            assert torch.equal(getattr(attn, name).weight, want)
    finally:
        eng.close()


@needs_c
def test_bf16_outputs_do_not_depend_on_the_budget():
    """Offloaded experts (a cache that reuses slots: one op call per expert) and resident ones (one call per
    layer) give the same bf16 tokens: the same float32 additions in the same order."""
    prompts = ["import os\nimport sys\n", "def add(a, b):\n    return"]
    outs = []
    for budget in (None, "16M"):
        eng = moe_engine.load(device="cpu", dtype="bfloat16", gpu_mem=budget, progress=False)
        try:
            outs.append([eng.generate(p, max_new_tokens=12, do_sample=False) for p in prompts])
        finally:
            eng.close()
    assert outs[0] == outs[1]


def test_float32_model_has_no_decode_ops():
    eng = moe_engine.load(device="cpu", dtype="float32", progress=False)
    try:
        assert all(getattr(m, "ops", None) is None for m in eng.decoder.modules())
        assert eng.decoder.layers[0].attn.qkv_weight is None
    finally:
        eng.close()
