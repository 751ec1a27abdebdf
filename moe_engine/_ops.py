"""The one facade over the optional compiled extension moe_engine._C (csrc/), with torch twins.

    alloc_aligned / BufferPool   host buffers at aligned addresses, optionally page-locked
    ReadRange / DirectReader     threaded reads of file byte ranges into CPU tensors -> ReadTicket
    copy_h2d_async               a pinned-host -> device copy on a given stream, returning its event
    qlinear                      x [N, C] @ W^T for a quantized W (quant.format.QMatrix) on the CPU, fused:
                                 codes decoded in registers, never a dense W (twin: quant.kernels.qlinear_reference)
    bf16_linear                  x [N, C] @ W^T (+ b) for a bf16 W on the CPU at decode sizes (N <= BF16_N_MAX)
                                 (twin: bf16_linear_reference, F.linear in float32 rounded once)

Every op takes `backend="auto" | "c" | "torch"`: "c" is moe_engine._C (O_DIRECT reads, in place or
through aligned bounce buffers, GIL released), "torch" is the readable pure torch/Python twin with the same signature
and results (buffered os.preadv in a thread pool; for qlinear a dense dequantized W and F.linear), "auto" picks
"c" when the extension loaded. Setting MOE_ENGINE_NO_EXT=1 before import forces the twin everywhere (a test hook).
This module moves bytes and multiplies by quantized matrices only: it does not decide what to read or when, and it
never imports anything above it in the package.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import ConfigError, ExpertReadError, MoeEngineError

log = logging.getLogger(__name__)

IO_ALIGNMENT = 4096          # bytes; O_DIRECT offsets, sizes and bounce buffers are multiples of it
CHUNK_BYTES = 4 << 20        # bytes; ranges are cut at multiples of this file offset, one chunk per task
BACKENDS = ("auto", "c", "torch")


def _load_ext():
    """(module, None) when moe_engine._C imports, else (None, why not)."""
    if os.environ.get("MOE_ENGINE_NO_EXT") == "1":
        return None, "disabled by MOE_ENGINE_NO_EXT=1"
    try:
        from . import _C
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


# ----------------------------------------------------------------------------------------- buffers

def alloc_aligned(nbytes: int, alignment: int = IO_ALIGNMENT, pinned: bool = False, *,
                  backend: str = "auto") -> torch.Tensor:
    """A 1-D uint8 CPU tensor of nbytes whose data_ptr() is a multiple of alignment (uninitialized).

    pinned=True page-locks it: with cudaHostAlloc from the extension when it has CUDA and a device,
    else with torch's pin_memory when torch sees CUDA, else raises MoeEngineError. nbytes=0 gives an
    empty tensor.
    """
    _check_size("nbytes", nbytes)
    _check_size("alignment", alignment, 1)
    if alignment & (alignment - 1):
        raise ConfigError(f"alignment must be a power of two, got {alignment}")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if pinned and not torch.cuda.is_available() and not _has_cuda_ops():
        raise MoeEngineError("pinned=True needs a CUDA device to page-lock memory for, and none is visible "
                             "(torch.cuda.is_available() is False); pass pinned=False on CPU-only machines")
    use_c = _resolve(backend, _has_cuda_ops() if pinned else HAS_C_EXT) == "c"
    if use_c:
        return torch.frombuffer(_C.AlignedBuffer(nbytes, alignment, pinned), dtype=torch.uint8)
    raw = torch.empty(nbytes + alignment - 1, dtype=torch.uint8, pin_memory=pinned)   # the slice keeps it alive
    start = -raw.data_ptr() % alignment
    return raw[start:start + nbytes]


class BufferPool:
    """`count` equal aligned buffers of `nbytes` carved from one allocation; thread-safe.

    acquire() hands out a free buffer (blocking while all are taken), release() returns it. The pool
    does not zero buffers nor check that a released buffer is no longer in use by a pending read.
    """

    def __init__(self, count: int, nbytes: int, alignment: int = IO_ALIGNMENT, pinned: bool = False, *,
                 backend: str = "auto"):
        self.count = _check_size("count", count, 1)
        self.nbytes = _check_size("nbytes", nbytes, 1)
        self.stride = -(-nbytes // alignment) * alignment            # bytes between buffer starts
        self._slab = alloc_aligned(count * self.stride, alignment, pinned, backend=backend)
        self._buffers = [self._slab[i * self.stride:i * self.stride + nbytes] for i in range(count)]
        self._free = list(range(count - 1, -1, -1))                   # LIFO: reuse warm buffers first
        self._cond = threading.Condition()

    @property
    def nbytes_total(self) -> int:
        return self._slab.numel()

    @property
    def available(self) -> int:
        with self._cond:
            return len(self._free)

    def acquire(self, timeout: float | None = None) -> tuple[int, torch.Tensor]:
        """(index, buffer [nbytes] uint8); raises TimeoutError if none frees up within timeout seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise TimeoutError(f"BufferPool: all {self.count} buffers of {self.nbytes} bytes are still in "
                                   f"use after {timeout}s; release() one or make the pool larger")
            index = self._free.pop()
        return index, self._buffers[index]

    def release(self, index: int) -> None:
        with self._cond:
            if not (isinstance(index, int) and 0 <= index < self.count) or index in self._free:
                raise ConfigError(f"BufferPool.release: {index!r} is not a buffer index currently acquired "
                                  f"(valid 0..{self.count - 1})")
            self._free.append(index)
            self._cond.notify()


