"""The quantized-expert cache: written once per (checkpoint contents, settings), then the disk tier.

    CACHE/quant/<key>/experts.bin     every quantized expert, each at a 4 KiB-aligned offset
    CACHE/quant/<key>/manifest.json   key, settings, model shape, per expert: bits, offset, bytes, crc32
    CACHE/quant/.tmp-<key8>-*/        an entry being built (its .lock held by the builder; removed at start
                                      once no process holds it: a build killed with kill -9)
    CACHE/digests.json                sha256 of each checkpoint file, remembered by (path, device, inode, size,
                                      mtime, ctime): bytes changed in place with size and mtime put back
                                      (`cp -p`, `rsync -a`) change the ctime (and `rsync -a` the inode), so
                                      they are hashed again, never looked up

CACHE is `--quant-cache`, else $MOE_ENGINE_CACHE, else ~/.cache/moe-engine. The key hashes the
format version, the sha256 of config.json and of every safetensors file, and the settings (and,
for mixed, the calibration text), so a changed checkpoint or setting gets a new entry. An entry
is built in a temporary directory and renamed into place when complete, so a crash never
leaves a half-written entry under its key. Opening an entry checks the manifest, the file size
and the crc32 of every expert; anything wrong (stale, truncated, flipped bytes) is reported
once and the entry is rebuilt, never used. An opened entry's experts.bin is watched like the
checkpoint (checkpoint/watch.py): changed under a running engine, its reads fail. A cache folder
that cannot be written (read-only, full disk) fails with one line naming the folder and the flag.

`QuantizedExperts` is what the expert caches read from in place of the checkpoint:
`expert_infos` gives each expert's byte range in experts.bin, so the direct-IO reader loads
quantized experts exactly as it loads checkpoint experts.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint.safetensors_index import TensorInfo
from ..checkpoint.watch import FileWatch
from ..config import format_size
from ..errors import ConfigError
from .format import QuantLayout

log = logging.getLogger("moe_engine")
FORMAT_VERSION = 1
ALIGN = 4096
HASH_CHUNK = 16 << 20
TMP_PREFIX = ".tmp-"
LOCK = ".lock"
UNLOCKED_TMP_AGE_S = 3600        # a temporary entry without a lock file (older builds) is stale after an hour
CACHE_FLAG = "--quant-cache DIR (or set MOE_ENGINE_CACHE)"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    root = cache_dir or os.environ.get("MOE_ENGINE_CACHE") or Path.home() / ".cache" / "moe-engine"
    return Path(root).expanduser()


def _stamp(st: os.stat_result) -> dict:
    """What a remembered hash is valid for: the same file (device, inode) unchanged (size, mtime, ctime)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "device": st.st_dev}


def file_sha256(path: Path, memo: dict, progress: bool) -> str:
    st = path.stat()
    key = str(path.resolve())
    known = memo.get(key)
    stamp = _stamp(st)
    if known and all(known.get(k) == v for k, v in stamp.items()):
        return known["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=st.st_size, desc=f"hashing {path.name}", unit="B", unit_scale=True,
                                     disable=not progress or st.st_size < (256 << 20), leave=False) as bar:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    memo[key] = {**stamp, "sha256": h.hexdigest()}
    return memo[key]["sha256"]


def checkpoint_digest(ckpt, root: Path, progress: bool = True) -> str:
    """sha256 over config.json and every safetensors file of the checkpoint (file hashes are remembered)."""
    memo_path = root / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    files = [ckpt.model_dir / "config.json"] + [Path(p) for p in ckpt.index.files]
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_sha256(p, memo, progress)}\n".encode())
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_path)
    except OSError as e:                       # a read-only cache still works; it just hashes again next time
        log.warning("could not remember checkpoint hashes in %s: %s", memo_path, e)
    return h.hexdigest()


