"""Matmuls on the CPU through moe_engine._C, each with its torch twin (see the package docstring).

    qlinear       x [N, C] @ W^T for a quantized W (qmatrix.QMatrix), fused dequantize + matmul
    bf16_linear   x [N, C] @ W^T (+ b) for a bf16 W at decode sizes (N <= BF16_N_MAX)
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import HAS_C_EXT, _C, _check_size, _resolve
from .qmatrix import GROUP_SIZES, PLANES, int8_acts, qlinear_cpu_reference


# ----------------------------------------------------------------------------------------- quantized matmul

QLINEAR_ISAS = ("auto", "avx512vnni", "avx512", "avxvnni", "avx2", "scalar")


def qlinear_isas() -> list[str]:
    """The SIMD paths the C qlinear can take on this CPU, fastest first ([] without the extension)."""
    return list(_C.qlinear_isas()) if HAS_C_EXT else []


def _check_qtensor(name: str, t, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == shape and t.is_cpu):
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConfigError(f"qlinear: {name} must be a CPU {dtype} tensor of shape {shape}, got {got}; "
                          "build the matrix with moe_engine.quant.format (QMatrixLayout.views)")


def _check_qlinear(x: torch.Tensor, m) -> None:
    """Raise ConfigError naming the problem when x [..., C] cannot multiply the QMatrix m [R, C] on the CPU."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConfigError(f"qlinear: x must be a floating point tensor, got "
                          f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_cpu:
        raise ConfigError(f"qlinear: x is on {x.device}, but this op runs on CPU tensors "
                          "(moe_engine.quant.kernels.qlinear sends CUDA tensors to the GPU kernel)")
    if x.dim() == 0 or x.shape[-1] != m.cols:
        raise ConfigError(f"qlinear: x has shape {tuple(x.shape)}, but the quantized matrix is [{m.rows}, {m.cols}]; "
                          f"x's last dimension must be {m.cols}")
    if m.bits not in PLANES or m.group not in GROUP_SIZES or m.cols % m.group:
        raise ConfigError(f"qlinear: {m.bits}-bit codes in groups of {m.group} over {m.cols} columns are not a "
                          f"valid format; bits must be one of {tuple(PLANES)} and the group one of {GROUP_SIZES}, "
                          "dividing cols")
    widths = PLANES[m.bits]
    if len(m.planes) != len(widths):
        raise ConfigError(f"qlinear: {m.bits}-bit codes are stored in {len(widths)} bit plane(s) of widths "
                          f"{widths}, got {len(m.planes)}")
    for i, (plane, w) in enumerate(zip(m.planes, widths)):
        _check_qtensor(f"plane {i} ({w}-bit)", plane, torch.uint8, (m.rows, m.cols * w // 8))
    groups = (m.rows, m.cols // m.group)
    _check_qtensor("scales", m.scales, torch.float16, groups)
    _check_qtensor("zeros", m.zeros, torch.float16, groups)


def qlinear(x: torch.Tensor, m, *, backend: str = "auto", num_threads: int | None = None,
            isa: str = "auto") -> torch.Tensor:
    """x [..., C] (any float dtype, CPU) @ W^T for a quantized W [R, C] (a qmatrix.QMatrix) -> [..., R] in x.dtype.

    "c": moe_engine._C's fused kernel; x is converted to contiguous float32, accumulation is float32, the
    GIL is released and rows are split over num_threads threads (default torch.get_num_threads(); small
    matrices use fewer). isa picks the kernel's SIMD path ("auto" = the fastest this CPU runs; see
    qlinear_isas(); a test and benchmark hook). 4/8-bit codes with bf16/fp16 x take the kernel's integer path
    (x quantized to int8 per block of 32 columns, exact integer dot products, see csrc/qmatmul.h); float32 x
    and 2/3-bit codes the float path.
    "torch": qmatrix.qlinear_cpu_reference, the twin of either path (the float twin dequantizes W to x.dtype
    and calls F.linear, so low-precision x also rounds W there, not here).
    """
    _check_qlinear(x, m)
    if isa not in QLINEAR_ISAS:
        raise ConfigError(f"qlinear: isa must be one of {QLINEAR_ISAS}, got {isa!r}")
    threads = torch.get_num_threads() if num_threads is None else _check_size("num_threads", num_threads, 1)
    if _resolve(backend) == "torch":
        return qlinear_cpu_reference(x, m)
    xf = x if x.dim() == 2 else x.reshape(-1, m.cols)                      # [N, C]
    xf = (xf if xf.dtype == torch.float32 else xf.float()).contiguous()
    out = torch.empty(xf.shape[0], m.rows, dtype=torch.float32)            # [N, R]
    planes = [p.contiguous() for p in m.planes]                            # views of an expert buffer: no copy
    scales, zeros = m.scales.contiguous(), m.zeros.contiguous()
    _C.qlinear_f32(xf.data_ptr(), xf.shape[0], [p.data_ptr() for p in planes], scales.data_ptr(), zeros.data_ptr(),
                   m.rows, m.cols, m.bits, m.group, out.data_ptr(), threads, isa, int8_acts(x, m))
    if x.dim() != 2:
        out = out.reshape(*x.shape[:-1], m.rows)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


# ----------------------------------------------------------------------------------------- bf16 matmul

BF16_N_MAX = 8               # rows of x (tokens) up to which bf16_linear uses the C kernel; torch's GEMM above
                             # (measured, bench_gemv.py: at 12-16 tokens torch is faster on the expert shapes)
BF16_ISAS = ("auto", "avx512bf16", "avx512", "avx2", "scalar")


def bf16_linear_isas() -> list[str]:
    """The SIMD paths the C bf16_linear can take on this CPU, fastest first ([] without the extension)."""
    return list(_C.bf16_linear_isas()) if HAS_C_EXT else []


def bf16_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow twin of bf16_linear: F.linear in float32, rounded once to x.dtype (round to nearest even)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def _bf16_c_problem(x, weight, bias) -> str | None:
    """Why the C kernel cannot take (x, weight, bias) as they are; None when it can."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
        return (f"weight must be a contiguous 2-D bfloat16 tensor, got {weight.dtype} {tuple(weight.shape)} "
                f"with stride {weight.stride()}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        return f"x must be bfloat16 or float32, got {x.dtype}"
    if not (x.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu)):
        return f"x, weight and bias must be CPU tensors, got x on {x.device} and weight on {weight.device}"
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != weight.shape[:1]
                             or not bias.is_contiguous()):
        return (f"bias must be a contiguous bfloat16 tensor of shape ({weight.shape[0]},), got {bias.dtype} "
                f"{tuple(bias.shape)}")
    n = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    if n > BF16_N_MAX:
        return f"x has {n} rows; the kernel takes at most BF16_N_MAX={BF16_N_MAX} (decode); larger use torch's GEMM"
    return None


def _bf16_fits(x, weight, bias) -> bool:
    """The common case, cheaply: CPU, bf16 contiguous W (and bias), x bf16/float32 with <= BF16_N_MAX rows."""
    return (weight.dtype == torch.bfloat16 and x.dtype in _BF16_X_DTYPES and x.is_cpu and weight.is_cpu
            and weight.dim() == 2 and x.dim() > 0 and x.shape[-1] == weight.shape[1] and weight.is_contiguous()
            and x.numel() <= BF16_N_MAX * weight.shape[1]
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_cpu and bias.is_contiguous()
                                  and bias.shape == weight.shape[:1])))


_BF16_X_DTYPES = (torch.bfloat16, torch.float32)


def _bf16_linear_c(x, weight, bias, threads: int, isa: str) -> torch.Tensor:
    rows, cols = weight.shape
    xf = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, cols).contiguous()   # [N, C]
    out = torch.empty(xf.shape[0], rows, dtype=x.dtype)                                 # [N, R]
    _C.bf16_linear(xf.data_ptr(), x.dtype == torch.float32, xf.shape[0], weight.data_ptr(),
                   0 if bias is None else bias.data_ptr(), rows, cols, out.data_ptr(), threads, isa)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], rows)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto",
                num_threads: int | None = None, isa: str = "auto") -> torch.Tensor:
    """x [..., C] @ W^T (+ bias) -> [..., R] in x.dtype, for a bf16 weight [R, C] (an nn.Linear's forward).

    "c": moe_engine._C's GEMV: CPU tensors, W and bias bf16 and contiguous, x bf16 or float32 with at most
    BF16_N_MAX rows (leading dims flattened); float32 accumulation, one rounding to x.dtype at the end; the GIL
    is released and rows are split over num_threads threads (default torch.get_num_threads()); isa picks the
    SIMD path (a test and benchmark hook; see bf16_linear_isas()). "torch": bf16_linear_reference. "auto": "c"
    when the extension loaded and the inputs fit it, else F.linear as torch computes it (prefill, GPU tensors,
    other dtypes); bf16_linear_twin is "auto" with the reference in place of "c".
    """
    if backend == "auto" and HAS_C_EXT and isa == "auto" and num_threads is None and isinstance(x, torch.Tensor) \
            and isinstance(weight, torch.Tensor) and _bf16_fits(x, weight, bias):   # decode: the hot path
        return _bf16_linear_c(x, weight, bias, torch.get_num_threads(), "auto")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or not isinstance(weight, torch.Tensor) \
            or weight.dim() != 2 or x.shape[-1] != weight.shape[-1]:
        raise ConfigError(f"bf16_linear: x [..., C] and weight [R, C] must agree on C, got x "
                          f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__} and weight "
                          f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if isa not in BF16_ISAS:
        raise ConfigError(f"bf16_linear: isa must be one of {BF16_ISAS}, got {isa!r}")
    problem = _bf16_c_problem(x, weight, bias)
    if backend == "auto" and (problem is not None or not HAS_C_EXT):
        return F.linear(x, weight, bias)
    if _resolve(backend) == "torch":
        return bf16_linear_reference(x, weight, bias)
    if problem is not None:
        raise ConfigError(f"bf16_linear: backend='c' cannot take these inputs: {problem}")
    threads = torch.get_num_threads() if num_threads is None else _check_size("num_threads", num_threads, 1)
    return _bf16_linear_c(x, weight, bias, threads, isa)


def bf16_linear_twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """bf16_linear's "auto" with its torch twin where the C kernel would run: the "reference" linear kernel
    (runtime/config.py KernelConfig.linear; MOE_ENGINE_LINEAR_KERNEL=reference at build)."""
    if _bf16_fits(x, weight, bias):
        return bf16_linear_reference(x, weight, bias)
    return F.linear(x, weight, bias)