# ----------------------------------------------------------------------------------------- reads

@dataclass(frozen=True, eq=False)
class ReadRange:
    """nbytes of file `path` from file_offset, to land at byte dest_offset of `dest`.

    dest: a contiguous CPU tensor of any dtype, viewed as raw bytes. Checked on construction.
    """
    path: str
    file_offset: int
    nbytes: int
    dest: torch.Tensor
    dest_offset: int = 0

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        _check_size("ReadRange.file_offset", self.file_offset)
        _check_size("ReadRange.nbytes", self.nbytes)
        _check_size("ReadRange.dest_offset", self.dest_offset)
        d = self.dest
        if not isinstance(d, torch.Tensor):
            raise ConfigError(f"ReadRange.dest must be a torch.Tensor, got {type(d).__name__}")
        if d.device.type != "cpu":
            raise ConfigError(f"ReadRange.dest must be a CPU tensor, got one on {d.device}")
        if not d.is_contiguous():
            raise ConfigError(f"ReadRange.dest must be contiguous (shape {tuple(d.shape)}, stride {d.stride()})")
        if self.dest_offset + self.nbytes > d.nbytes:
            raise ConfigError(f"ReadRange.dest has {d.nbytes} bytes, too small for {self.nbytes} bytes at "
                              f"dest_offset {self.dest_offset} (reading '{self.path}' at {self.file_offset})")

    def as_tuple(self) -> tuple[str, int, int, int, int]:
        """(path, file_offset, nbytes, dest_ptr, dest_nbytes_available) for moe_engine._C."""
        return (self.path, self.file_offset, self.nbytes, self.dest.data_ptr() + self.dest_offset,
                self.dest.nbytes - self.dest_offset)


class ReadTicket:
    """One submitted request. Keeps its destination tensors alive until waited (also on garbage
    collection, which waits, so the reader never writes into freed memory)."""

    def __init__(self, wait_fn, done_fn, keepalive: list):
        self._wait_fn, self._done_fn, self._keepalive = wait_fn, done_fn, keepalive
        self._waited = False
        self._error: ExpertReadError | None = None

    def wait(self) -> None:
        """Blocks until every byte landed; raises ExpertReadError (file, offset, expected, got) if any failed."""
        if not self._waited:
            try:
                self._wait_fn()
            except ExpertReadError as e:
                self._error = e
            finally:
                self._waited, self._keepalive = True, None
        if self._error is not None:
            raise self._error

    def done(self) -> bool:
        return self._waited or self._done_fn()

    def __del__(self):
        if not getattr(self, "_waited", True):
            try:
                self.wait()
            except ExpertReadError:
                log.debug("a ReadTicket that was never waited failed", exc_info=True)