def entry_key(digest: str, settings, calibration_digest: str | None, bits_table=None) -> str:
    blob = json.dumps({"version": FORMAT_VERSION, "checkpoint": digest, "settings": settings.key(),
                       "calibration": calibration_digest, "table": bits_table}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


class QuantizedExperts:
    """An opened, verified cache entry: what expert caches read experts from (duck-types Checkpoint's expert side)."""

    def __init__(self, entry: Path, ckpt, manifest: dict):
        self.entry, self.ckpt, self.manifest = entry, ckpt, manifest
        self.spec = ckpt.spec
        self.path = str(entry / "experts.bin")
        self.group_size = manifest["group_size"]
        d, i = self.spec.hidden_size, self.spec.moe.intermediate_size
        self.experts = {(r["layer"], r["expert"]): r for r in manifest["experts"]}
        self.bits = {m: [self.experts[(m, e)]["bits"] for e in range(self.spec.moe.num_experts)]
                     for m in self.spec.moe_layers}
        bias = self.spec.moe.expert_bias
        self._layouts = {b: QuantLayout(d, i, b, self.group_size, bias) for b in {r["bits"] for r in manifest["experts"]}}
        self.layout = self.layouts(self.spec.moe_layers[0])[0]
        self.max_expert_bytes = max(r["nbytes"] for r in manifest["experts"])
        self.dtype = torch.uint8
        self.watch = FileWatch("quantized-expert cache")          # experts.bin as verified at open
        self.watch.record(self.path, os.stat(self.path))

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def layouts(self, layer: int) -> list[QuantLayout]:
        return [self._layouts[b] for b in self.bits[layer]]

    def nbytes_of(self, layer: int, expert: int) -> int:
        return self.experts[(layer, expert)]["nbytes"]

    def expert_infos(self, layer: int, expert: int) -> tuple[TensorInfo]:
        r = self.experts[(layer, expert)]
        return (TensorInfo(f"layer{layer}.expert{expert}", self.path, r["offset"], r["nbytes"], torch.uint8,
                           (r["nbytes"],)),)

    def expert_nbytes(self) -> int:
        return self.max_expert_bytes

    def raw_is_packed(self, dtype: torch.dtype) -> bool:
        """Quantized experts are stored exactly as they are packed in memory."""
        return True

    def expert_is_packed(self, layer: int, expert: int, dtype: torch.dtype) -> bool:
        return True

    def check_unchanged(self, infos=(), reading: str = "") -> None:
        """Raise CheckpointError when experts.bin changed since the entry was opened (after reading from it)."""
        self.watch.check((self.path,), reading or ", ".join(i.name for i in infos))

    def read_expert(self, layer: int, expert: int, dtype: torch.dtype = torch.uint8,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        r = self.experts[(layer, expert)]
        if out is None:
            out = torch.empty(r["nbytes"], dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(r["offset"])
            got = f.readinto(memoryview(out.numpy()).cast("B"))
        self.check_unchanged(reading=f"expert {expert} of layer {layer}")
        if got != r["nbytes"]:
            raise ConfigError(f"{self.path}: expert {expert} of layer {layer} is truncated ({got} of "
                              f"{r['nbytes']} bytes); delete {self.entry} to rebuild it")
        return out

    @property
    def dense_expert_bytes(self) -> int:
        """Bytes of one expert unquantized, in the checkpoint dtype."""
        return self.ckpt.layout.nbytes(self.ckpt.dtype)

    def summary(self) -> dict:
        """The stats' "quant" section: setting, widths per expert, bytes per expert."""
        all_bits = [b for bits in self.bits.values() for b in bits]
        return {"name": self.name, "group_size": self.group_size, "mean_bits": sum(all_bits) / len(all_bits),
                "bits_per_expert": [self.bits[m] for m in self.spec.moe_layers],
                "expert_bytes": {str(b): lay.numel for b, lay in sorted(self._layouts.items())},
                "unquantized_expert_bytes": self.dense_expert_bytes, "cache_dir": str(self.entry)}

    def describe(self) -> list[str]:
        """Lines for the placement plan: widths per layer and bytes per expert."""
        dense = self.dense_expert_bytes
        sizes = sorted({lay.numel for lay in self._layouts.values()})
        lines = [f"  experts quantized {self.name}, group {self.group_size}: "
                 + ", ".join(f"{b}-bit {format_size(lay.numel)} ({dense / lay.numel:.2f}x smaller than "
                             f"{str(self.ckpt.dtype).removeprefix('torch.')})"
                             for b, lay in sorted(self._layouts.items()))
                 + f"; cache {self.entry}"]
        if len(sizes) > 1:
            for m in self.spec.moe_layers:
                bits = self.bits[m]
                lines.append(f"    layer {m} bits per expert: {' '.join(map(str, bits))} "
                             f"(mean {sum(bits) / len(bits):.2f})")
        return lines

    def close(self) -> None:
        """Nothing held open (reads open the file per call; the direct-IO reader has its own descriptors)."""


def verify_entry(entry: Path, key: str, ckpt) -> tuple[dict | None, str]:
    """(manifest, "") when the entry is complete and intact, else (None, why not)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except FileNotFoundError:
        return None, "no manifest"
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest ({e})"
    spec = ckpt.spec
    expect = {"version": FORMAT_VERSION, "key": key, "hidden_size": spec.hidden_size,
              "intermediate_size": spec.moe.intermediate_size, "num_experts": spec.moe.num_experts,
              "moe_layers": list(spec.moe_layers)}
    for k, v in expect.items():
        if manifest.get(k) != v:
            return None, f"manifest {k} is {manifest.get(k)!r}, expected {v!r}"
    path = entry / "experts.bin"
    if not path.is_file() or path.stat().st_size != manifest.get("file_bytes"):
        return None, f"experts.bin has {path.stat().st_size if path.is_file() else 'no'} bytes, expected " \
                     f"{manifest.get('file_bytes')}"
    with open(path, "rb") as f:
        for r in manifest["experts"]:
            f.seek(r["offset"])
            data = f.read(r["nbytes"])
            if len(data) != r["nbytes"] or zlib.crc32(data) != r["crc32"]:
                return None, f"expert {r['expert']} of layer {r['layer']} fails its checksum"
    return manifest, ""


def entry_bytes(ckpt, settings, bits: dict[int, list[int]]) -> int:
    """Bytes experts.bin of an entry will take (each expert 4 KiB-aligned)."""
    spec = ckpt.spec
    layouts = {b: QuantLayout(spec.hidden_size, spec.moe.intermediate_size, b, settings.group_size,
                              spec.moe.expert_bias) for b in {b for row in bits.values() for b in row}}
    return sum(-(-layouts[b].numel // ALIGN) * ALIGN for row in bits.values() for b in row)


def cache_write_error(folder: Path, e: OSError, need: int | None = None) -> ConfigError:
    """One line for a cache folder that cannot take an entry (read-only, full, over a file size limit)."""
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free space there or pass " + CACHE_FLAG + " to a folder with room"
    else:
        fix = "pass " + CACHE_FLAG + " to a writable folder"
    size = f" (the entry needs {format_size(need)})" if need else ""
    return ConfigError(f"cannot write the quantized-expert cache in {folder}: {why}{size}; {fix}")


def clean_stale(root: Path) -> list[Path]:
    """Remove temporary entries that no live build holds (their builder was killed); returns what was removed.
    A builder holds an exclusive flock on TMP/.lock until the entry is renamed into place; the kernel drops it
    when the process dies, however it dies."""
    removed = []
    for tmp in (root / "quant").glob(f"{TMP_PREFIX}*"):
        if tmp.is_dir() and _abandoned(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    legacy = [p for p in (root / "quant").glob(".*") if p.is_dir() and not p.name.startswith(TMP_PREFIX)
              and not (p / LOCK).exists() and time.time() - p.stat().st_mtime > UNLOCKED_TMP_AGE_S]
    for tmp in legacy:                     # temporary entries of builds before the lock file existed
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        log.info("removed %d abandoned temporary quantized-cache folders: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _abandoned(tmp: Path) -> bool:
    try:
        fd = os.open(tmp / LOCK, os.O_RDWR)
    except FileNotFoundError:              # between mkdtemp and the lock file: only stale once it is old
        return time.time() - tmp.stat().st_mtime > UNLOCKED_TMP_AGE_S
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:                        # a live builder holds it
        return False
    finally:
        os.close(fd)


def _locked_tmp(parent: Path, key: str) -> tuple[Path, int]:
    """A new temporary entry folder and the descriptor of its lock file, locked (held until the entry is done)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key[:8]}-", dir=parent))
    fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return tmp, fd


def write_entry(root: Path, key: str, ckpt, settings, bits: dict[int, list[int]], progress: bool = True) -> Path:
    """Quantize every expert at its width into a new entry; returns the entry directory. A folder that cannot
    take it (read-only, no space: checked first against the entry's size, and on any write) raises ConfigError."""
    final = root / "quant" / key
    need = entry_bytes(ckpt, settings, bits)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(final.parent).free
        if free < need:
            raise OSError(errno.ENOSPC, f"{format_size(free)} free")
        tmp, lock = _locked_tmp(final.parent, key)
    except OSError as e:
        raise cache_write_error(final.parent, e, need) from None
    try:
        return _write(tmp, final, key, ckpt, settings, bits, progress)
    except OSError as e:
        raise cache_write_error(final.parent, e, need) from None
    finally:
        os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)          # gone already when the entry was renamed into place


def _write(tmp: Path, final: Path, key: str, ckpt, settings, bits, progress: bool) -> Path:
    spec = ckpt.spec
    d, i = spec.hidden_size, spec.moe.intermediate_size
    records, offset = [], 0
    total = len(spec.moe_layers) * spec.moe.num_experts
    with open(tmp / "experts.bin", "wb") as f, \
            tqdm(total=total, desc=f"quantizing experts ({settings.name})", unit="expert",
                 disable=not progress, leave=False) as bar:
        for m in spec.moe_layers:
            for e in range(spec.moe.num_experts):
                lay = QuantLayout(d, i, bits[m][e], settings.group_size, spec.moe.expert_bias)
                sections = ckpt.layout.sections(ckpt.read_expert(m, e, torch.float32))
                buf = lay.quantize(*sections[:3], biases=sections[3:] or None)
                data = buf.numpy().tobytes()
                f.write(data + b"\0" * (-len(data) % ALIGN))
                records.append({"layer": m, "expert": e, "bits": bits[m][e], "offset": offset,
                                "nbytes": len(data), "crc32": zlib.crc32(data)})
                offset += len(data) + (-len(data) % ALIGN)
                bar.update()
        f.flush()
        os.fsync(f.fileno())
    manifest = {"version": FORMAT_VERSION, "key": key, "name": settings.name, "settings": settings.key(),
                "group_size": settings.group_size, "hidden_size": d, "intermediate_size": i,
                "num_experts": spec.moe.num_experts, "moe_layers": list(spec.moe_layers),
                "model_dir": str(ckpt.model_dir), "file_bytes": offset, "experts": records}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (final / LOCK).unlink(missing_ok=True)
    return final
