"""What `--quant` asks for, parsed and checked before any work.

    none | int8 | int4 | int3 | int2      every expert at that width
    mixed:AVG_BITS                        one width per expert, chosen by an integer program (allocate.py)
                                          so the average is at most AVG_BITS; needs a calibration run

`group_size` (--quant-group) is the number of input columns sharing one scale and zero point;
`calibration` (--calibration) a text file for mixed (default: the bundled model's calibration text);
`scope` (--quant-scope) what is quantized: "experts" (the routed experts only) or "all" (the dense matmul
weights too, at `dense_bits` with the same group: quant/dense.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .dense import check_dense
from .format import BITS, GROUP_SIZES, check_format

DEFAULT_GROUP = 64
MIXED_CANDIDATES_LOW = (2, 3, 4)       # widths the integer program picks from when AVG_BITS <= 4
MIXED_CANDIDATES_HIGH = (4, 8)         # ... and when 4 < AVG_BITS <= 8
DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "models" / "tiny-moe" / "calibration.txt"
CALIBRATION_TOKENS = 8192              # tokens of calibration text run through the model
SAMPLES_PER_LAYER = 512                # router inputs per MoE layer kept for measuring quantization error
SCOPES = ("experts", "all")            # --quant-scope


@dataclass(frozen=True)
class QuantSettings:
    mode: str                           # "int" or "mixed"
    bits: int | None = None             # int: the width
    avg_bits: float | None = None       # mixed: the average-bits budget
    group_size: int = DEFAULT_GROUP
    calibration: Path | None = None     # mixed: calibration text
    calibration_tokens: int = CALIBRATION_TOKENS
    samples_per_layer: int = SAMPLES_PER_LAYER
    bits_table: tuple[tuple[int, ...], ...] | None = None   # fixed widths per MoE layer (benchmark baselines)
    scope: str = "experts"              # --quant-scope: "experts", or "all" (dense weights too; not in key())

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ConfigError(_scope_error(self.scope))

    @property
    def dense_bits(self) -> int:
        """The width of the dense weights under scope "all": --quant's for intN, else 8 when the experts' average
        is above 4 bits and 4 otherwise (one width for every dense matrix)."""
        if self.mode == "int" and self.bits_table is None:
            return self.bits
        if self.bits_table is not None:
            widths = [b for row in self.bits_table for b in row]
            avg = sum(widths) / len(widths)
        else:
            avg = self.avg_bits
        return 8 if avg > 4 else 4

    @property
    def candidates(self) -> tuple[int, ...]:
        if self.mode == "int":
            return (self.bits,)
        return MIXED_CANDIDATES_LOW if self.avg_bits <= 4 else MIXED_CANDIDATES_HIGH

    @property
    def name(self) -> str:
        if self.bits_table is not None:
            widths = [b for row in self.bits_table for b in row]
            return f"fixed:{sum(widths) / len(widths):g}"
        return f"int{self.bits}" if self.mode == "int" else f"mixed:{self.avg_bits:g}"

    def check_model(self, spec) -> None:
        """The group size must divide the model's hidden and expert FFN sizes, and with scope "all" every dense
        matrix's input size (checked before any work)."""
        try:
            check_format(self.candidates[0], self.group_size, spec.hidden_size, spec.moe.intermediate_size)
        except ValueError as e:
            raise ConfigError(f"--quant {self.name} --quant-group {self.group_size}: {e}") from None
        if self.scope == "all":
            check_dense(spec, self.group_size)

    def key(self) -> dict:
        """What the quantized-expert cache is keyed by (besides the checkpoint's contents). Not the scope: the
        cache holds experts only (dense weights are quantized at every load)."""
        out = {"mode": self.mode, "bits": self.bits, "avg_bits": self.avg_bits, "group_size": self.group_size}
        if self.mode == "mixed":
            out.update(candidates=list(self.candidates), calibration_tokens=self.calibration_tokens,
                       samples_per_layer=self.samples_per_layer)
        return out


