"""Values a user types: sizes and rates with units, and the checks every flag and keyword shares.

Sizes (`--gpu-mem`, `--cpu-mem`, `gpu_mem=`) and rates (`simulate --bandwidth`, `--compute`) are read by
one parser, `parse_size`:

    8G, 8g, 512M, 1.5T    a bare unit letter: binary for sizes (8G = 8 x 2^30 bytes), decimal for rates
    8GiB, 8Gi, 512MiB     binary units: K/M/G/T x 2^10/2^20/2^30/2^40, always
    8GB, 512MB, 1.5TB     decimal units: K/M/G/T x 10^3/10^6/10^9/10^12, always
    2147483648, 1.5e9     a plain number: bytes (or bytes per second); a trailing "B" or "/s" is allowed

Memory budgets (`parse_budget`) also take `auto`: the budget is measured at start (runtime/resources.py).

The checks (`check_int`, `check_number`, `check_choice`) raise ConfigError naming the value, what was
wrong and what to use, in the words the flag or keyword uses (`what`). The engine's configuration
dataclasses (runtime/config.py, quant/settings.py, server/app.py) validate through them. Imports
nothing but errors.py, so every package may use it.
"""
from __future__ import annotations

import functools
import math
import re

from .errors import ConfigError

_PREFIX = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([KMGT]?)(I?)(B?)\s*(?:/S)?\s*$", re.IGNORECASE)


def _scale(prefix: str, binary_mark: str, decimal_mark: str, bare_binary: bool) -> float:
    """Multiplier of a unit: 'Gi'/'GiB' binary, 'GB' decimal, bare 'G' per `bare_binary`."""
    power = _PREFIX[prefix.upper()]
    binary = bool(binary_mark) or (not decimal_mark and bare_binary)
    return float(1 << (10 * power)) if binary else 1000.0 ** power


def parse_quantity(value, what: str, bare_binary: bool, example: str) -> float | None:
    """A positive number with an optional unit (see the module docstring) -> float; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{what}: expected a size like {example} or a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        m = _QUANTITY.match(value)
        if not m:
            raise ConfigError(f"{what}: cannot read {value!r}; use a number with an optional unit K, M, G or T "
                              f"(binary: KiB, MiB, GiB, TiB; decimal: KB, MB, GB, TB), e.g. {example}")
        number = float(m.group(1)) * _scale(m.group(2), m.group(3), m.group(4) if m.group(2) else "", bare_binary)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{what}: must be positive, got {value!r}")
    return number


def parse_size(value, what: str = "size") -> int | None:
    """'8G' -> 8 * 2**30 bytes ('8GB' -> 8 * 10**9); ints pass through; None stays None."""
    size = parse_quantity(value, what, bare_binary=True, example="'8G', '512MiB' or '8GB'")
    if size is None:
        return None
    if int(size) <= 0:
        raise ConfigError(f"{what}: must be at least one byte, got {value!r}")
    return int(size)


def parse_budget(value, what: str) -> int | str | None:
    """A memory budget: a size (parse_size), or "auto" (what this process may use, measured at start:
    runtime/resources.py), returned as "auto"; None stays None."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return parse_size(value, what)
    except ConfigError as e:
        raise ConfigError(f"{e}; or auto (the memory this process may use, measured at start)") from None


def parse_rate(value, what: str) -> float:
    """'2.2G', '25GB', '25GB/s', '1.5e9' or a number -> bytes per second (a bare unit letter is decimal)."""
    if value is None:
        raise ConfigError(f"{what}: expected bytes per second like 2.2G, 25GB or 1.5e9, got None")
    return parse_quantity(value, what, bare_binary=False, example="2.2G, 25GB or 1.5e9")


