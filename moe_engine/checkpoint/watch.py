"""Files that must not change under a running engine: their identity as read at load, checked after every read.

    FileWatch(what)        what: "checkpoint" / "quantized-expert cache", for messages
        .record(path, st)  the os.stat_result of a file as it was read at load (from the descriptor it was read with)
        .check(paths)      stat each path again; any change of device, inode, size, mtime or ctime -> CheckpointError,
                           and every later check raises the same error (the engine refuses to go on)

Why: a checkpoint overwritten in place (`cp`, a new download, `rsync --inplace`) keeps its path, so reads after
the change would silently mix two versions of the weights. The expert readers call `check` after each expert
they read from disk (one stat per file, ~1 us, next to a read of kilobytes to megabytes), and when a read fails,
so that a truncated or replaced file is reported as such. A write after the last check that changes none of
these fields (same size, clock turned back, ctime unchanged) cannot be seen this way; nor can a flipped bit
that never went through the file system (see README, "What is detected and what is not").
"""
from __future__ import annotations

import os
import threading

from ..errors import CheckpointError

FIELDS = (("st_dev", "device"), ("st_ino", "inode"), ("st_size", "size"), ("st_mtime_ns", "mtime"),
          ("st_ctime_ns", "ctime"))


def identity(st: os.stat_result) -> tuple[int, ...]:
    return tuple(getattr(st, f) for f, _ in FIELDS)


class FileWatch:
    def __init__(self, what: str = "checkpoint"):
        self.what = what
        self._ids: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        self.changed: CheckpointError | None = None      # set on the first change seen; sticky

    def record(self, path: str | os.PathLike, st: os.stat_result) -> None:
        with self._lock:
            self._ids[os.fspath(path)] = identity(st)

    def watched(self, path: str) -> bool:
        return path in self._ids

    def check(self, paths=None, reading: str = "") -> None:
        """Raise CheckpointError when any of `paths` (default: every recorded file) changed since it was recorded.
        reading: what was being read, for the message (e.g. "tensor 'x'")."""
        if self.changed is not None:
            raise self.changed
        for path in (self._ids if paths is None else paths):
            then = self._ids.get(path)
            if then is None:
                continue
            try:
                now = identity(os.stat(path))
            except OSError as e:
                self._fail(path, f"it can no longer be read ({e.strerror or e})", reading)
            if now != then:
                self._fail(path, describe_change(then, now), reading)

    def _fail(self, path: str, why: str, reading: str) -> None:
        at = f" (while reading {reading})" if reading else ""
        err = CheckpointError(f"{self.what} file {path} changed since this engine loaded it{at}: {why}; the engine "
                              f"stops reading from it rather than mix two versions of the weights (this request and "
                              f"every later one that needs it fail): restart the engine to load the file as it is now")
        with self._lock:
            if self.changed is None:
                self.changed = err
        raise self.changed


def describe_change(then: tuple[int, ...], now: tuple[int, ...]) -> str:
    """'truncated (size 993 -> 991 bytes)', 'replaced by another file (inode 5 -> 9)', 'modified in place (mtime ...)'"""
    dev, ino, size = (a != b for a, b in zip(then[:3], now[:3]))
    if dev or ino:
        return f"replaced by another file (inode {then[1]} -> {now[1]})"
    if size:
        kind = "truncated" if now[2] < then[2] else "grown"
        return f"{kind} (size {then[2]} -> {now[2]} bytes)"
    changed = " and ".join(label for (_, label), a, b in zip(FIELDS[3:], then[3:], now[3:]) if a != b)
    return f"modified in place (same size, {changed} changed)"
