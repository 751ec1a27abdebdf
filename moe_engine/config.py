"""Frozen configuration dataclasses and size strings ("8G", "512M")."""
from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int | float | None, what: str = "size") -> int | None:
    """'8G' -> 8 * 2**30 bytes; ints pass through; None stays None. Binary units (K=1024)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size like '8G' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(f"{what}: size must be positive, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: cannot read size {value!r}; use a number with an optional unit K, M, G or T "
                          f"(e.g. '8G', '512M', '1.5G')")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"{what}: size must be positive, got {value!r}")
    return size


def format_size(n: int) -> str:
    """Bytes -> short human string ('1.50 GiB')."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
