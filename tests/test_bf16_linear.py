"""The bf16 GEMV (moe_engine._C through _ops.bf16_linear) against its float32 twin, and its use by the model.

Tolerance (every SIMD path, x bf16 or float32): the kernel and the twin (F.linear in float32) both sum the same
exact products (a bf16 times a bf16 or float32 value is exact in float64, and within float32 rounding in
float32) in different orders, so before the final rounding they differ by at most the float32 accumulation
error, bounded here by ACC_EPS * (|x| @ |W|^T + |b|) (ACC_EPS = 2^-20; the worst case for 4096 columns is
~2^-12, random-sign sums like these ~2^-22: measured <= 0.03 * ACC_EPS on this grid). Rounding both to bf16 once adds at most one bf16 ulp of the result.
So |kernel - twin| <= ulp_bf16(result) + ACC_EPS * (|x| @ |W|^T + |b|) for bf16 x, and the ulp term is 0
for float32 x (no final rounding to bf16).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_engine
from moe_engine import _ops
from moe_engine.errors import ConfigError

needs_c = pytest.mark.skipif(not _ops.HAS_C_EXT, reason=f"moe_engine._C not loaded: {_ops.C_EXT_ERROR}")
ISAS = _ops.bf16_linear_isas() or ["auto"]
ACC_EPS = 2.0 ** -20
# (rows, cols, n): non-multiples of 4, 16 and 32 rows and of 16/32 columns, a few columns only (tail only),
# the decode shapes of the Mixtral-shaped bench checkpoint
SHAPES = [(1, 16, 1), (3, 17, 2), (5, 31, 3), (16, 32, 4), (33, 33, 5), (7, 64, 6), (64, 100, 7), (31, 1024, 8),
          (4097, 96, 1), (257, 4096, 3), (1024, 3584, 1), (7168, 1024, 2), (100, 4095, 8)]


def _inputs(rows, cols, n, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    x = torch.randn(n, cols, generator=g).to(dtype)
    b = torch.randn(rows, generator=g).to(torch.bfloat16) if bias else None
    return x, w, b


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |v| (2^(e - 7) for |v| in [2^e, 2^(e+1))), the smallest normal's for 0."""
    mag = v.abs().float().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def assert_close_to_twin(y, x, w, b):
    ref = _ops.bf16_linear_reference(x, w, b)
    assert y.dtype == x.dtype and y.shape == ref.shape
    scale = F.linear(x.float().abs(), w.float().abs(), None if b is None else b.float().abs())
    bound = ACC_EPS * scale
    if x.dtype == torch.bfloat16:
        bound = bound + _bf16_ulp(torch.maximum(y.float().abs(), ref.float().abs()))
    err = (y.float() - ref.float()).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst error/bound {(err / bound).max():.3g}"


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_c_matches_twin_over_grid(isa, dtype, bias):
    for rows, cols, n in SHAPES:
        x, w, b = _inputs(rows, cols, n, dtype, bias)
        assert_close_to_twin(_ops.bf16_linear(x, w, b, backend="c", num_threads=2, isa=isa), x, w, b)


