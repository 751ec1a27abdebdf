"""bench/bench_llamacpp.py and bench/llamacpp_gguf.py: the GGUF cache key, flag checks and the tables (no llama.cpp
needed: nothing here loads a model or runs the converter)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import bench_llamacpp as bl  # noqa: E402
import llamacpp_gguf as gg  # noqa: E402


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "mixtral-x"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 32000, "num_hidden_layers": 2, "hidden_size": 8}))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


def _set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))


def test_gguf_path_and_variants(ckpt, tmp_path):
    assert gg.gguf_path(ckpt, "bf16") == tmp_path / "mixtral-x-bf16.gguf"
    assert gg.gguf_path(ckpt, "q4_0-experts", tmp_path / "g") == tmp_path / "g" / "mixtral-x-q4_0-experts.gguf"
    with pytest.raises(ValueError, match="q8_0-experts"):
        gg.gguf_path(ckpt, "q5_k")
    assert {v for _, _, v in bl.PRECISIONS.values()} <= set(gg.VARIANTS)


def test_gguf_key_fresh_until_the_checkpoint_changes(ckpt):
    out = gg.gguf_path(ckpt, "q8_0")
    assert gg.freshness(out, ckpt, "q8_0") == "missing"
    out.write_bytes(b"GGUF")
    gg.sidecar(out).write_text(json.dumps(gg.wanted(ckpt, "q8_0")))
    assert gg.freshness(out, ckpt, "q8_0") == "fresh"
    assert gg.freshness(out, ckpt, "q4_0").startswith("stale: variant")          # another variant's key
    (ckpt / "model.safetensors").write_bytes(b"\0" * 65)                        # size changes
    assert gg.freshness(out, ckpt, "q8_0").startswith("stale: files")
    gg.sidecar(out).write_text(json.dumps(gg.wanted(ckpt, "q8_0")))
    st = (ckpt / "model.safetensors").stat()
    _set_mtime(ckpt / "model.safetensors", st.st_mtime_ns + 10**9)             # same size, rewritten later
    assert gg.freshness(out, ckpt, "q8_0").startswith("stale: files")
    gg.sidecar(out).write_text("{not json")
    assert gg.freshness(out, ckpt, "q8_0").startswith("stale: unreadable")


def test_gguf_without_key_file_is_adopted_only_when_newer(ckpt):
    out = gg.gguf_path(ckpt, "bf16")
    out.write_bytes(b"GGUF")
    newest = max(v[1] for v in gg.checkpoint_key(ckpt).values())
    _set_mtime(out, newest + 10**9)
    assert gg.freshness(out, ckpt, "bf16") == "adopt"
    _set_mtime(out, newest - 10**9)
    assert gg.freshness(out, ckpt, "bf16").startswith("stale: no key file")


def test_checkpoint_key_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        gg.checkpoint_key(tmp_path)


def test_missing_converter_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(gg.CONVERTER_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36"):
        gg.find_converter(str(tmp_path / "convert_hf_to_gguf.py"))
    conv = tmp_path / "conv.py"
    conv.write_text("")
    monkeypatch.setenv(gg.CONVERTER_ENV, str(conv))
    assert gg.find_converter() == conv


def test_wrong_vocabulary_is_refused_before_converting(ckpt, tmp_path):
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 2048}))
    with pytest.raises(ValueError, match="--vocab 32000"):
        gg.convert_bf16(ckpt, tmp_path / "x.gguf", tmp_path / "unused.py")


def _args(*argv):
    args = bl.parser().parse_args(list(argv))
    if args.n_prompt is None:
        args.n_prompt = [16, 512] if args.mode == "prefill" else [16]
    return args


@pytest.mark.parametrize("argv, error", [
    ([], None),
    (["--mode", "prefill", "--n-decode", "0"], None),
    (["--mode", "memcg", "--mem-limits", "0.4", "0.6"], None),
    (["--competing-load", "--precisions", "bf16", "int8", "int4"], None),
    (["--model", "x.gguf", "--precisions", "bf16", "int8"], "--model names one GGUF"),
    (["--mode", "memcg", "--competing-load"], "not with --mode memcg"),
    (["--mode", "memcg", "--no-engine"], "nothing to compare"),
    (["--mem-limits", "0.5"], "--mem-limits is for --mode memcg"),
    (["--mode", "memcg", "--mem-limits", "0"], "--mem-limits values must be > 0"),
    (["--mode", "memcg", "--n-prompt", "16", "512"], "one --n-prompt"),
    (["--threads", "0"], "--threads values must be > 0"),
    (["--n-decode", "0"], "--n-decode must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_check_args(argv, error):
    got = bl.check_args(_args(*argv))
    if error is None:
        assert got is None
    else:
        assert got is not None and error in got


def test_small_arithmetic():
    assert bl.context_size(16, 128) == 512 and bl.context_size(512, 1) == 768 and bl.context_size(512, 0) == 768
    assert bl.memcg_limit(0.5, 1000, 7) == 507
    with pytest.raises(ValueError):
        bl.memcg_limit(0, 1000, 7)
    assert bl.slowdown(10.0, 7.5) == pytest.approx(0.25)
    s = bl.summarize([{"prefill_s": 0.5, "decode_s": 2.0, "tokens": [1, 2]},
                      {"prefill_s": 1.0, "decode_s": 1.0, "tokens": [1, 2]},
                      {"prefill_s": 0.25, "decode_s": 4.0, "tokens": [1, 3]}], n_prompt=16, n_decode=8)
    assert s["decode_tokens_per_s"] == 4.0 and s["runs"] == [4.0, 8.0, 2.0]
    assert s["prefill_tokens_per_s"] == 32.0 and not s["deterministic"]
    assert "decode_tokens_per_s" not in bl.summarize([{"prefill_s": 1.0, "decode_s": 0.0, "tokens": [1]}], 16, 0)


def test_tables():
    lc = {"decode_tokens_per_s": 20.0, "runs": [20.0, 10.0], "bytes_per_token": 400e6}
    en = {"decode_tokens_per_s": 30.0, "runs": [30.0, 20.0], "bytes_per_token": 400e6}
    row = {"precision": "int8", "threads": 2, "n_prompt": 16, "read_bw": 40e9, "llama": lc, "engine": en,
           "llama_loaded": {**lc, "decode_tokens_per_s": 10.0}, "engine_loaded": {**en, "decode_tokens_per_s": 27.0}}
    text = bl.table([row], "decode")
    head, sep, line = text.splitlines()
    assert head.count("|") == sep.count("|") == line.count("|")
    assert "**1.50x**" in line and "1.50, 2.00 (1.75x)" in line and "| 20% |" in line and "| 30% |" in line
    loaded = bl.load_table([row], "decode").splitlines()[-1]
    assert "| 50% |" in loaded and "| 10% |" in loaded and "2.70x" in loaded
    assert "slowdown under load: engine 10%, llama.cpp 50%" in bl.compare_in_process([row], "decode")
    mem = {"precision": "bf16", "threads": 2, "fraction": 0.4, "limit": 2 << 30, "allowance": 450 << 20,
           "llama": [{"decode_tokens_per_s": 2.0, "memcg_peak": 1 << 30}],
           "engine": [{"error": "Traceback ...\nConfigError: gpu_mem: 'auto' | bad", "rc": 1}]}
    mline = bl.memcg_table([mem]).splitlines()[-1]
    assert "2.00 GiB (40% + 450 MiB)" in mline and "error: ConfigError: gpu_mem: 'auto' / bad" in mline
    assert "a side failed" in bl.compare_memcg([mem])
