"""`moe-engine generate`: text on stdout equal to Engine.generate, a one-line summary on stderr, --chat,
--stop, --seed, and the installed console script."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from moe_engine.cli import main

PROMPT = "def fibonacci(n):"
SUMMARY = re.compile(r"(\d+) prompt tokens, (\d+) generated .*tokens/s")


def generate_cli(capsys, tok_dir, *flags: str) -> tuple[int, str, str]:
    code = main(["generate", str(tok_dir), "--no-progress", "--device", "cpu", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_text_and_summary(capsys, tok_dir, eng):
    code, out, err = generate_cli(capsys, tok_dir, "--prompt", PROMPT, "--max-new-tokens", "5")
    assert code == 0, err
    expected = eng.generate(PROMPT, max_new_tokens=5, do_sample=False)
    assert expected and out == expected + "\n"
    assert err.count("\n") == 1, err                                  # one summary line, nothing else
    m = SUMMARY.search(err)
    assert m, err
    ids = torch.tensor(eng.encode(PROMPT))
    generated = len(eng.generate(ids, max_new_tokens=5, do_sample=False)) - len(ids)
    assert (int(m.group(1)), int(m.group(2))) == (len(ids), generated)


def test_generate_chat(capsys, tok_dir, eng):
    code, out, err = generate_cli(capsys, tok_dir, "--prompt", "What is a list?", "--chat", "--max-new-tokens", "6")
    assert code == 0, err
    expected = eng.generate("What is a list?", chat=True, max_new_tokens=6, do_sample=False)
    assert out == expected + "\n"
    assert out != eng.generate("What is a list?", max_new_tokens=6, do_sample=False) + "\n"
    m = SUMMARY.search(err)
    assert m and int(m.group(1)) == len(eng.encode("What is a list?", chat=True))


def test_generate_stop_string(capsys, tok_dir, eng):
    full = eng.generate(PROMPT, max_new_tokens=24, do_sample=False)
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1)
                if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip() and full.find(full[i:i + 2]) == i)
    code, out, err = generate_cli(capsys, tok_dir, "--prompt", PROMPT, "--max-new-tokens", "24", "--stop", stop)
    assert code == 0, err
    assert out == full[:full.find(stop)] + "\n"


def test_generate_seeded_sampling(capsys, tok_dir, eng):
    flags = ["--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "1.0"]
    outs = [generate_cli(capsys, tok_dir, *flags, "--seed", seed)[1] for seed in ("7", "7", "8")]
    assert outs[0] == outs[1] != outs[2]
    assert outs[0] == eng.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=7) + "\n"


def console_script() -> str:
    exe = shutil.which("moe-engine")
    if exe is None:
        pytest.skip("the moe-engine console script is not installed (pip install -e .)")
    return exe


def test_console_script(tok_dir, eng):
    proc = subprocess.run([console_script(), "generate", str(tok_dir), "--prompt", PROMPT, "--max-new-tokens", "5",
                           "--no-progress", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == eng.generate(PROMPT, max_new_tokens=5, do_sample=False) + "\n"
    assert SUMMARY.search(proc.stderr), proc.stderr


def test_console_script_error_is_one_line(tmp_path):
    proc = subprocess.run([console_script(), "generate", str(tmp_path / "missing"), "--prompt", "hi",
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("moe-engine: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert str(tmp_path / "missing") in proc.stderr and "Traceback" not in proc.stderr
