"""README.md followed as written: extract its shell commands, run the fast ones, say why the others did not run.

    python bench/check_readme.py                   the fast commands, each as its own process, in a temporary
                                                   directory, with the moe-engine this Python has (about 2 minutes)
    python bench/check_readme.py --fresh-venv      a clean clone of this repository's HEAD and a fresh venv: README's
                                                   install commands as written (pip, from the package registry),
                                                   then the test command, then the fast commands with that venv's
                                                   moe-engine; prints a table of each command's wall time and
                                                   records it in bench/RESULTS.md (the set-up time: install + tests)

tests/test_newcomer.py runs the fast commands in-process (moe_engine.cli.main) as a test; the slow ones (over
10 s: `moe-engine profile` over its 16 built-in prompts) only run here.

Commands are the lines of ```bash / ```sh / ```console blocks and the `$ ` lines of other blocks (a trailing `\\`
joins lines; `a && b` is two commands). Not run, with the reason printed: usage synopses (MODEL_DIR, [optional]
parts, a|b choices, "..."), `moe-engine serve` and `curl` (a long-running server), hub ids (downloads), scripts
under bench/ (benchmarks); pip installs and the test suite run only with --fresh-venv. A command fails the check
when it exits non-zero; the check stops at the first failure and prints its output.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
PLACEHOLDER = re.compile(r"MODEL_DIR|\[|\]|\.\.\.|\bTRACE\.npz\b|\bOUT\.|\bFILE\b|\bKEY\b|\w\|\w|/path/to/")
SLOW = (["moe-engine", "profile"],)          # 16 prompts: tests/test_profile.py covers the command on 3
HUB_ID = re.compile(r"(?:^|\s)[A-Za-z0-9][\w.-]*/[\w.-]+(?:\s|$)")


@dataclass
class Command:
    text: str             # as README writes it (one command, no `&&`)
    line: int             # README line of its block's first line
    kind: str             # run | slow | install | tests | skip
    why: str = ""         # for skip: the reason


def blocks(text: str):
    """(language, first line number, body) of every fenced block."""
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        yield m.group(1), text[:m.start()].count("\n") + 2, m.group(2)


def _join(body: str) -> list[str]:
    out, cur = [], ""
    for raw in body.splitlines():
        cur += raw.rstrip("\\").rstrip() + " " if raw.rstrip().endswith("\\") else raw
        if not raw.rstrip().endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return [c for c in out if c]


def _strip_comment(cmd: str) -> str:
    """Drop a trailing ` # comment` (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i and cmd[i - 1].isspace():
            return cmd[:i].rstrip()
    return cmd


def classify(cmd: str) -> tuple[str, str]:
    words = cmd.split()
    if cmd.startswith("pip install"):
        return "install", ""
    if cmd.startswith("python -m pytest"):
        return "tests", ""
    if PLACEHOLDER.search(cmd):
        return "skip", "usage synopsis (placeholders)"
    if cmd.startswith("curl") or words[:2] == ["moe-engine", "serve"]:
        return "skip", "needs a running server"
    if words[0] == "moe-engine" and len(words) > 2 and HUB_ID.search(" " + words[2] + " "):
        return "skip", "downloads a model from the hub"
    if "bench/" in cmd:
        return "skip", "a benchmark"
    if words[:2] in SLOW:
        return "slow", "over 10 s: the script runs it, the test does not"
    if words[0] in ("moe-engine", "printf", "echo", "ls", "python"):
        return "run", ""
    return "skip", f"not a command this check knows ({words[0]})"


def commands(text: str | None = None) -> list[Command]:
    """Every command of README's shell blocks (and `$ ` lines elsewhere), classified."""
    text = README.read_text(encoding="utf-8") if text is None else text
    out = []
    for lang, line, body in blocks(text):
        if lang in SHELL_BLOCKS:
            lines = _join(body)
        elif lang == "":
            lines = [ln[2:] for ln in _join(body) if ln.startswith("$ ")]
        else:
            continue
        for full in lines:
            for part in _strip_comment(full.removeprefix("$ ")).split(" && "):
                kind, why = classify(part.strip())
                out.append(Command(part.strip(), line, kind, why))
    return out


def run_in_process(cmd: str, cwd: Path) -> tuple[int, str]:
    """A `moe-engine ...` command through moe_engine.cli.main, any other through bash; (exit code, output)."""
    words = shlex.split(cmd)
    if words[0] != "moe-engine":
        proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True)
        return proc.returncode, proc.stdout + proc.stderr
    from moe_engine.cli import main
    out, here = io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(words[1:])
            except SystemExit as e:              # argparse: --version, bad flags
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
    return code, out.getvalue()