class _TorchReader:
    """The slow twin of _C.DirectReader: a thread pool doing buffered os.preadv straight into dest.

    Same chunking and the same error wording; reads go through the page cache (no O_DIRECT), so
    bytes_disk_read counts no alignment padding.
    """

    def __init__(self, num_threads: int, chunk_bytes: int):
        self._pool = cf.ThreadPoolExecutor(num_threads, thread_name_prefix="moe-io")
        self._chunk = chunk_bytes
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._counts = [0, 0]   # bytes read, bytes delivered
        self._closed = False

    def submit(self, ranges: list[ReadRange]) -> ReadTicket:
        futures = []
        with self._lock:
            if self._closed:
                raise MoeEngineError("DirectReader.submit: the reader is closed")
            for r in ranges:
                dest = memoryview(r.dest.detach().reshape(-1).view(torch.uint8).numpy())   # [dest.nbytes] bytes
                pos, end = r.file_offset, r.file_offset + r.nbytes
                while pos < end:
                    stop = min(end, pos - pos % self._chunk + self._chunk)
                    at = r.dest_offset + pos - r.file_offset
                    futures.append(self._pool.submit(self._read_chunk, r.path, pos, dest[at:at + stop - pos]))
                    pos = stop
        return ReadTicket(functools.partial(_wait_futures, futures), lambda: all(f.done() for f in futures),
                          [r.dest for r in ranges])

    def _fd(self, path: str, offset: int, nbytes: int) -> int:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise ExpertReadError(f"cannot open '{path}' to read {nbytes} bytes at offset {offset}: "
                                          f"{os.strerror(e.errno)}") from None
            return self._fds[path]

    def _read_chunk(self, path: str, offset: int, dest: memoryview) -> None:
        fd, got = self._fd(path, offset, len(dest)), 0
        try:
            while got < len(dest):
                n = os.preadv(fd, [dest[got:]], offset + got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            raise ExpertReadError(f"read error on '{path}' at offset {offset}: expected {len(dest)} bytes, "
                                  f"got {got}: {os.strerror(e.errno)}") from None
        finally:
            with self._lock:
                self._counts[0] += got
        if got < len(dest):
            raise ExpertReadError(f"short read from '{path}' at offset {offset}: expected {len(dest)} bytes, got "
                                  f"{got} (the file is {os.fstat(fd).st_size} bytes; was it truncated or replaced?)")
        with self._lock:
            self._counts[1] += got

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return self._counts[0], self._counts[1]

    def buffered_paths(self) -> list[str]:
        with self._lock:
            return list(self._fds)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)   # finish queued reads: their destinations are still referenced
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _wait_futures(futures: list[cf.Future]) -> None:
    cf.wait(futures)   # all of them, so no read is still writing when an error is raised
    for f in futures:
        if f.exception() is not None:
            raise f.exception()


def _wait_c(impl, ticket: int) -> None:
    try:
        impl.wait(ticket)
    except _C.ReadError as e:
        raise ExpertReadError(str(e)) from None


class DirectReader:
    """Reads file byte ranges into CPU tensors with `num_threads` threads; submit() returns at once.

    direct=True (C backend) uses O_DIRECT, bypassing the page cache, and falls back per file to a
    normal descriptor where the filesystem refuses it (listed in buffered_paths). Direct reads land in
    place, without a copy, when the destination address and the file offset agree modulo 4096 (place
    dest so that dest_ptr - file_offset is a multiple of 4096); otherwise they pass through a bounce
    buffer. Files stay open until close(); a file replaced under the same path is not noticed.
    """

    def __init__(self, num_threads: int = 4, direct: bool = True, backend: str = "auto", *,
                 chunk_bytes: int = CHUNK_BYTES):
        _check_size("num_threads", num_threads, 1)
        if _check_size("chunk_bytes", chunk_bytes, IO_ALIGNMENT) % IO_ALIGNMENT:
            raise ConfigError(f"chunk_bytes must be a multiple of {IO_ALIGNMENT}, got {chunk_bytes}")
        self.backend = _resolve(backend)
        self.direct = bool(direct) and self.backend == "c"
        if self.backend == "c":
            self._impl = _C.DirectReader(num_threads, self.direct, chunk_bytes)
        else:
            self._impl = _TorchReader(num_threads, chunk_bytes)
        self._closed = False

    def submit(self, ranges: list[ReadRange]) -> ReadTicket:
        """Queues the ranges and returns at once; keep writing nothing into their dest until waited."""
        ranges = list(ranges)
        for i, r in enumerate(ranges):
            if not isinstance(r, ReadRange):
                raise ConfigError(f"DirectReader.submit: item {i} is a {type(r).__name__}, expected ReadRange")
        if self._closed:
            raise MoeEngineError("DirectReader.submit: the reader is closed")
        if self.backend == "torch":
            return self._impl.submit(ranges)
        ticket = self._impl.submit([r.as_tuple() for r in ranges])
        return ReadTicket(functools.partial(_wait_c, self._impl, ticket), functools.partial(self._impl.done, ticket),
                          [r.dest for r in ranges])

    def read(self, ranges: list[ReadRange]) -> None:
        """submit() then wait()."""
        self.submit(ranges).wait()

    @property
    def bytes_disk_read(self) -> int:
        """Bytes the kernel returned, including the alignment padding of direct reads."""
        return self._impl.bytes_disk_read if self.backend == "c" else self._impl.stats()[0]

    @property
    def bytes_delivered(self) -> int:
        """Bytes of successfully completed chunks copied into destinations."""
        return self._impl.bytes_delivered if self.backend == "c" else self._impl.stats()[1]

    @property
    def buffered_paths(self) -> list[str]:
        """Files read through the page cache (all of them with the torch backend or direct=False)."""
        return self._impl.buffered_paths()

    def close(self) -> None:
        """Finishes queued reads, stops the threads, closes the files. Idempotent."""
        if not self._closed:
            self._closed = True
            self._impl.close()

    def __enter__(self):
        return self

    def __del__(self):
        if hasattr(self, "_impl"):
            self.close()

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- device copies