def parse_quant(quant, group_size: int | None = None, calibration: str | Path | None = None,
                scope: str | None = None) -> QuantSettings | None:
    """`--quant` value -> QuantSettings (None for no quantization). Errors name the flag and the fix.
    scope (--quant-scope, default "experts"; None keeps a QuantSettings' own)."""
    settings = _parse_quant(quant, group_size, calibration, scope)
    if scope is None or (settings is None and scope == "experts"):
        return settings
    if settings is None:
        raise ConfigError(f"--quant-scope {scope} quantizes the dense weights at --quant's width, and --quant is not "
                          f"set; add --quant int4 (or int8)")
    return settings if settings.scope == scope else dataclasses.replace(settings, scope=scope)


def _scope_error(scope) -> str:
    return (f"--quant-scope {scope!r} is not recognized; use experts (the routed experts only, the default) or all "
            f"(the dense weights too)")


def _check_scope(scope) -> None:
    if scope is not None and scope not in SCOPES:
        raise ConfigError(_scope_error(scope))


def _parse_quant(quant, group_size, calibration, scope) -> QuantSettings | None:
    _check_scope(scope)
    if isinstance(quant, QuantSettings):
        return quant
    if quant is None or quant == "none":
        if calibration is not None:
            raise ConfigError("--calibration is only used with --quant mixed:AVG_BITS; drop it or add --quant mixed:3")
        return None
    usage = "use none, int8, int4, int3, int2 or mixed:AVG_BITS (e.g. mixed:3)"
    if not isinstance(quant, str):
        raise ConfigError(f"--quant {quant!r} is not a quantization setting; {usage}")
    group = DEFAULT_GROUP if group_size is None else group_size
    if isinstance(group, bool) or not isinstance(group, int) or group not in GROUP_SIZES:
        raise ConfigError(f"--quant-group {group_size!r} is not supported; use one of "
                          f"{', '.join(map(str, GROUP_SIZES))}")
    q = quant.strip().lower()
    if q.startswith("int") and q[3:].isdigit():
        bits = int(q[3:])
        if bits not in BITS:
            raise ConfigError(f"--quant {quant}: {bits}-bit experts are not supported; {usage}")
        if calibration is not None:
            raise ConfigError(f"--calibration is only used with --quant mixed:AVG_BITS, not {quant}; drop it")
        return QuantSettings("int", bits=bits, group_size=group)
    if q.startswith("mixed:"):
        return QuantSettings("mixed", avg_bits=_avg_bits(quant, q[6:]), group_size=group,
                             calibration=_calibration_file(calibration))
    raise ConfigError(f"--quant {quant!r} is not recognized; {usage}")


def _avg_bits(quant: str, text: str) -> float:
    try:
        avg = float(text)
    except ValueError:
        raise ConfigError(f"--quant {quant}: AVG_BITS {text!r} is not a number; e.g. mixed:3 or mixed:2.5") from None
    lo, hi = min(MIXED_CANDIDATES_LOW), max(MIXED_CANDIDATES_HIGH)
    if not math.isfinite(avg) or not lo <= avg <= hi:
        raise ConfigError(f"--quant {quant}: an average of {text} bits per weight cannot be met; the narrowest "
                          f"width is {lo} bits and the widest {hi}, so use mixed:AVG_BITS with {lo} <= AVG_BITS <= {hi}")
    return avg


def _calibration_file(calibration: str | Path | None) -> Path:
    path = DEFAULT_CALIBRATION if calibration is None else Path(calibration).expanduser()
    if not path.is_file():
        if calibration is None:
            raise ConfigError(f"the bundled calibration text {path} is missing (a broken install?); "
                              f"pass --calibration FILE")
        raise ConfigError(f"--calibration {calibration}: no such file; pass a UTF-8 text file to calibrate on")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--calibration {path} cannot be read as UTF-8 text ({e})") from None
    if not text.strip():
        raise ConfigError(f"--calibration {path} is empty; give it at least a few thousand tokens of text")
    return path.resolve()
