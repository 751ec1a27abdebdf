"""Lazy, tensor-by-tensor reader for Hugging Face safetensors checkpoints.

Layout of one safetensors file (little endian throughout):

    [8 bytes: header length N][N bytes: JSON header][data section]

The header maps each tensor name to {dtype, shape, data_offsets: [begin, end]}, offsets relative to the data
section, which starts at byte 8 + N; the optional "__metadata__" entry holds strings only.

What this module does: find the shard files of a model directory (model.safetensors, or the shards listed in
model.safetensors.index.json, or else every *.safetensors file), parse every header once, validate it against the
file size, and record each tensor's absolute byte range (TensorInfo) so an offloading layer can read exactly those
bytes later. Reads use os.preadv into memory the caller or this module owns; no mmap, no safetensors package.

Every header is checked against its file: each tensor's byte range lies inside the data section and no two
tensors share a byte (the safetensors library rejects overlaps too); a shard index may only name files inside
the model directory. Each file's identity (inode, size, mtime, ctime) as parsed is recorded in `watch`
(checkpoint/watch.py); reads check it afterwards, so a file changed under a running engine fails loudly.

What it does not do: map names to model modules, convert dtypes, or read tensor data at construction time.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from moe_engine.errors import CheckpointError, ConfigError

from .watch import FileWatch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_REDOWNLOAD = "the file looks truncated or corrupt; re-download it"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _st_name, _torch_name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _torch_name):
        _DTYPES[_st_name] = getattr(torch, _torch_name)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: [offset, offset + nbytes) of file `path`."""

    name: str
    path: str  # absolute file path
    offset: int  # absolute byte offset of the data within the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _corrupt(path: Path, what: str, tensor: str | None = None) -> CheckpointError:
    where = f"{path}" if tensor is None else f"{path}, tensor {tensor!r}"
    return CheckpointError(f"{where}: {what}; {_REDOWNLOAD}")