@needs_c
@pytest.mark.parametrize("isa", ISAS)
def test_leading_dims_and_up_to_n_max_rows(isa):
    x, w, b = _inputs(300, 200, _ops.BF16_N_MAX, torch.bfloat16, True)
    y = _ops.bf16_linear(x.view(2, -1, 200), w, b, backend="c", isa=isa)
    assert y.shape == (2, _ops.BF16_N_MAX // 2, 300)
    assert_close_to_twin(y.view(-1, 300), x, w, b)


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_thread_count_and_batch_do_not_change_results(isa, dtype):
    x, w, b = _inputs(2051, 1000, 7, dtype, True, seed=1)
    one = _ops.bf16_linear(x, w, b, backend="c", num_threads=1, isa=isa)
    for threads in (2, 3, 5):
        assert torch.equal(one, _ops.bf16_linear(x, w, b, backend="c", num_threads=threads, isa=isa))
    for t in (0, 3, 6):   # a token's result is the same alone as in a batch of 7
        assert torch.equal(one[t:t + 1], _ops.bf16_linear(x[t:t + 1], w, b, backend="c", num_threads=2, isa=isa))


@needs_c
@pytest.mark.parametrize("isa", ISAS)
def test_rounds_to_nearest_even_like_torch(isa):
    # y = 1 + 2^-8 and 1 + 3 * 2^-8 are exactly halfway between two bf16 values: ties go to the even one
    w = torch.tensor([[1.0, 2.0 ** -8], [1.0, 3 * 2.0 ** -8], [1.0, -(2.0 ** -9)]]).to(torch.bfloat16)
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    y = _ops.bf16_linear(x, w, backend="c", isa=isa)
    expected = torch.tensor([[1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 - 2.0 ** -9]]).to(torch.bfloat16)
    assert torch.equal(y, expected) and y[0, 0].item() == 1.0 and y[0, 1].item() == 1 + 2.0 ** -6


@needs_c
def test_nan_and_inf_propagate():
    x, w, _ = _inputs(8, 64, 2, torch.bfloat16, False)
    w[3, 5], w[6, 0] = float("nan"), float("inf")
    y = _ops.bf16_linear(x, w, backend="c")
    ref = _ops.bf16_linear_reference(x, w)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())


def test_auto_falls_back_to_torch_for_inputs_the_kernel_does_not_take():
    x, w, b = _inputs(40, 64, _ops.BF16_N_MAX + 1, torch.bfloat16, True)   # prefill-sized: torch's GEMM
    assert torch.equal(_ops.bf16_linear(x, w, b), F.linear(x, w, b))
    xf, wf = x.float(), w.float()                                             # float32 weights: F.linear exactly
    assert torch.equal(_ops.bf16_linear(xf[:2], wf), F.linear(xf[:2], wf))
    wt = w.t().contiguous().t()                                               # non-contiguous weight
    assert torch.equal(_ops.bf16_linear(x[:2], wt), F.linear(x[:2], wt))


@needs_c
def test_env_var_forces_the_twin(monkeypatch):
    """MOE_ENGINE_LINEAR_KERNEL=reference is read once, when an engine is built: its linear layers then run the
    twin where the C kernel would (and torch's GEMM where it would not)."""
    from moe_engine.model.linear import Linear
    from moe_engine.runtime.config import LINEAR_KERNEL_ENV, KernelConfig
    x, w, b = _inputs(64, 96, 3, torch.bfloat16, True)
    monkeypatch.setenv(LINEAR_KERNEL_ENV, "reference")
    assert KernelConfig.from_env().linear == "reference"
    eng = moe_engine.load(device="cpu", dtype="bfloat16", progress=False)
    try:
        assert all(m.kernel is _ops.bf16_linear_twin for m in eng.decoder.modules() if isinstance(m, Linear))
        assert eng.decoder.decode_ops is None
    finally:
        eng.close()
    assert torch.equal(_ops.bf16_linear_twin(x, w, b), _ops.bf16_linear_reference(x, w, b))
    xl, wl, bl = _inputs(40, 64, _ops.BF16_N_MAX + 1, torch.bfloat16, True)
    assert torch.equal(_ops.bf16_linear_twin(xl, wl, bl), F.linear(xl, wl, bl))


@needs_c
@pytest.mark.parametrize("kwargs, match", [
    (dict(w=torch.zeros(4, 8)), "contiguous 2-D bfloat16"),
    (dict(w=torch.zeros(8, 4, dtype=torch.bfloat16).t()), "contiguous 2-D bfloat16"),
    (dict(x=torch.zeros(1, 8, dtype=torch.float16)), "bfloat16 or float32"),
    (dict(b=torch.zeros(5, dtype=torch.bfloat16)), r"bias must be a contiguous bfloat16 tensor of shape \(4,\)"),
    (dict(b=torch.zeros(4)), "bias must be"),
    (dict(x=torch.zeros(1, 7, dtype=torch.bfloat16)), "must agree on C"),
    (dict(x=torch.zeros(_ops.BF16_N_MAX + 1, 8, dtype=torch.bfloat16)), "at most BF16_N_MAX"),
    (dict(isa="neon"), "isa must be one of"),
])
def test_bad_inputs_name_the_problem(kwargs, match):
    args = dict(x=torch.zeros(1, 8, dtype=torch.bfloat16), w=torch.zeros(4, 8, dtype=torch.bfloat16), b=None,
                isa="auto")
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        _ops.bf16_linear(args["x"], args["w"], args["b"], backend="c", isa=args["isa"])


