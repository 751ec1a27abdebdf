"""bench/results.py appends well-formed sections and never truncates; every comparison script has --no-record."""
from __future__ import annotations

import datetime
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import results  # noqa: E402

# scripts whose full runs are subcommands: the subcommands that record (`one` is a single measured run)
SUBCOMMANDS = {"bench_offload": [["all"], ["quant"]], "bench_predictors": [["trace"]], "bench_simulate": [["compare"]]}
COMPARISON_SCRIPTS = sorted(p.stem for p in BENCH.glob("bench_*.py"))
TABLE = "| a | b | a / b |\n|---|---|---|\n| 2.0 | 1.0 | 2.00x |"
ARGV = [str(BENCH / "bench_demo.py"), "--tokens", "4", "--prompt", "two words"]


@pytest.fixture
def results_copy(tmp_path):
    dst = tmp_path / "RESULTS.md"
    shutil.copyfile(BENCH / "RESULTS.md", dst)
    return dst


def test_record_appends_a_well_formed_section(results_copy):
    before = results_copy.read_bytes()
    text = results.record("demo: a vs b", TABLE, comparison="a / b: 2.00x", notes="Two runs.", path=results_copy,
                          argv=ARGV)
    after = results_copy.read_bytes()
    assert after.startswith(before) and after[len(before):].decode() == text
    lines = text.split("\n")
    assert lines[:2] == ["", ""]
    assert lines[2] == f"## {datetime.date.today().isoformat()} — demo: a vs b"
    assert re.fullmatch(r"Machine: .+, \d+ cores, \d+ GiB RAM, (no GPU|GPU .+), torch \S+, \d+ torch threads\.",
                        lines[4]), lines[4]
    bash = lines.index("```bash")
    assert lines[bash + 2] == "```"
    assert lines[bash + 1].endswith("PYTHONPATH=. python bench/bench_demo.py --tokens 4 --prompt 'two words'")
    assert "Two runs." in lines
    assert TABLE in text
    assert text.endswith("\nComparison: a / b: 2.00x\n")
    assert text.index("Two runs.") < text.index(TABLE) < text.index("Comparison:")


def test_record_never_truncates(results_copy):
    before = results_copy.read_text()
    first = results.record("one", TABLE, path=results_copy, argv=ARGV)
    second = results.record("two", TABLE, comparison=None, path=results_copy, argv=ARGV)
    assert results_copy.read_text() == before + first + second
    assert "Comparison:" not in second


def test_record_refuses_bad_input_without_writing(results_copy, tmp_path):
    before = results_copy.read_bytes()
    with pytest.raises(ValueError, match="table_text is empty"):
        results.record("t", "  \n", path=results_copy, argv=ARGV)
    with pytest.raises(ValueError, match="one non-empty line"):
        results.record("two\nlines", TABLE, path=results_copy, argv=ARGV)
    assert results_copy.read_bytes() == before
    missing = tmp_path / "nope" / "RESULTS.md"
    with pytest.raises(FileNotFoundError, match="pass path="):
        results.record("t", TABLE, path=missing, argv=ARGV)
    assert not missing.exists()


def test_command_names_thread_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert results.command(ARGV[:1]) == "OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_demo.py"


def test_smoke_and_no_record_do_not_record():
    from argparse import Namespace
    assert results.wants_record(Namespace(no_record=False))
    assert not results.wants_record(Namespace(no_record=True))
    assert not results.wants_record(Namespace(no_record=False, smoke=True))


def load_script(name: str, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))             # scripts put bench/ on sys.path themselves
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_comparison_scripts_are_all_listed():
    assert len(COMPARISON_SCRIPTS) >= 11, COMPARISON_SCRIPTS
    assert set(SUBCOMMANDS) <= set(COMPARISON_SCRIPTS)


@pytest.mark.parametrize("name", COMPARISON_SCRIPTS)
def test_comparison_script_has_no_record_flag(name, monkeypatch, capsys):
    source = (BENCH / f"{name}.py").read_text()
    assert "wants_record(args)" in source and "record(" in source, f"{name} does not record through bench/results.py"
    module = load_script(name, monkeypatch)
    for sub in SUBCOMMANDS.get(name, [[]]):
        with pytest.raises(SystemExit) as exit_info:
            module.main([*sub, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--no-record" in out, f"`python bench/{name}.py {' '.join(sub)} --help` lists no --no-record"
