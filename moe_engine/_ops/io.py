"""Bytes between files, host buffers and the device: aligned buffers, direct-IO reads, async host-to-device copies.

    alloc_aligned / BufferPool   host buffers at aligned addresses, optionally page-locked
    ReadRange / DirectReader     threaded reads of file byte ranges into CPU tensors -> ReadTicket
    copy_h2d_async               a pinned-host -> device copy on a given stream, returning its event

Each with its torch twin behind `backend` (see the package docstring); moe_engine._C comes from the package.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import threading
from dataclasses import dataclass

import torch

from ..errors import ConfigError, ExpertReadError, MoeEngineError
from . import HAS_C_EXT, _C, _check_size, _has_cuda_ops, _resolve

log = logging.getLogger(__name__)

IO_ALIGNMENT = 4096          # bytes; O_DIRECT offsets, sizes and bounce buffers are multiples of it
CHUNK_BYTES = 4 << 20        # bytes; ranges are cut at multiples of this file offset, one chunk per task


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
