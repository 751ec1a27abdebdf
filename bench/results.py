"""Append one benchmark run to bench/RESULTS.md: date, machine, exact command, table, comparison.

Every comparison script in bench/ prints its markdown table and, at the end of a full run, calls
`record(...)` unless it was given `--no-record` (`add_record_flag` adds the flag, `wants_record`
reads it; `--smoke` runs never record). The file is only ever appended to, with one write of the
whole section, so an interrupted or concurrent run cannot truncate or interleave earlier entries.

    from results import add_record_flag, record, wants_record
    add_record_flag(parser)
    ...
    print(table)
    if wants_record(args):
        record("engine vs accelerate, disk tier", table, comparison="engine / accelerate: 8.5x")
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")     # shown in the command: they change the numbers


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-record", action="store_true",
                        help="print the table only; do not append the run to bench/RESULTS.md")


def wants_record(args: argparse.Namespace) -> bool:
    """True unless the run was asked not to record (--no-record) or is a smoke run (--smoke)."""
    return not getattr(args, "no_record", False) and not getattr(args, "smoke", False)


def _cpuinfo_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    return f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def machine() -> str:
    """One line: CPU model, cores, RAM, GPU (when torch sees one), torch version and thread count."""
    parts = [_cpuinfo_model(), f"{os.cpu_count()} cores", _ram_gib()]
    try:
        import torch
    except ImportError:
        return ", ".join(parts + ["no torch"])
    if torch.cuda.is_available():
        parts.append("GPU " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    else:
        parts.append("no GPU")
    parts += [f"torch {torch.__version__}", f"{torch.get_num_threads()} torch threads"]
    return ", ".join(parts)


def command(argv: list[str] | None = None) -> str:
    """The command that reproduces this run from the repository root: `python bench/NAME.py args`."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    env = [f"{k}={os.environ[k]}" for k in THREAD_ENV if k in os.environ]
    return " ".join([*env, "PYTHONPATH=.", "python", shlex.quote(str(script)), *map(shlex.quote, argv[1:])])


def section(title: str, table_text: str, comparison: str | None = None, notes: str = "",
            argv: list[str] | None = None, date: datetime.date | None = None) -> str:
    """The markdown section `record` appends (starts with a blank line, ends with a newline)."""
    if not title.strip() or "\n" in title:
        raise ValueError(f"record(): title must be one non-empty line, got {title!r}")
    if not table_text.strip():
        raise ValueError("record(): table_text is empty; pass the markdown table the script printed")
    out = [f"\n\n## {date or datetime.date.today()} — {title}\n", f"Machine: {machine()}.",
           "```bash", command(argv), "```"]
    if notes.strip():
        out += ["", notes.strip()]
    out += ["", table_text.strip()]
    if comparison:
        out += ["", f"Comparison: {comparison.strip()}"]
    return "\n".join(out) + "\n"


def record(title: str, table_text: str, comparison: str | None = None, notes: str = "",
           path: str | os.PathLike = RESULTS, argv: list[str] | None = None) -> str:
    """Append a section for this run to `path` (bench/RESULTS.md) with one write; returns the section."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; record() only appends to an existing results file "
                                f"(run from a checkout that has bench/RESULTS.md, or pass path=)")
    text = section(title, table_text, comparison, notes, argv)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    print(f"appended to {path} ({len(text)} characters); --no-record to print only", file=sys.stderr)
    return text