def _read_header(path: Path) -> tuple[dict, int, os.stat_result]:
    """Return (header JSON, data section start, the file's stat), reading only the header bytes."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if size < 8:
            raise _corrupt(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _corrupt(path, f"header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is a JSON {type(header).__name__}, expected an object")
    return header, 8 + n, st


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    """Validate one header entry against the file and turn it into absolute byte ranges."""
    try:
        dtype_str, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise _corrupt(path, "entry needs 'dtype', 'shape' and 'data_offsets' [begin, end]", name) from None
    if dtype_str not in _DTYPES:
        raise _corrupt(path, f"unknown dtype {dtype_str!r} (known: {', '.join(_DTYPES)})", name)
    ints = [*shape, begin, end] if isinstance(shape, list) else None
    if ints is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise _corrupt(path, f"shape {shape!r} / data_offsets {[begin, end]} must be non-negative integers", name)
    dtype, numel = _DTYPES[dtype_str], math.prod(shape)
    if end - begin != numel * dtype.itemsize:
        raise _corrupt(path, f"data_offsets {[begin, end]} hold {end - begin} bytes but {dtype_str}{shape} "
                             f"needs {numel * dtype.itemsize}", name)
    if data_start + end > size:
        raise _corrupt(path, f"data ends at byte {data_start + end} but the file has {size} bytes", name)
    return TensorInfo(name, str(path), data_start + begin, end - begin, dtype, tuple(shape))


def _parse_file(path: Path, watch: FileWatch) -> dict[str, TensorInfo]:
    header, data_start, st = _read_header(path)
    infos = {name: _tensor_info(path, name, entry, data_start, st.st_size)
             for name, entry in header.items() if name != "__metadata__"}
    _check_disjoint(path, infos)
    watch.record(path, st)
    return infos


def _check_disjoint(path: Path, infos: dict[str, TensorInfo]) -> None:
    """No two tensors of a file share a byte (a crafted header could make one tensor's bytes another's)."""
    spans = sorted((i.offset, i.offset + i.nbytes, i.name) for i in infos.values() if i.nbytes)
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise _corrupt(path, f"tensors {name!r} and {other!r} share bytes {begin}..{end} of the data section "
                                 f"(overlapping data_offsets)")


def _load_weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: cannot read the shard index ({type(e).__name__}: {e}); expected JSON "
                              f"with a 'weight_map' object; re-download it or remove it if the model is one file") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    for name, shard in weight_map.items():
        path = PurePosixPath(shard)
        if not shard or path.is_absolute() or ".." in path.parts:
            raise CheckpointError(f"{index_path}: tensor {name!r} points to {shard!r}, outside the model directory; "
                                  f"a shard index may only name files inside {index_path.parent} (fix the index "
                                  f"or re-download the checkpoint)")
    return weight_map


def _find_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """Return (shard paths, weight_map or None, index path or None). Same preference order as transformers."""
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE], None, None
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = _load_weight_map(index_path)
        shards = [model_dir / s for s in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"shard {shard.name} listed in {index_path} is missing from {model_dir}; "
                                      f"the download is incomplete, fetch the missing shard")
        return shards, weight_map, index_path
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"{model_dir}: no safetensors weights (looked for {SINGLE_FILE}, {INDEX_FILE} and "
                              f"*.safetensors); point --model at a Hugging Face checkpoint directory")
    return files, None, None


def _from_weight_map(model_dir: Path, per_file: dict[Path, dict[str, TensorInfo]], weight_map: dict[str, str],
                     index_path: Path) -> dict[str, TensorInfo]:
    """The index is authoritative: each name comes from the shard it points to."""
    infos = {}
    for name, shard in weight_map.items():
        found = per_file[model_dir / shard].get(name)
        if found is None:
            raise CheckpointError(f"{index_path} says tensor {name!r} is in {shard}, but that file's header has no "
                                  f"such tensor; the index and shards are from different downloads, re-download")
        infos[name] = found
    return infos


def _merge_files(model_dir: Path, per_file: dict[Path, dict[str, TensorInfo]]) -> dict[str, TensorInfo]:
    """No index: every tensor of every file, each name in exactly one file."""
    infos: dict[str, TensorInfo] = {}
    for path, file_infos in per_file.items():
        for name, info in file_infos.items():
            if name in infos:
                raise CheckpointError(f"tensor {name!r} appears in both {infos[name].path} and {path}; "
                                      f"remove the stray .safetensors file from {model_dir}")
            infos[name] = info
    return infos


class SafetensorsIndex:
    """Every tensor of a checkpoint directory, located by byte range; data is read only on demand."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir).absolute()
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model directory {self.model_dir} does not exist or is not a directory")
        shards, weight_map, index_path = _find_files(self.model_dir)
        self._files = [str(p) for p in shards]
        self.watch = FileWatch("checkpoint")     # each file as parsed; reads check it (watch.py)
        per_file = {p: _parse_file(p, self.watch) for p in shards}
        self._infos = (_from_weight_map(self.model_dir, per_file, weight_map, index_path) if weight_map is not None
                       else _merge_files(self.model_dir, per_file))
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def names(self) -> list[str]:
        return sorted(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.model_dir} "
                                  f"({len(self._infos)} tensors); check the name mapping for this architecture") from None

    def total_bytes(self, names=None) -> int:
        return sum(self.info(n).nbytes for n in (self._infos if names is None else names))

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.read_info(self.info(name), out)

    def read_info(self, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
        """The bytes of `info` (a tensor of this index, or a contiguous slice of one) as a tensor of its dtype/shape."""
        if out is None:
            raw = torch.empty(info.nbytes, dtype=torch.uint8)  # [nbytes], owns its memory
            self._read_exact(info, memoryview(raw.numpy()))
            return raw.view(info.dtype).reshape(info.shape)
        self._check_out(info, out)
        self._read_exact(info, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out

    def read_into_bytes(self, name: str, buf: memoryview | bytearray) -> None:
        info = self.info(name)
        view = memoryview(buf).cast("B")
        if view.readonly or len(view) != info.nbytes:
            raise ConfigError(f"buffer for {name!r} must be writable and exactly {info.nbytes} bytes, "
                              f"got {len(view)} bytes (readonly={view.readonly})")
        self._read_exact(info, view)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> SafetensorsIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _check_out(info: TensorInfo, out: torch.Tensor) -> None:
        numel = math.prod(info.shape)
        if out.dtype != info.dtype or out.numel() != numel or not out.is_contiguous() or out.device.type != "cpu":
            raise ConfigError(f"out for {info.name!r} must be a contiguous CPU {info.dtype} tensor of {numel} "
                              f"elements (shape {info.shape}), got {out.dtype} {tuple(out.shape)} on {out.device} "
                              f"(contiguous={out.is_contiguous()})")

    def _fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def _read_exact(self, info: TensorInfo, view: memoryview) -> None:
        """Fill `view` (len == info.nbytes) from [offset, offset + nbytes), looping on short reads; then check that
        the file is still the one indexed (a change before or during the read fails here, not in the outputs)."""
        fd, done = self._fd(info.path), 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got == 0:
                self.watch.check((info.path,), f"tensor {info.name!r}")
                raise _corrupt(Path(info.path), f"end of file after {done} of {info.nbytes} bytes "
                                                f"(file truncated since it was indexed)", info.name)
            done += got
        self.watch.check((info.path,), f"tensor {info.name!r}")