@needs_c
def test_c_boundary_checks():
    x, w = torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16)
    y = torch.empty(1, 4, dtype=torch.bfloat16)
    call = lambda **kw: _ops._C.bf16_linear(**{**dict(x_ptr=x.data_ptr(), x_f32=False, n=1,   # noqa: E731
                                                      w_ptr=w.data_ptr(), bias_ptr=0, rows=4, cols=8,
                                                      y_ptr=y.data_ptr(), num_threads=1, isa="auto"), **kw})
    for kw, match in [(dict(cols=0), "cols >= 1"), (dict(n=-1), "n >= 0"), (dict(num_threads=0), "num_threads"),
                      (dict(isa="sse"), "not available on this CPU"), (dict(w_ptr=0), "non-null")]:
        with pytest.raises(ValueError, match=match):
            call(**kw)


# ------------------------------------------------------------------------------------------- the model path

@pytest.fixture(scope="module")
def bf16_engine():
    eng = moe_engine.load(device="cpu", dtype="bfloat16", progress=False)
    yield eng
    eng.close()


@needs_c
def test_bf16_model_uses_the_kernel_everywhere(bf16_engine, monkeypatch):
    """Every projection takes the kernel; a prefill longer than the decode ops' range runs the routed experts
    through it too (decode-sized MoE blocks go to the fused expert op, see test_decode_ops.py)."""
    from moe_engine.model.linear import Linear
    dec = bf16_engine.decoder
    linears = [m for m in dec.modules() if isinstance(m, Linear)]
    assert linears and all(m.kernel is _ops.bf16_linear for m in linears)
    assert all(layer.moe.linear is _ops.bf16_linear for layer in dec.layers if hasattr(layer, "moe"))
    shapes, real = [], _ops.bf16_linear
    spy = lambda x, w, b=None: shapes.append(tuple(w.shape)) or real(x, w, b)   # noqa: E731
    monkeypatch.setattr(_ops, "bf16_linear", spy)          # the kernel the build picks, so it reaches the experts too
    eng = moe_engine.load(device="cpu", dtype="bfloat16", progress=False)
    try:
        eng.generate("def add(a, b):\n    return a + b\n\n", max_new_tokens=2, do_sample=False)
    finally:
        eng.close()
    spec = bf16_engine.spec
    expert_up = (2 * spec.moe.intermediate_size, spec.hidden_size)
    assert (spec.vocab_size, spec.hidden_size) in shapes and expert_up in shapes   # lm_head and routed experts


@needs_c
def test_bf16_model_logits_close_to_reference(bf16_engine):
    """Decode-sized forwards (8 tokens: the kernel's range) with the kernel vs its float32 twin everywhere.
    Both round every activation to bf16, at different places by up to one ulp, so the logits differ by a few
    bf16 ulps of the activations that feed them: asserted max |diff| <= 0.05 * std(logits) (measured 0.023),
    and the same greedy token at >= 7 of 8 positions."""
    from moe_engine.runtime.config import KernelConfig
    ids = torch.tensor([bf16_engine.encode("def add(a, b):\n    return a")[:8]])
    fast = bf16_engine.logits(ids)
    twin = moe_engine.load(device="cpu", dtype="bfloat16", progress=False, kernels=KernelConfig(linear="reference"))
    try:
        ref = twin.logits(ids)
    finally:
        twin.close()
    assert (fast - ref).abs().max().item() <= 0.05 * ref.std().item()
    assert (fast.argmax(-1) == ref.argmax(-1)).sum().item() >= 7


def test_float32_model_never_uses_the_kernel():
    from moe_engine.model.linear import Linear
    eng = moe_engine.load(device="cpu", dtype="float32", progress=False)
    try:
        dec = eng.decoder
        assert all(m.kernel is None for m in dec.modules() if isinstance(m, Linear))
        assert all(layer.moe.linear is None for layer in dec.layers if hasattr(layer, "moe"))
    finally:
        eng.close()