def _check_h2d(src: torch.Tensor, dst: torch.Tensor, stream) -> None:
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        raise ConfigError("copy_h2d_async: src and dst must be torch.Tensors")
    if src.device.type != "cpu" or dst.device.type != "cuda":
        raise ConfigError(f"copy_h2d_async: src must be on the CPU and dst on CUDA, got {src.device} -> {dst.device}")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ConfigError("copy_h2d_async: src and dst must be contiguous")
    if src.nbytes != dst.nbytes:
        raise ConfigError(f"copy_h2d_async: src has {src.nbytes} bytes, dst has {dst.nbytes}; they must match")
    if not src.is_pinned():
        raise ConfigError("copy_h2d_async: src is not pinned, so the copy would not be asynchronous; "
                          "allocate it with alloc_aligned(..., pinned=True)")
    if not isinstance(stream, torch.cuda.Stream):
        raise ConfigError(f"copy_h2d_async: stream must be a torch.cuda.Stream, got {type(stream).__name__}")
    if stream.device != dst.device:
        raise ConfigError(f"copy_h2d_async: stream is on {stream.device} but dst is on {dst.device}")


def copy_h2d_async(src: torch.Tensor, dst: torch.Tensor, stream, *, backend: str = "auto") -> torch.cuda.Event:
    """Queues a byte copy of pinned CPU `src` into CUDA `dst` on `stream`; returns an event recorded after it.

    Compute that needs dst waits on exactly that event (torch.cuda.current_stream().wait_event(ev)). The
    caller keeps src and dst alive until the event completes (dst.record_stream(stream) if dst was
    allocated on another stream). It does not synchronize anything.
    """
    _check_h2d(src, dst, stream)
    use_c = _resolve(backend, _has_cuda_ops()) == "c"
    with torch.cuda.device(dst.device):
        if use_c:
            _C.copy_h2d_async(src.data_ptr(), dst.data_ptr(), src.nbytes, stream.cuda_stream)
        else:
            with torch.cuda.stream(stream):
                dst.reshape(-1).view(torch.uint8).copy_(src.reshape(-1).view(torch.uint8), non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return event


# ----------------------------------------------------------------------------------------- quantized matmul

QLINEAR_ISAS = ("auto", "avx512", "avx2", "scalar")


def qlinear_isas() -> list[str]:
    """The SIMD paths the C qlinear can take on this CPU, fastest first ([] without the extension)."""
    return list(_C.qlinear_isas()) if HAS_C_EXT else []


@functools.cache
def _quant_format() -> tuple[dict, tuple]:
    """(PLANES, GROUP_SIZES) of quant.format, imported on first use: this module imports nothing above it at load."""
    from .quant.format import GROUP_SIZES, PLANES
    return PLANES, GROUP_SIZES


def _check_qtensor(name: str, t, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    if not (isinstance(t, torch.Tensor) and t.dtype == dtype and t.shape == shape and t.is_cpu):
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConfigError(f"qlinear: {name} must be a CPU {dtype} tensor of shape {shape}, got {got}; "
                          "build the matrix with moe_engine.quant.format (QMatrixLayout.views)")


def _check_qlinear(x: torch.Tensor, m) -> None:
    """Raise ConfigError naming the problem when x [..., C] cannot multiply the QMatrix m [R, C] on the CPU."""
    planes, group_sizes = _quant_format()
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ConfigError(f"qlinear: x must be a floating point tensor, got "
                          f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_cpu:
        raise ConfigError(f"qlinear: x is on {x.device}, but this op runs on CPU tensors "
                          "(moe_engine.quant.kernels.qlinear sends CUDA tensors to the GPU kernel)")
    if x.dim() == 0 or x.shape[-1] != m.cols:
        raise ConfigError(f"qlinear: x has shape {tuple(x.shape)}, but the quantized matrix is [{m.rows}, {m.cols}]; "
                          f"x's last dimension must be {m.cols}")
    if m.bits not in planes or m.group not in group_sizes or m.cols % m.group:
        raise ConfigError(f"qlinear: {m.bits}-bit codes in groups of {m.group} over {m.cols} columns are not a "
                          f"valid format; bits must be one of {tuple(planes)} and the group one of {group_sizes}, "
                          "dividing cols")
    widths = planes[m.bits]
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
    """x [..., C] (any float dtype, CPU) @ W^T for a quantized W [R, C] (a quant.format.QMatrix) -> [..., R] in x.dtype.

    "c": moe_engine._C's fused kernel; x is converted to contiguous float32, accumulation is float32, the
    GIL is released and rows are split over num_threads threads (default torch.get_num_threads(); small
    matrices use fewer). isa picks the kernel's SIMD path ("auto" = the fastest this CPU runs; see
    qlinear_isas(); a test and benchmark hook). "torch": quant.kernels.qlinear_reference, which
    dequantizes W to x.dtype and calls F.linear (so low-precision x also rounds W there, not here).
    """
    _check_qlinear(x, m)
    if isa not in QLINEAR_ISAS:
        raise ConfigError(f"qlinear: isa must be one of {QLINEAR_ISAS}, got {isa!r}")
    threads = torch.get_num_threads() if num_threads is None else _check_size("num_threads", num_threads, 1)
    if _resolve(backend) == "torch":
        from .quant.kernels import qlinear_reference   # lazily: quant.kernels imports this module
        return qlinear_reference(x, m)
    xf = x if x.dim() == 2 else x.reshape(-1, m.cols)                      # [N, C]
    xf = (xf if xf.dtype == torch.float32 else xf.float()).contiguous()
    out = torch.empty(xf.shape[0], m.rows, dtype=torch.float32)            # [N, R]
    planes = [p.contiguous() for p in m.planes]                            # views of an expert buffer: no copy
    scales, zeros = m.scales.contiguous(), m.zeros.contiguous()
    _C.qlinear_f32(xf.data_ptr(), xf.shape[0], [p.data_ptr() for p in planes], scales.data_ptr(), zeros.data_ptr(),
                   m.rows, m.cols, m.bits, m.group, out.data_ptr(), threads, isa)
    if x.dim() != 2:
        out = out.reshape(*x.shape[:-1], m.rows)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


# ----------------------------------------------------------------------------------------- bf16 matmul

BF16_N_MAX = 8               # rows of x (tokens) up to which bf16_linear uses the C kernel; torch's GEMM above
                             # (measured, bench_gemv.py: at 12-16 tokens torch is faster on the expert shapes)
BF16_ISAS = ("auto", "avx512bf16", "avx512", "avx2", "scalar")
LINEAR_KERNEL_ENV = "MOE_ENGINE_LINEAR_KERNEL"   # "reference": bf16_linear runs its twin everywhere (a test hook)


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
    other dtypes), and the reference everywhere when MOE_ENGINE_LINEAR_KERNEL=reference.
    """
    if backend == "auto" and HAS_C_EXT and isa == "auto" and num_threads is None and isinstance(x, torch.Tensor) \
            and isinstance(weight, torch.Tensor) and _bf16_fits(x, weight, bias):   # decode: the hot path
        if os.environ.get(LINEAR_KERNEL_ENV) == "reference":
            return bf16_linear_reference(x, weight, bias)
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
    if _resolve(backend) == "torch" or os.environ.get(LINEAR_KERNEL_ENV) == "reference":
        return bf16_linear_reference(x, weight, bias)
    if problem is not None:
        raise ConfigError(f"bf16_linear: backend='c' cannot take these inputs: {problem}")
    threads = torch.get_num_threads() if num_threads is None else _check_size("num_threads", num_threads, 1)
    return _bf16_linear_c(x, weight, bias, threads, isa)
