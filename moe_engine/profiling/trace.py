"""Routing traces: load, save and validate the npz format of docs/architecture.md.

A trace is the routing of T forward steps (tokens) through L MoE layers, K experts each:
    experts      uint8/int16 [T, L, K]   selected expert ids per token and layer
    probs        float       [T, L, K]   their routing weights
    seq_offsets  int64       [S+1]       rows of sequence i are seq_offsets[i]:seq_offsets[i+1]
    token_ids    int32       [T]         optional (traces the engine records carry it)
Other arrays (prompt_len, router inputs) are kept as they are. This module reads and checks
files; it does not simulate caches (replay.py) or compute bounds (belady.py).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MoeEngineError

REQUIRED = ("experts", "probs", "seq_offsets")
ZIP_MAGIC = b"PK"                          # an npz is a zip archive of .npy files
NPY_MAGIC = b"\x93NUMPY"


class TraceError(MoeEngineError, ValueError):
    """A trace file is missing a key or has an array of the wrong shape, type or range."""


@dataclass
class Trace:
    experts: np.ndarray                     # [T, L, K] integer expert ids
    probs: np.ndarray                       # [T, L, K] routing weights
    seq_offsets: np.ndarray                 # [S+1] int64
    token_ids: np.ndarray | None = None     # [T] int32
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    num_experts: int | None = None          # E; inferred as max id + 1 when not given

    def __post_init__(self):
        if self.num_experts is None and self.experts.size:
            self.num_experts = int(self.experts.max()) + 1

    @property
    def num_steps(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    def sequences(self, start: int = 0, stop: int | None = None) -> Trace:
        """The sub-trace of sequences [start, stop), offsets rebased to 0."""
        off = self.seq_offsets[start:(self.num_sequences if stop is None else stop) + 1]
        rows = slice(int(off[0]), int(off[-1]))
        tok = None if self.token_ids is None else self.token_ids[rows]
        seqs = slice(start, start + len(off) - 1)
        extra = {}
        for key, value in self.extra.items():       # per-sequence and per-row arrays follow the cut; the rest stays
            if key == "prompt_len":
                extra[key] = value[seqs]
            elif key == "router_inputs":
                extra[key] = value[rows]
            else:
                extra[key] = value
        return Trace(self.experts[rows], self.probs[rows], off - off[0], tok, extra, self.num_experts)


def validate(arrays: dict[str, np.ndarray], source: str = "<arrays>") -> None:
    """Raise TraceError naming `source` and the bad key unless `arrays` form a valid trace."""
    for key in REQUIRED:
        if key not in arrays:
            raise TraceError(f"{source}: missing key {key!r}; a routing trace needs {', '.join(REQUIRED)} "
                             f"(found: {', '.join(sorted(arrays)) or 'nothing'})")
    experts, probs, off = arrays["experts"], arrays["probs"], arrays["seq_offsets"]
    if experts.ndim != 3 or not np.issubdtype(experts.dtype, np.integer):
        raise TraceError(f"{source}: key 'experts' must be an integer array [T, L, K], "
                         f"got {experts.dtype} with shape {experts.shape}")
    if experts.size and experts.min() < 0:
        raise TraceError(f"{source}: key 'experts' has negative expert ids (min {experts.min()})")
    if probs.shape != experts.shape:
        raise TraceError(f"{source}: key 'probs' has shape {probs.shape}, expected {experts.shape} like 'experts'")
    _check_offsets(off, experts.shape[0], source)
    tok = arrays.get("token_ids")
    if tok is not None and tok.shape != (experts.shape[0],):
        raise TraceError(f"{source}: key 'token_ids' has shape {tok.shape}, expected ({experts.shape[0]},)")


def _check_offsets(off: np.ndarray, num_steps: int, source: str) -> None:
    if off.ndim != 1 or len(off) < 1 or not np.issubdtype(off.dtype, np.integer):
        raise TraceError(f"{source}: key 'seq_offsets' must be an integer array [S+1], "
                         f"got {off.dtype} with shape {off.shape}")
    if off[0] != 0 or off[-1] != num_steps or (np.diff(off) < 0).any():
        raise TraceError(f"{source}: key 'seq_offsets' must rise from 0 to T={num_steps} "
                         f"(got first {off[0]}, last {off[-1]}, non-decreasing: {bool((np.diff(off) >= 0).all())})")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an npz file, never through pickle; anything else (a text file, an empty file, one .npy
    array, a damaged zip, object arrays) is a TraceError naming the file."""
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file (record one with `moe-engine trace ... --out {path.name}`)")
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if not head.startswith(ZIP_MAGIC):
        found = "an empty file" if not head else ("a single .npy array" if head == NPY_MAGIC else
                                                   f"not an npz file (it starts with {head[:4]!r})")
        raise TraceError(f"{path} is {found}; a routing trace is the .npz that `moe-engine trace --out` writes")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        why = "it holds object arrays, which are never unpickled" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise TraceError(f"{path} is not a readable npz of arrays ({why}); record the trace again with "
                         f"`moe-engine trace`") from None


def load_trace(path: str | Path, num_experts: int | None = None) -> Trace:
    """Read and validate a trace file; `num_experts` (E) is checked against the ids when given."""
    path = Path(path)
    arrays = read_npz(path)
    validate(arrays, str(path))
    if num_experts is not None and arrays["experts"].size and arrays["experts"].max() >= num_experts:
        raise TraceError(f"{path}: key 'experts' has id {arrays['experts'].max()} >= num_experts={num_experts}")
    extra = {k: v for k, v in arrays.items() if k not in (*REQUIRED, "token_ids")}
    return Trace(arrays["experts"], arrays["probs"], arrays["seq_offsets"].astype(np.int64),
                 arrays.get("token_ids"), extra, num_experts)


def save_trace(path: str | Path, trace: Trace) -> None:
    """Write `trace` as an npz (compressed) after validating it."""
    arrays = {"experts": trace.experts, "probs": trace.probs, "seq_offsets": trace.seq_offsets.astype(np.int64),
              **trace.extra}
    if trace.token_ids is not None:
        arrays["token_ids"] = trace.token_ids.astype(np.int32)
    validate(arrays, str(path))
    np.savez_compressed(path, **arrays)
