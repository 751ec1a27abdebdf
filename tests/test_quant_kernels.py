"""moe_engine._ops.qlinear: the fused C++ dequantize+matmul (every SIMD path this CPU runs) against its torch
twin quant.kernels.qlinear_reference over a grid of bits, group sizes, shapes, token counts and x dtypes;
thread-count independence; the checks at the Python and C++ boundaries; and a whole quantized expert
through quant_expert_ffn. C-path tests are skipped without the extension; twin tests always run."""
from __future__ import annotations

import functools

import pytest
import torch

from moe_engine import _ops
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
            _assert_matches(_ops.qlinear(x, m, backend="c", num_threads=2, isa=isa), qlinear_reference(x, m), dtype)


@needs_c
@pytest.mark.parametrize("bits", BITS)
def test_bf16_c_is_as_accurate_as_twin(bits):
    """In bf16 the twin also rounds W to bf16; the C path keeps W exact, so it is at least as close to float64."""
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
    _assert_matches(one, qlinear_reference(x, m), torch.float32)


@needs_c
def test_c_handles_leading_dims_strides_and_empty_x():
    m = _qmatrix(64, 128, 4, 32)
    x = _x(6, 128, torch.float32).reshape(2, 3, 128)
    _assert_matches(_ops.qlinear(x, m, backend="c"), qlinear_reference(x, m), torch.float32)
    wide = _x(5, 256, torch.float32)[:, ::2]                                  # non-contiguous [5, 128]
    _assert_matches(_ops.qlinear(wide, m, backend="c"), qlinear_reference(wide, m), torch.float32)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_backend_is_the_twin(dtype):
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
