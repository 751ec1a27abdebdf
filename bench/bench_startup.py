"""Start-up: a cold `moe-engine generate` on the bundled model up to its first token, beside the floor of
importing torch.

    PYTHONPATH=. python bench/bench_startup.py [--repeats 7] [--no-record]

Every run is a new process (a cold Python: nothing imported; the page cache is warm, as after any earlier
run), timed from launch by this script; rows are interleaved run by run, after one untimed warm-up of each:

    python -c "import torch"             the floor: what any torch program pays before its own code
    python -c "import moe_engine"        the package import
    moe-engine generate --prompt ...     launch -> the first generated text on stdout (the CLI flushes each piece),
                                         and launch -> exit (8 new tokens); the console script beside this Python
                                         when it runs this checkout, else `python -m moe_engine.cli` (named in the
                                         recorded notes)

Prints a markdown table of medians (and each run) and appends it to bench/RESULTS.md unless --no-record.
The goal (issue 22): the first token within 3 s of the command.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import ROOT, add_record_flag, record, wants_record  # noqa: E402

PROMPT = "def fibonacci(n):"
GOAL_S = 3.0


def generate_command() -> list[str]:
    """The console script beside this Python (else on PATH) when it runs this checkout, else `python -m`."""
    for exe in (Path(sys.executable).parent / "moe-engine", shutil.which("moe-engine")):
        if exe and Path(exe).exists() and subprocess.run([str(exe), "--version"], cwd=ROOT, capture_output=True,
                                                         timeout=120).returncode == 0:
            return [str(exe)]
    return [sys.executable, "-m", "moe_engine.cli"]        # e.g. a stale editable install: `pip install -e .` fixes it


def time_exit(argv: list[str]) -> float:
    """Seconds from launch to exit of `argv` (must succeed)."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_first_token(argv: list[str]) -> tuple[float, float]:
    """(launch -> first byte on stdout, launch -> exit) of a generate command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest, err = proc.communicate()
    t_exit = time.perf_counter() - t0
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return t_first, t_exit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each row (after one warm-up)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    add_record_flag(p)
    args = p.parse_args(argv)
    launcher = generate_command()
    gen = [*launcher, "generate", "--prompt", PROMPT, "--max-new-tokens", str(args.max_new_tokens),
           "--no-progress"]
    rows = {"python -c \"import torch\" (floor)": [], "python -c \"import moe_engine\"": [],
            "moe-engine generate: first token": [], "moe-engine generate: exit": []}
    for i in range(args.repeats + 1):
        torch_s = time_exit([sys.executable, "-c", "import torch"])
        pkg_s = time_exit([sys.executable, "-c", "import moe_engine"])
        first_s, exit_s = time_first_token(gen)
        if i == 0:
            continue                                         # warm-up: page cache, .pyc files
        for key, value in zip(rows, (torch_s, pkg_s, first_s, exit_s)):
            rows[key].append(value)
        print(f"run {i}: torch {torch_s:.2f} s, moe_engine {pkg_s:.2f} s, first token {first_s:.2f} s, "
              f"exit {exit_s:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    first = med["moe-engine generate: first token"]
    floor = med["python -c \"import torch\" (floor)"]
    lines = ["| what | median s | runs (s) |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |" for k, v in rows.items()]
    table = "\n".join(lines)
    verdict = (f"first token {first:.2f} s after the command ({first - floor:.2f} s above the torch-import floor); "
               f"goal <= {GOAL_S:.0f} s: {'met' if first <= GOAL_S else 'not met'}")
    notes = (f"`{' '.join(['moe-engine', *gen[len(launcher):]])}` on the bundled model "
             f"(`{' '.join(launcher)}`), {args.repeats} runs per row after one warm-up, rows interleaved; "
             f"every run a new process (cold Python, warm page cache); OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}.")
    print(table)
    print(verdict)
    if wants_record(args):
        record("start-up: cold `moe-engine generate` to its first token vs `import torch`", table, verdict, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