def run_process(cmd: str, cwd: Path, env: dict | None = None) -> tuple[int, str]:
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def check(runner, cwd: Path, kinds=("run",), out=sys.stdout) -> list[tuple[Command, float]]:
    """Run every command of `kinds` in README order with `runner(cmd, cwd)`; raise on the first failure."""
    done = []
    for c in commands():
        if c.kind not in kinds:
            print(f"  skipped  README:{c.line}  {c.text[:90]}  ({c.why or c.kind + ': --fresh-venv runs it'})", file=out)
            continue
        t0 = time.perf_counter()
        code, output = runner(c.text, cwd)
        seconds = time.perf_counter() - t0
        print(f"  {'ok' if code == 0 else 'FAILED':7}  README:{c.line}  {c.text[:90]}  ({seconds:.1f} s)", file=out)
        if code != 0:
            raise RuntimeError(f"README:{c.line}: `{c.text}` exited {code}:\n{output[-3000:]}")
        done.append((c, seconds))
    return done


def fresh_venv(keep: bool) -> list[tuple[Command, float]]:
    """Clone HEAD, make a venv, run README's install and test commands and then the fast ones, timed."""
    tmp = Path(tempfile.mkdtemp(prefix="check-readme-"))
    clone, venv = tmp / "moe-engine", tmp / "venv"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    work = tmp / "work"
    work.mkdir()

    def runner(cmd, cwd):
        return run_process(cmd, clone if cmd.startswith(("pip", "python -m pytest")) else cwd, env)
    try:
        return check(runner, work, kinds=("install", "tests", "run", "slow"))
    finally:
        print(f"clone and venv in {tmp}" + ("" if keep else " (removed)"))
        if not keep:
            subprocess.run(["rm", "-rf", str(tmp)])


def table(done: list[tuple[Command, float]]) -> str:
    rows = ["| README line | command | wall s |", "|---|---|---|"]
    rows += [f"| {c.line} | `{c.text}` | {s:.1f} |" for c, s in done]
    setup = sum(s for c, s in done if c.kind in ("install", "tests"))
    rows.append(f"| | set-up: install + test command | {setup:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fresh-venv", action="store_true", help="clean clone + fresh venv: install, test, then the "
                   "fast commands, timed (records the set-up time in bench/RESULTS.md)")
    p.add_argument("--keep", action="store_true", help="keep the clone and venv of --fresh-venv")
    p.add_argument("--list", action="store_true", help="only list the commands and what would run")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import add_record_flag, record, wants_record
    add_record_flag(p)
    args = p.parse_args(argv)
    if args.list:
        for c in commands():
            print(f"{c.kind:8} README:{c.line:<4} {c.text}" + (f"   ({c.why})" if c.why else ""))
        return 0
    if args.fresh_venv:
        done = fresh_venv(args.keep)
        print(table(done))
        if wants_record(args):
            record("README followed from a clean clone in a fresh venv (set-up time)", table(done))
        return 0
    with tempfile.TemporaryDirectory(prefix="check-readme-") as tmp:
        check(lambda cmd, cwd: run_process(cmd, cwd), Path(tmp), kinds=("run", "slow"))
    print("README: every fast command ran as written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