def format_size(n: int) -> str:
    """Bytes -> short human string ('1.50 GiB')."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def check_int(value, what: str, minimum: int | None = 1, maximum: int | None = None, optional: bool = False,
              flag: str = ""):
    """An int within [minimum, maximum] (booleans refused); None passes when optional. flag: the CLI flag of the
    same value, named in the error too."""
    if value is None and optional:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value
    if minimum is None:
        want = "an integer" if maximum is None else f"an integer <= {maximum}"
    elif maximum is not None:
        want = f"an integer from {minimum} to {maximum}"
    elif minimum == 1:
        want = "a positive integer"
    else:
        want = f"an integer >= {minimum}"
    raise ConfigError(f"{what}={value!r} is invalid: use {want}" + (f" ({flag})" if flag else ""))


def check_number(value, what: str, minimum: float | None = None, maximum: float | None = None,
                 above: bool = False, optional: bool = False):
    """A finite real number >= minimum (> minimum when `above`) and <= maximum; None passes when optional."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (minimum is None or (value > minimum if above else value >= minimum)) \
            and (maximum is None or value <= maximum):
        return float(value)
    bounds = [f"{'>' if above else '>='} {minimum:g}" if minimum is not None else "",
              f"<= {maximum:g}" if maximum is not None else ""]
    want = " and ".join(b for b in bounds if b) or "finite"
    raise ConfigError(f"{what}={value!r} is invalid: use a number {want}")


def check_choice(value, what: str, choices) -> str:
    if value not in choices:
        raise ConfigError(f"{what}={value!r} is invalid: use one of {', '.join(map(str, choices))}")
    return value


# ---- one error, two audiences: CLI flags or load() keywords --------------------------------------------------

def flag_of(keyword: str) -> str:
    """load()'s keyword -> the CLI flag of the same value: max_kv_tokens -> --max-kv-tokens."""
    return "--" + keyword.replace("_", "-")


def _drop_repeated_mention(message: str, name: str) -> str:
    """'threads 0 is invalid ... (threads)' -> without the parenthesis when `name` is said before it."""
    paren = f" ({name})"
    if paren in message and message.index(name) < message.index(paren):
        message = message.replace(paren, "")
    return message


_VALUE = r"(?:[A-Z][A-Z_]*\b|[0-9'\"][^\s;,)]*)"   # a flag's value as errors write it: DIR, 600M, 'x'


def _outside_code(reword):
    """Apply `reword` to the parts of a message outside `backticks` (a command quoted there stays as it is)."""
    @functools.wraps(reword)
    def apply(message: str, keywords) -> str:
        parts = message.split("`")
        return "`".join(reword(p, keywords) if i % 2 == 0 else p for i, p in enumerate(parts))
    return apply


@_outside_code
def api_words(message: str, keywords) -> str:
    """An error written with CLI flags, for a caller of the Python API: each flag of `keywords` (load()'s keyword
    names) becomes its keyword, `=` before a value ('--gpu-mem / gpu_mem: ...' -> 'gpu_mem: ...', '--gpu-mem 600M'
    -> 'gpu_mem=600M', '--quant-cache DIR' -> 'quant_cache=DIR', 'raise --gpu-mem to' -> 'raise gpu_mem to')."""
    for kw in keywords:
        flag = re.escape(flag_of(kw))
        message = re.sub(rf"(?<![\w-]){flag} / {kw}(?![\w-])", kw, message)
        message = re.sub(rf"(?<![\w-]){flag} ({_VALUE})", rf"{kw}=\1", message)
        message = re.sub(rf"(?<![\w-]){flag}(?![\w-])", kw, message)
        message = _drop_repeated_mention(message, kw)
    return message


@_outside_code
def cli_words(message: str, keywords) -> str:
    """An error written with load() keywords, for a user of the CLI: 'max_kv_tokens=0' -> '--max-kv-tokens 0',
    '--gpu-mem / gpu_mem' -> '--gpu-mem'."""
    for kw in keywords:
        flag = flag_of(kw)
        message = re.sub(rf"(?<![\w-]){re.escape(flag)} / {kw}(?![\w-])", flag, message)
        message = re.sub(rf"(?<![\w.-]){kw}=", flag + " ", message)
        message = _drop_repeated_mention(message, flag)
    return message
