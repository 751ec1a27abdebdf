"""moe_engine._ops.qlinear: the fused C++ dequantize+matmul (every SIMD path this CPU runs) against its torch
twin qmatrix.qlinear_cpu_reference (the integer path of 4/8-bit codes: int8 activations per block of 32; the
float path of 2/3-bit codes) over a grid of bits, group sizes, shapes, token counts and x dtypes; thread-count
independence; the checks at the Python and C++ boundaries; a whole quantized expert through quant_expert_ffn;
and the decode ops' fused quantized experts (moe_experts_quant) against their twin. C-path tests are skipped
without the extension; twin tests always run."""
from __future__ import annotations

import functools

import pytest
import torch

from moe_engine import _ops
from moe_engine._ops.decode import moe_experts_quant, moe_experts_quant_reference
from moe_engine._ops.qmatrix import (ACT_BLOCK, qlinear_cpu_reference, qlinear_int8_reference,
                                     quantize_activations)
from moe_engine.errors import ConfigError
from moe_engine.quant.format import QMatrix, QuantLayout, pack_planes, quantize_matrix
from moe_engine.quant.kernels import qlinear_reference, quant_expert_ffn

needs_c = pytest.mark.skipif(not _ops.HAS_C_EXT, reason=f"moe_engine._C not loaded: {_ops.C_EXT_ERROR}")

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
SHAPES = ((64, 128), (256, 192), (96, 384), (40, 96))   # (R, C); (40, 96): C is an odd multiple of 32
TOKENS = (1, 2, 5, 17)                                   # 17: two full blocks of 8 and a single token
ISAS = _ops.qlinear_isas() or ["auto"]                   # "auto" only marks the skipped case without _C
GRID = [(b, g, rc) for b in BITS for g in GROUPS for rc in SHAPES if rc[1] % g == 0]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}        # rtol, and atol as a fraction of max |reference|


