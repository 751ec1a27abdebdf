"""moe_engine._ops: the C++ IO extension and its torch twin give the same bytes, the same errors and the
same checks. Every read is compared with plain open().read(); CUDA tests run only where a GPU is visible."""
from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import threading

import pytest
import torch

from moe_engine import _ops
from moe_engine.errors import ConfigError, ExpertReadError, MoeEngineError

needs_c = pytest.mark.skipif(not _ops.HAS_C_EXT, reason=f"moe_engine._C not loaded: {_ops.C_EXT_ERROR}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (backend, direct): the C++ reader with O_DIRECT, the C++ reader through the page cache, the torch twin
READERS = [pytest.param("c", True, marks=needs_c, id="c-direct"),
           pytest.param("c", False, marks=needs_c, id="c-buffered"),
           pytest.param("torch", False, id="torch")]
SMALL_CHUNK = 64 << 10            # bytes; small chunks make the grid cross many chunk boundaries cheaply
OFFSETS = [0, 1, 4095, 4096, 4097, 12345]
SIZES = [1, 4095, 4096, 4097, 100_003, (1 << 20) + 17]
DEST_OFFSETS = [0, 1, 4095]      # into a page-aligned dest: some (file, dest) offset pairs are congruent mod 4096


def _bytes(n: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two files: A spans several 4 MiB chunks and ends off a page boundary, B is small."""
    root = tmp_path_factory.mktemp("ops")
    paths = {"A": root / "a.bin", "B": root / "b.bin"}
    paths["A"].write_bytes(_bytes(9 * (1 << 20) + 123, 1))
    paths["B"].write_bytes(_bytes(50_000, 2))
    return {k: (str(p), p.read_bytes()) for k, p in paths.items()}


def _reader(backend, direct, **kw):
    return _ops.DirectReader(num_threads=3, direct=direct, backend=backend, **kw)


def _raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("backend,direct", READERS)
@pytest.mark.parametrize("size", SIZES)
def test_read_grid_matches_plain_read(files, backend, direct, size):
    path, data = files["A"]
    with _reader(backend, direct, chunk_bytes=SMALL_CHUNK) as reader:
        for offset in OFFSETS:
            for dest_offset in DEST_OFFSETS:
                dest = _ops.alloc_aligned(dest_offset + size + 5).fill_(7)
                reader.read([_ops.ReadRange(path, offset, size, dest, dest_offset)])
                got = _raw(dest)
                assert got[dest_offset:dest_offset + size] == data[offset:offset + size], (offset, dest_offset)
                assert got[:dest_offset] == b"\x07" * dest_offset and got[dest_offset + size:] == b"\x07" * 5
        assert reader.bytes_delivered == size * len(OFFSETS) * len(DEST_OFFSETS)
        assert reader.bytes_disk_read >= reader.bytes_delivered


@pytest.mark.parametrize("backend,direct", READERS)
def test_multi_range_two_files_default_chunks(files, backend, direct):
    """One request mixing both files, a range spanning the 4 MiB chunk boundaries, the file tails, a
    float32 destination at an odd byte offset, and an empty range."""
    (pa, da), (pb, db) = files["A"], files["B"]
    specs = [(pa, 4097, 5 * (1 << 20) + 3), (pb, 1, 49_999), (pa, len(da) - 777, 777), (pb, 0, 0),
             (pa, (4 << 20) - 1, 2), (pb, 4096, 8192)]
    dests = [torch.zeros((n + 11) // 4 + 1, dtype=torch.float32) for _, _, n in specs]
    ranges = [_ops.ReadRange(p, off, n, d, 3) for (p, off, n), d in zip(specs, dests)]
    with _reader(backend, direct) as reader:
        reader.read(ranges)
    for (p, off, n), d in zip(specs, dests):
        src = da if p == pa else db
        assert _raw(d)[3:3 + n] == src[off:off + n]


@pytest.mark.parametrize("backend,direct", READERS)
def test_many_concurrent_tickets(files, backend, direct):
    path, data = files["A"]
    g = torch.Generator().manual_seed(0)
    with _reader(backend, direct, chunk_bytes=SMALL_CHUNK) as reader:
        jobs = []
        for _ in range(40):
            off = int(torch.randint(0, len(data) - 300_000, (1,), generator=g))
            n = int(torch.randint(1, 300_000, (1,), generator=g))
            dest = torch.empty(n, dtype=torch.uint8)
            jobs.append((off, n, dest, reader.submit([_ops.ReadRange(path, off, n, dest)])))
        for off, n, dest, ticket in reversed(jobs):
            ticket.wait()
            assert ticket.done() and _raw(dest) == data[off:off + n]


@needs_c
@pytest.mark.parametrize("offset,nbytes,dest_offset", [(8192, 3 << 20, 0), (4097, 3 << 20, 1), (4095, 10_000, 4095),
                                                       (4097, 10_000, 2)])
def test_direct_read_padding(files, offset, nbytes, dest_offset):
    """The direct reader reads whole 4096-byte blocks: exactly the aligned superset of the range, whether
    it lands in place (dest congruent with the file offset) or through the bounce buffer."""
    path, data = files["A"]
    dest = _ops.alloc_aligned(nbytes + dest_offset, backend="c")
    with _reader("c", True) as reader:
        reader.read([_ops.ReadRange(path, offset, nbytes, dest, dest_offset)])
        superset = -(-(offset + nbytes) // 4096) * 4096 - offset // 4096 * 4096
        assert reader.bytes_delivered == nbytes and reader.bytes_disk_read == superset
    assert _raw(dest)[dest_offset:] == data[offset:offset + nbytes]


@needs_c
def test_direct_open_refused_falls_back_per_file(files):
    """/dev/zero refuses O_DIRECT (EINVAL): that file is read buffered and recorded, the others stay direct."""
    path, data = files["B"]
    zeros, other = torch.full((10_000,), 255, dtype=torch.uint8), torch.empty(100, dtype=torch.uint8)
    with _reader("c", True) as reader:
        reader.read([_ops.ReadRange("/dev/zero", 12345, 10_000, zeros), _ops.ReadRange(path, 5, 100, other)])
        assert reader.buffered_paths == ["/dev/zero"]
    assert not zeros.any() and _raw(other) == data[5:105]


@pytest.mark.parametrize("backend,direct", READERS)
def test_tmpfs_file(backend, direct):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    data = _bytes(20_000, 3)
    path = f"/dev/shm/moe_ops_test_{os.getpid()}_{backend}_{direct}"
    try:
        with open(path, "wb") as f:
            f.write(data)
        dest = torch.empty(10_001, dtype=torch.uint8)
        with _reader(backend, direct) as reader:
            reader.read([_ops.ReadRange(path, 4095, 10_001, dest)])
        assert _raw(dest) == data[4095:14096]
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------------------- read errors

@pytest.mark.parametrize("backend,direct", READERS)
# (file offset, offset into a page-aligned dest, bytes got): read in place, through the bounce buffer, and in
# place after a partial head block; the file ends 100 bytes past 1 MiB
@pytest.mark.parametrize("offset,dest_offset,got", [(1 << 20, 0, 100), (1 << 20, 7, 100), ((1 << 20) - 5, 4091, 105)])
def test_truncated_file_raises_naming_file_and_short_count(tmp_path, backend, direct, offset, dest_offset, got):
    path = tmp_path / "shrinks.bin"
    path.write_bytes(_bytes(3 << 20, 4))
    with _reader(backend, direct) as reader:
        reader.read([_ops.ReadRange(path, 0, 4096, torch.empty(4096, dtype=torch.uint8))])   # opens the file
        os.truncate(path, (1 << 20) + 100)
        dest = _ops.alloc_aligned(dest_offset + 10_000)
        ticket = reader.submit([_ops.ReadRange(path, offset, 10_000, dest, dest_offset)])
        with pytest.raises(ExpertReadError) as info:
            ticket.wait()
        msg = str(info.value)
        for needle in (str(path), f"offset {offset}", "expected 10000 bytes", f"got {got} ", "1048676 bytes"):
            assert needle in msg, (needle, msg)
        with pytest.raises(ExpertReadError):    # a failed ticket stays failed
            ticket.wait()
        assert ticket.done()
        dest = torch.empty(50, dtype=torch.uint8)   # the reader is still usable
        reader.read([_ops.ReadRange(path, 50, 50, dest)])
        assert _raw(dest) == path.read_bytes()[50:100]


@pytest.mark.parametrize("backend,direct", READERS)
def test_missing_file_raises(tmp_path, backend, direct):
    path = tmp_path / "nope.bin"
    with _reader(backend, direct) as reader, pytest.raises(ExpertReadError) as info:
        reader.read([_ops.ReadRange(path, 7, 10, torch.empty(10, dtype=torch.uint8))])
    msg = str(info.value)
    assert str(path) in msg and "No such file or directory" in msg and "offset 7" in msg, msg


@pytest.mark.parametrize("backend,direct", READERS)
def test_unwaited_ticket_is_collected_safely(files, backend, direct):
    path, data = files["A"]
    with _reader(backend, direct) as reader:
        reader.submit([_ops.ReadRange(path, 1, 2 << 20, torch.empty(2 << 20, dtype=torch.uint8))])   # dropped at once
        dest = torch.empty(3, dtype=torch.uint8)
        reader.read([_ops.ReadRange(path, 1, 3, dest)])
        assert _raw(dest) == data[1:4]


def test_bad_ranges_are_refused_on_construction(files):
    path, _ = files["B"]
    u8 = torch.empty(100, dtype=torch.uint8)
    cases = [({"file_offset": -1}, "file_offset"), ({"nbytes": -5}, "nbytes"), ({"dest_offset": -1}, "dest_offset"),
             ({"nbytes": 98, "dest_offset": 3}, "too small"), ({"dest": torch.empty(10, 20)[:, ::2]}, "contiguous"),
             ({"dest": torch.empty(100, device="meta")}, "CPU"), ({"dest": bytearray(100)}, "torch.Tensor")]
    for kw, needle in cases:
        args = {"path": path, "file_offset": 0, "nbytes": 10, "dest": u8, **kw}
        with pytest.raises(ConfigError, match=needle):
            _ops.ReadRange(**args)


def test_bad_reader_arguments():
    for kw, needle in [({"num_threads": 0}, "num_threads"), ({"backend": "cuda"}, "backend"),
                       ({"chunk_bytes": 5000}, "chunk_bytes")]:
        with pytest.raises(ConfigError, match=needle):
            _ops.DirectReader(**kw)
    reader = _ops.DirectReader(backend="torch")
    with pytest.raises(ConfigError, match="ReadRange"):
        reader.submit([("a", 0, 1)])
    reader.close()
    reader.close()
    with pytest.raises(MoeEngineError, match="closed"):
        reader.submit([])


@needs_c
def test_c_reader_checks_raw_ranges_at_its_boundary():
    reader = _ops._C.DirectReader(1)
    buf = torch.empty(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="destination has 10 bytes"):
        reader.submit([("x", 0, 11, buf.data_ptr(), 10)])
    with pytest.raises(ValueError, match="null destination"):
        reader.submit([("x", 0, 1, 0, 10)])
    with pytest.raises(IndexError, match="unknown ticket"):
        reader.wait(12345)
    reader.close()


# ----------------------------------------------------------------------------------------- buffers

@pytest.mark.parametrize("backend", [pytest.param("c", marks=needs_c), "torch"])
@pytest.mark.parametrize("alignment", [1, 8, 512, 4096, 65536, 1 << 21])
def test_alloc_aligned(backend, alignment):
    for nbytes in (1, 4097, 3 << 20):
        t = _ops.alloc_aligned(nbytes, alignment, backend=backend)
        assert t.dtype == torch.uint8 and t.shape == (nbytes,) and t.device.type == "cpu"
        assert t.data_ptr() % alignment == 0
    t.fill_(9)            # the allocation's owner was never bound: only the tensor keeps it alive

    assert int(t[-1]) == 9 and int(t.sum()) == 9 * nbytes


def test_alloc_aligned_checks_arguments():
    assert _ops.alloc_aligned(0).numel() == 0
    for args, needle in [((100, 3000), "power of two"), ((-1,), "nbytes"), ((10, 0), "alignment")]:
        with pytest.raises(ConfigError, match=needle):
            _ops.alloc_aligned(*args)
    if not torch.cuda.is_available():
        with pytest.raises(MoeEngineError, match="pinned=False"):
            _ops.alloc_aligned(100, pinned=True)


def test_buffer_pool_blocks_when_exhausted_and_hands_back():
    pool = _ops.BufferPool(3, 10_000, alignment=4096)
    assert pool.nbytes_total == 3 * 12288
    taken = [pool.acquire() for _ in range(3)]
    assert sorted(i for i, _ in taken) == [0, 1, 2]
    for _, buf in taken:
        assert buf.numel() == 10_000 and buf.data_ptr() % 4096 == 0
    starts = sorted(buf.data_ptr() for _, buf in taken)
    assert all(b - a >= 10_000 for a, b in itertools.pairwise(starts))    # no overlap
    with pytest.raises(TimeoutError, match="3 buffers of 10000 bytes"):
        pool.acquire(timeout=0.05)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
    waiter.start()
    waiter.join(0.05)
    assert waiter.is_alive() and not got              # blocked while all are taken
    pool.release(taken[1][0])
    waiter.join(5)
    assert got and got[0][0] == taken[1][0]
    with pytest.raises(ConfigError, match="not a buffer index"):
        pool.release(7)
    pool.release(taken[0][0])
    with pytest.raises(ConfigError, match="currently acquired"):
        pool.release(taken[0][0])
    assert pool.available == 1


# ----------------------------------------------------------------------------------------- facade

def test_no_ext_env_forces_the_fallback(monkeypatch, caplog, files):
    """MOE_ENGINE_NO_EXT=1, read at import, makes a fresh copy of the facade use the torch twin; it says so once."""
    monkeypatch.setenv("MOE_ENGINE_NO_EXT", "1")
    spec = importlib.util.spec_from_file_location("moe_engine._ops_no_ext", _ops.__file__)
    ops = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, ops)   # dataclasses look their module up while it runs
    spec.loader.exec_module(ops)
    assert not ops.HAS_C_EXT and "MOE_ENGINE_NO_EXT" in ops.C_EXT_ERROR and ops.HAS_CUDA_OPS is False
    with pytest.raises(MoeEngineError, match="MOE_ENGINE_NO_EXT"):
        ops.DirectReader(backend="c")
    path, data = files["B"]
    with caplog.at_level("INFO", logger=spec.name):
        reader, other = ops.DirectReader(), ops.DirectReader()
    assert reader.backend == other.backend == "torch"
    assert [r.getMessage() for r in caplog.records].count(
        "moe-engine IO runs on the slower torch fallback: disabled by MOE_ENGINE_NO_EXT=1") == 1
    other.close()
    dest = torch.empty(99, dtype=torch.uint8)
    reader.read([ops.ReadRange(path, 4097, 99, dest)])
    reader.close()
    assert _raw(dest) == data[4097:4196]


def test_flags_are_bools():
    assert isinstance(_ops.HAS_C_EXT, bool) and isinstance(_ops.HAS_CUDA_OPS, bool)
    assert (_ops.C_EXT_ERROR is None) == _ops.HAS_C_EXT


def test_copy_h2d_async_checks_devices_at_the_boundary():
    cpu = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="src must be on the CPU and dst on CUDA"):
        _ops.copy_h2d_async(cpu, cpu.clone(), None)


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "torch",
                                     pytest.param("c", marks=pytest.mark.skipif(not _ops.HAS_CUDA_OPS,
                                                                                reason="no CUDA ops in _C"))])
def test_copy_h2d_async_copies_on_the_given_stream(backend):
    n = (8 << 20) + 3
    src = _ops.alloc_aligned(n, pinned=True)
    src.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8))
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    event = _ops.copy_h2d_async(src, dst, stream, backend=backend)
    assert isinstance(event, torch.cuda.Event)
    torch.cuda.current_stream().wait_event(event)
    assert torch.equal(dst.cpu(), src)
    event.synchronize()
    assert event.query()


@needs_cuda
def test_copy_h2d_async_refuses_bad_pairs():
    pinned = _ops.alloc_aligned(64, pinned=True)
    stream = torch.cuda.Stream()
    cases = [(torch.zeros(64, dtype=torch.uint8), torch.empty(64, dtype=torch.uint8, device="cuda"), stream, "pinned"),
             (pinned, torch.empty(63, dtype=torch.uint8, device="cuda"), stream, "64 bytes, dst has 63"),
             (pinned, torch.empty(64, dtype=torch.uint8, device="cuda"), None, "torch.cuda.Stream")]
    for src, dst, s, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            _ops.copy_h2d_async(src, dst, s)


@needs_cuda
@pytest.mark.skipif(not _ops.HAS_CUDA_OPS, reason="no CUDA ops in _C")
def test_c_event_orders_a_stream_after_the_copy():
    n = 1 << 20
    src = _ops.alloc_aligned(n, pinned=True, backend="c")
    src.fill_(5)
    dst = torch.zeros(n, dtype=torch.uint8, device="cuda")
    copy_stream, compute = torch.cuda.Stream(), torch.cuda.Stream()
    event = _ops._C.CudaEvent()
    _ops._C.copy_h2d_async(src.data_ptr(), dst.data_ptr(), n, copy_stream.cuda_stream)
    event.record(copy_stream.cuda_stream)
    event.wait_on(compute.cuda_stream)
    with torch.cuda.stream(compute):
        total = dst.sum()
    compute.synchronize()
    assert event.query() and int(total) == 5 * n
