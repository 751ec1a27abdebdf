"""The one facade over the optional compiled extension moe_engine._C (csrc/), with torch twins.

    alloc_aligned / BufferPool   (io.py) host buffers at aligned addresses, optionally page-locked
    ReadRange / DirectReader     (io.py) threaded reads of file byte ranges into CPU tensors -> ReadTicket
    copy_h2d_async               (io.py) a pinned-host -> device copy on a given stream, returning its event
    qlinear  (matmul.py)         x [N, C] @ W^T for a quantized W (qmatrix.QMatrix) on the CPU, fused:
                                 codes decoded in registers, never a dense W (twin: qmatrix.qlinear_reference)
    bf16_linear  (matmul.py)     x [N, C] @ W^T (+ b) for a bf16 W on the CPU at decode sizes (N <= BF16_N_MAX)
                                 (twin: bf16_linear_reference, F.linear in float32 rounded once)
    decode.*  (decode.py)        fused one-token ops of a bf16 model on the CPU (norm, routing, rotary, attention,
                                 routed experts), each with its `*_reference` twin; DecodeOps bundles them

Every op takes `backend="auto" | "c" | "torch"`: "c" is moe_engine._C (O_DIRECT reads, in place or
through aligned bounce buffers, GIL released), "torch" is the readable pure torch/Python twin with the same signature
and results (buffered os.preadv in a thread pool; for qlinear a dense dequantized W and F.linear), "auto" picks
"c" when the extension loaded. Setting MOE_ENGINE_NO_EXT=1 before import forces the twin everywhere (a test hook).
This package moves bytes and computes kernels only: it does not decide what to read or when, and it never imports
anything above it in the package (qmatrix.py holds the quantized format its kernels read). Only this file imports
moe_engine._C; the submodules take it from here.
"""
from __future__ import annotations

import functools
import logging
import os
import threading

import torch

from ..errors import ConfigError, MoeEngineError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "c", "torch")


def _load_ext():
    """(module, None) when moe_engine._C imports, else (None, why not)."""
    if os.environ.get("MOE_ENGINE_NO_EXT") == "1":
        return None, "disabled by MOE_ENGINE_NO_EXT=1"
    try:
        from .. import _C
    except ImportError as e:
        return None, (f"moe_engine._C did not import ({e}); rebuild it with a C++17 compiler and pybind11: "
                      "pip install -v -e .")
    return _C, None


_C, C_EXT_ERROR = _load_ext()
HAS_C_EXT: bool = _C is not None
_warned = threading.Event()


@functools.cache
def _has_cuda_ops() -> bool:
    """The extension has its CUDA parts and torch and the CUDA driver both see a device."""
    return HAS_C_EXT and _C.has_cuda() and torch.cuda.is_available() and _C.cuda_device_count() > 0


def __getattr__(name: str):
    # HAS_CUDA_OPS is computed on first access, so importing this module never touches the GPU.
    if name == "HAS_CUDA_OPS":
        return _has_cuda_ops()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(backend: str, c_available: bool | None = None) -> str:
    """'c' or 'torch' for a requested backend; 'c' when asked but missing is an error."""
    c_available = HAS_C_EXT if c_available is None else c_available
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "c" and not c_available:
        why = C_EXT_ERROR or "moe_engine._C was built without CUDA, or no CUDA device is visible"
        raise MoeEngineError(f"backend='c' is not available for this op: {why}")
    if backend == "auto":
        if c_available:
            return "c"
        if not HAS_C_EXT and not _warned.is_set():
            _warned.set()
            level = logging.INFO if C_EXT_ERROR.startswith("disabled") else logging.WARNING
            log.log(level, "moe-engine IO runs on the slower torch fallback: %s", C_EXT_ERROR)
        return "torch"
    return backend


def _check_size(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


from .io import (CHUNK_BYTES, IO_ALIGNMENT, BufferPool, DirectReader, ReadRange, ReadTicket,  # noqa: E402,F401
                 alloc_aligned, copy_h2d_async)
from .matmul import (BF16_ISAS, BF16_N_MAX, QLINEAR_ISAS, bf16_linear, bf16_linear_isas,  # noqa: E402,F401
                     bf16_linear_reference, bf16_linear_twin, qlinear, qlinear_isas)
from . import decode  # noqa: E402,F401