@functools.cache
def _qmatrix(rows: int, cols: int, bits: int, group: int, seed: int = 0) -> QMatrix:
    """A random W [rows, cols] quantized by the format's own quantizer (codes, scales and zeros all vary)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g))   # rows of different scale
    codes, scales, zeros = quantize_matrix(w, bits, group)
    return QMatrix(rows, cols, bits, group, tuple(pack_planes(codes, bits)), scales, zeros)


@functools.cache
def _random_qmatrix(rows: int, cols: int, bits: int, group: int, seed: int = 0) -> QMatrix:
    """Uniformly random codes, scales and zeros: cheap at sizes where quantizing would be slow."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (rows, cols), dtype=torch.uint8, generator=g)
    scales = (torch.rand(rows, cols // group, generator=g) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 2 ** bits, (rows, cols // group), generator=g).half()
    return QMatrix(rows, cols, bits, group, tuple(pack_planes(codes, bits)), scales, zeros)


def _x(n: int, cols: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,group,shape", GRID, ids=[f"b{b}-g{g}-{r}x{c}" for b, g, (r, c) in GRID])
def test_c_matches_twin_over_grid(isa, bits, group, shape):
    m = _qmatrix(*shape, bits, group)
    for dtype in (torch.float32, torch.bfloat16):
        for n in TOKENS:
            x = _x(n, shape[1], dtype)
            _assert_matches(_ops.qlinear(x, m, backend="c", num_threads=2, isa=isa), qlinear_cpu_reference(x, m),
                            dtype)


@needs_c
@pytest.mark.parametrize("bits", (2, 3))
def test_bf16_c_is_as_accurate_as_twin(bits):
    """In bf16 the float twin also rounds W to bf16; the C path keeps W exact, so it is at least as close to
    float64."""
    m, x = _qmatrix(128, 256, bits, 64), _x(8, 256, torch.bfloat16)
    exact = qlinear_reference(x.double(), m)
    c_err = (_ops.qlinear(x, m, backend="c").double() - exact).abs().mean()
    twin_err = (qlinear_reference(x, m).double() - exact).abs().mean()
    assert c_err <= twin_err


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", BITS)
def test_thread_count_does_not_change_results(isa, bits):
    # big enough that 3 threads get work (~9x the per-thread minimum); 1030 rows: the last chunk ends mid-block
    m, x = _random_qmatrix(1030, 2048, bits, 64), _x(17, 2048, torch.float32)
    one = _ops.qlinear(x, m, backend="c", num_threads=1, isa=isa)
    assert torch.equal(one, _ops.qlinear(x, m, backend="c", num_threads=3, isa=isa))
    _assert_matches(one, qlinear_cpu_reference(x, m), torch.float32)


@needs_c
def test_c_handles_leading_dims_strides_and_empty_x():
    m = _qmatrix(64, 128, 4, 32)
    x = _x(6, 128, torch.float32).reshape(2, 3, 128)
    _assert_matches(_ops.qlinear(x, m, backend="c"), qlinear_cpu_reference(x, m), torch.float32)
    wide = _x(5, 256, torch.float32)[:, ::2]                                  # non-contiguous [5, 128]
    _assert_matches(_ops.qlinear(wide, m, backend="c"), qlinear_cpu_reference(wide, m), torch.float32)
    assert _ops.qlinear(torch.empty(0, 128), m, backend="c").shape == (0, 64)


@pytest.mark.parametrize("bits", BITS)
def test_expert_ffn_fast_matches_reference(bits):
    """A whole quantized expert (QuantLayout(192, 128)) through the fast kernel and the reference."""
    layout = QuantLayout(192, 128, bits, 64)
    g = torch.Generator().manual_seed(bits)
    gate, up, down = (torch.randn(s, generator=g) * 0.1 for s in ((128, 192), (128, 192), (192, 128)))
    buf = layout.quantize(gate, up, down)
    for dtype in (torch.float32, torch.bfloat16):
        x = _x(5, 192, dtype)
        ref = quant_expert_ffn(x, buf, layout, kernel="reference")
        _assert_matches(quant_expert_ffn(x, buf, layout, kernel="fast"), ref, dtype)


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", (4, 8))
def test_integer_path_extremes(isa, bits):
    """Codes at 0 and 2^bits - 1 against activations at +-127 (every product at its largest: vpmaddubsw would
    saturate on 8-bit codes taken unsigned), an all-zero block (scale 0) and a lone outlier."""
    rows, cols = 24, 256
    codes = torch.where(torch.arange(rows * cols).reshape(rows, cols) % 3 == 0, 0, 2 ** bits - 1).to(torch.uint8)
    m = QMatrix(rows, cols, bits, 64, tuple(pack_planes(codes, bits)), torch.full((rows, cols // 64), 0.01).half(),
                torch.full((rows, cols // 64), float(2 ** (bits - 1))).half())
    x = torch.sign(_x(3, cols, torch.float32)) * 3.0
    x[1, :ACT_BLOCK] = 0.0
    x[2, 5] = 1e4
    x = x.bfloat16()                                                     # 16-bit activations: the integer path
    _assert_matches(_ops.qlinear(x, m, backend="c", isa=isa), qlinear_int8_reference(x, m), torch.bfloat16)


def test_activation_quantization_follows_its_definition():
    x = _x(3, 96, torch.float32) * torch.tensor([1.0, 1e-3, 50.0])[:, None]
    x[0, :32] = 0.0
    q, d = quantize_activations(x)
    for t in range(3):
        for b in range(3):
            blk = x[t, b * 32:(b + 1) * 32]
            scale = blk.abs().max() / 127
            assert d[t, b] == scale
            want = torch.zeros(32) if scale == 0 else torch.round(blk * (1 / scale))
            assert torch.equal(q[t, b], want)
    assert q.abs().max() <= 127


@pytest.mark.parametrize("bits", (4, 8))
def test_integer_twin_is_close_to_exact(bits):
    """The integer path's only extra error is the int8 activations' (~0.5% of the output's scale here)."""
    m, x = _qmatrix(96, 384, bits, 64), _x(4, 384, torch.float32)
    truth = x.double() @ _dense64(m).T
    y = qlinear_int8_reference(x, m).double()
    assert ((y - truth).norm() / truth.norm()).item() < 0.01
    qa, d = quantize_activations(x)
    xq = (qa * d[..., None]).reshape(4, 384).double()                       # the activations it multiplies
    torch.testing.assert_close(y, xq @ _dense64(m).T, rtol=1e-4, atol=1e-4 * truth.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_backend_is_the_twin(dtype):
    m4, x4 = _qmatrix(96, 384, 4, 64), _x(2, 384, dtype)
    twin = qlinear_int8_reference if dtype == torch.bfloat16 else qlinear_reference   # int8 acts for 16-bit x
    assert torch.equal(_ops.qlinear(x4, m4, backend="torch"), twin(x4, m4))
    m, x = _qmatrix(96, 384, 3, 128), _x(3, 384, dtype)
    y = _ops.qlinear(x, m, backend="torch")
    assert torch.equal(y, qlinear_reference(x, m)) and y.dtype == dtype
    truth = x.double() @ _dense64(m).T                                        # [3, 96]
    tol = TOL.get(dtype, 1e-4)
    torch.testing.assert_close(y.double(), truth, rtol=tol, atol=tol * truth.abs().max().item())


def _dense64(m: QMatrix) -> torch.Tensor:
    """W [R, C] in float64 straight from the definition, code by code (the twin's own twin)."""
    codes = torch.zeros(m.rows, m.cols, dtype=torch.int64)
    shift = 0
    for plane, w in zip(m.planes, {8: (8,), 4: (4,), 3: (2, 1), 2: (2,)}[m.bits]):
        for c in range(m.cols):
            byte = plane[:, c * w // 8].long()
            codes[:, c] |= ((byte >> (c * w % 8)) & ((1 << w) - 1)) << shift
        shift += w
    g = torch.arange(m.cols) // m.group
    return (codes.double() - m.zeros.double()[:, g]) * m.scales.double()[:, g]


# ----------------------------------------------------------------------------------------- bad inputs

def _with(m: QMatrix, **changes) -> QMatrix:
    fields = {k: getattr(m, k) for k in ("rows", "cols", "bits", "group", "planes", "scales", "zeros")}
    return QMatrix(**{**fields, **changes})


BACKENDS = [pytest.param("c", marks=needs_c), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_naming_the_problem(backend):
    m = _qmatrix(64, 128, 3, 64)
    x = _x(2, 128, torch.float32)
    cases = [
        (_x(2, 96, torch.float32), m, "last dimension must be 128"),
        (x.long(), m, "floating point"),
        (torch.tensor(1.0), m, "last dimension"),
        (x, _with(m, bits=5), "not a valid format"),
        (x, _with(m, group=48), "not a valid format"),
        (x, _with(m, planes=m.planes[:1]), "2 bit plane"),
        (x, _with(m, scales=m.scales.float()), "scales must be a CPU torch.float16"),
        (x, _with(m, zeros=m.zeros[:, :1]), "zeros must be a CPU torch.float16 tensor of shape (64, 2)"),
        (x, _with(m, planes=(m.planes[0][:, :8], m.planes[1])), "plane 0 (2-bit)"),
    ]
    for xi, mi, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _ops.qlinear(xi, mi, backend=backend)
    with pytest.raises(ConfigError, match="num_threads"):
        _ops.qlinear(x, m, backend=backend, num_threads=0)
    with pytest.raises(ConfigError, match="isa must be one of"):
        _ops.qlinear(x, m, backend=backend, isa="neon")
    with pytest.raises(ConfigError, match="backend must be one of"):
        _ops.qlinear(x, m, backend="cuda")


@needs_c
def test_c_boundary_checks_raw_arguments():
    """The extension validates on its own (pointers and sizes as Python ints), before touching memory."""
    m, x, y = _qmatrix(64, 128, 3, 64), _x(2, 128, torch.float32), torch.empty(2, 64)
    ok = dict(x_ptr=x.data_ptr(), n=2, plane_ptrs=[p.data_ptr() for p in m.planes], scales_ptr=m.scales.data_ptr(),
              zeros_ptr=m.zeros.data_ptr(), rows=64, cols=128, bits=3, group=64, y_ptr=y.data_ptr(), num_threads=1)
    _ops._C.qlinear_f32(**ok)
    _assert_matches(y, qlinear_reference(x, m), torch.float32)
    for bad, message in [(dict(bits=5), "bits must be 2, 3, 4 or 8"), (dict(group=48), "group must be 32, 64 or 128"),
                         (dict(cols=100), "multiple of the group size"), (dict(n=-1), "must be >= 0"),
                         (dict(plane_ptrs=ok["plane_ptrs"][:1]), "stored in 2 bit plane"),
                         (dict(plane_ptrs=[0, ok["plane_ptrs"][1]]), "null plane pointer"),
                         (dict(plane_ptrs=[]), "1 or 2 bit-plane pointers"),
                         (dict(x_ptr=0), "non-null"), (dict(scales_ptr=0), "non-null"),
                         (dict(num_threads=0), "num_threads"), (dict(isa="sse"), "not available on this CPU")]:
        with pytest.raises(ValueError, match=message):
            _ops._C.qlinear_f32(**{**ok, **bad})


# ----------------------------------------------------------------------------------------- fused quantized experts

def _layer(widths, d=128, inter=192, seed=0):
    """One quantized expert per width (QuantLayout buffers) and their (W1, W2) views."""
    g = torch.Generator().manual_seed(seed)
    mats, bufs = [], []
    for bits in widths:
        lay = QuantLayout(d, inter, bits, 64)
        buf = lay.quantize(*(torch.randn(s, generator=g) * 0.1 for s in ((inter, d), (inter, d), (d, inter))))
        bufs.append((lay, buf))
        mats.append((lay.w1.views(buf), lay.w2.views(buf)))
    return mats, bufs


def _routing(n, k, num_experts, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g)
    return ids, weights / weights.sum(-1, keepdim=True)


@needs_c
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", (1, 2, 5, 8, 19))        # 19: a short prompt (two blocks of 8 tokens and 3)
def test_moe_experts_quant_matches_twin_over_mixed_widths(isa, n):
    mats, _ = _layer((8, 4, 3, 2, 4))
    ids, weights = _routing(n, 2, 5)
    x = _x(n, 128, torch.bfloat16)
    experts = [4, 0, 2, 1, 3]                                             # any accumulation order
    order = [mats[e] for e in experts]
    ref = moe_experts_quant_reference(x, weights, ids, experts, order, 192)
    out = moe_experts_quant(x, weights, ids, experts, order, 192, backend="c", isa=isa)
    assert out.dtype == torch.bfloat16
    _assert_matches(out, ref, torch.bfloat16)
    acc = torch.zeros(n, 128)
    for e in experts:                                                     # one call per expert, into acc
        moe_experts_quant(x, weights, ids, [e], [mats[e]], 192, acc, backend="c", isa=isa)
    torch.testing.assert_close(acc, moe_experts_quant_reference(x, weights, ids, experts, order, 192,
                                                                torch.zeros(n, 128)), rtol=2e-2, atol=2e-2)


def test_moe_experts_quant_twin_is_the_expert_loop():
    """The twin is quant_expert_ffn (the per-expert loop's reference kernel) expert by expert."""
    mats, bufs = _layer((4, 8))
    ids, weights = _routing(3, 2, 2)
    x = _x(3, 128, torch.bfloat16)
    want = torch.zeros(3, 128)
    for e, (lay, buf) in enumerate(bufs):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        y = quant_expert_ffn(x[tok], buf, lay, kernel="reference")
        want.index_add_(0, tok, y.float() * weights[tok, slot, None])
    got = moe_experts_quant_reference(x, weights, ids, [0, 1], mats, 192, torch.zeros(3, 128))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_moe_experts_quant_bad_arguments():
    mats, _ = _layer((4,))
    ids, weights = _routing(2, 1, 1)
    x = _x(2, 128, torch.bfloat16)
    with pytest.raises(ConfigError, match="not among those passed"):
        moe_experts_quant(x, weights, ids + 1, [0], mats, 192, backend="torch")
    with pytest.raises(ConfigError, match="one \\(W1, W2\\) pair per expert"):
        moe_experts_quant(x, weights, ids, [0, 1], mats, 192)
    with pytest.raises(ConfigError, match="acc must be"):
        moe_experts_quant(x, weights, ids, [0], mats, 192, torch.zeros(2, 64))
    if _ops.HAS_C_EXT:
        with pytest.raises(ValueError, match="not among the experts passed"):
            moe_experts_quant(x, weights, ids + 1, [0], mats, 192, backend="c")
        with pytest.raises(ConfigError, match="backend='c' takes bf16"):
            moe_experts_quant(x.float(), weights, ids, [0], mats, 192, backend="c")
