"""A newcomer's first hour (issue 22): the docs stand alone, the install is lean and its build degrades, the CLI
starts without the compiler stack, hub ids resolve through the Hugging Face cache, trace files that are not npz
give one line, errors speak the caller's language, the small things, and README's commands run as written."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import moe_engine
from moe_engine.checkpoint.hub import is_hub_id, resolve_model
from moe_engine.cli import main
from moe_engine.errors import CheckpointError, ConfigError
from moe_engine.runtime.load import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja")


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-engine: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- docs --------------------------------------------------------------------------------------------------

def test_docs_link_only_inside_the_repository():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name} links to {target}"
    assert "../shared" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_threads_paragraph_matches_the_straggler_guard():
    """README's numbers for the thread pool's straggler guard are csrc/thread_pool.h's constants."""
    header = (ROOT / "csrc" / "thread_pool.h").read_text(encoding="utf-8")
    const = {name: int(v) for name, v in re.findall(r"(k\w+) = (\d+);", header)}
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    late_ms, probe_ms = const["kLateNs"] / 1e6, const["kProbeNs"] / 1e6
    words = {1: "one", 2: "two", 3: "three", 4: "four"}
    assert f"waited over {late_ms:g} ms for the others {words[const['kStrikes']]} ops in a row" in readme
    assert f"again every {probe_ms:g} ms" in readme and "pool_counters()" in readme
    assert "on a machine you know is busy, give `--threads`" in readme


# ---- packaging and the build -------------------------------------------------------------------------------

def load_setup():
    """setup.py as a module (setup() itself runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("moe_engine_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def setup_kwargs(monkeypatch) -> dict:
    mod, seen = load_setup(), {}
    monkeypatch.setattr(mod, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    mod.main()
    return seen


def test_test_extra_has_no_triton_and_the_gpu_extra_has(monkeypatch):
    kw = setup_kwargs(monkeypatch)
    extras = kw["extras_require"]
    assert not any("triton" in r for r in extras["test"]), extras["test"]
    assert any(r.startswith("triton") for r in extras["gpu"])
    assert any(r.startswith("huggingface_hub") for r in kw["install_requires"])
    assert kw["version"] == moe_engine.__version__
    assert "profiling/tiny-moe-trace.npz" in kw["package_data"]["moe_engine"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")       # CI installs triton on its own, failure allowed
    line = next(ln for ln in ci.splitlines() if "triton" in ln and ln.startswith("pip install"))
    assert "||" in line and 'pip install -q -e ".[test]"' in ci


def fake_cuda_root(tmp_path) -> Path:
    root = tmp_path / "cuda"
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").touch()         # a runtime wheel's include folder: no crt/host_config.h
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so").touch()
    return root


def run_build(monkeypatch, tmp_path, fail):
    """OptionalBuildExt.run over the real extension with the compile step mocked: fail(ext) -> exception or None.
    Returns (the command, [(compiler object id, macros, compile args) per build attempt])."""
    from setuptools import Distribution
    mod = load_setup()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CUDA_HOME", str(fake_cuda_root(tmp_path)))
    monkeypatch.delenv("MOE_ENGINE_NO_CUDA", raising=False)
    ext = mod._extension()
    assert mod.CUDA_MACRO in ext.define_macros
    cmd = mod.OptionalBuildExt(Distribution({"name": "moe-engine", "ext_modules": [ext]}))
    cmd.build_lib, cmd.build_temp, cmd.inplace = str(tmp_path / "lib"), str(tmp_path / "tmp"), True
    cmd.ensure_finalized()
    attempts = []

    def build_extension(self, e):                      # the compile-and-link step of one extension
        attempts.append((id(self.compiler), list(e.define_macros), list(e.extra_compile_args), self.inplace))
        error = fail(e)
        if error is not None:
            raise error
    monkeypatch.setattr(mod.build_ext, "build_extension", build_extension)
    monkeypatch.setattr(mod.build_ext, "copy_extensions_to_source", lambda self: None)
    cmd.run()
    return mod, cmd, attempts


def with_cuda(ext) -> bool:
    return ("MOE_WITH_CUDA", "1") in ext.define_macros


def test_failed_cuda_build_falls_back_to_the_cpu_extension(monkeypatch, tmp_path, capsys):
    from distutils.errors import CompileError
    mod, cmd, attempts = run_build(monkeypatch, tmp_path, lambda e: CompileError(
        "command '/usr/bin/g++' failed with exit code 1") if with_cuda(e) else None)
    assert len(attempts) == 2 and cmd.extensions, attempts        # the CPU-only retry built: not skipped
    assert mod.CUDA_MACRO in attempts[0][1] and mod.CUDA_MACRO not in attempts[1][1]
    assert mod.OPENMP in attempts[1][2]                           # only CUDA was dropped
    assert attempts[0][0] != attempts[1][0]                       # a new compiler object for the retry
    assert attempts[1][3] is False and cmd.inplace is True        # build_ext's own state restored after the failure
    assert not any(str(tmp_path / "cuda") in d for d in cmd.extensions[0].include_dirs)
    err = capsys.readouterr().err
    assert "with CUDA" in err and "failed while compiling" in err and "CPU-only extension" in err
    assert "was not built" not in err


def test_every_failing_step_ends_in_one_skip_warning(monkeypatch, tmp_path, capsys):
    from distutils.errors import LinkError
    _, cmd, attempts = run_build(monkeypatch, tmp_path, lambda e: LinkError("undefined reference to `cudaFree'"))
    assert len(attempts) == 3 and cmd.extensions == [] and cmd.get_outputs() == []   # CUDA, then OpenMP, then skip
    err = capsys.readouterr().err
    assert err.count("failed while linking") == 2 and "was not built: linking moe_engine._C" in err


# ---- start-up ----------------------------------------------------------------------------------------------

def test_generate_command_imports_no_compiler_stack():
    """`moe-engine generate` on the bundled model never imports torch._dynamo / sympy (random init at build) or
    scipy: building the model happens on the meta device."""
    code = ("import sys; from moe_engine.cli import main; "
            "main(['generate', '--prompt', 'def f(x):', '--max-new-tokens', '2', '--no-progress']); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'scipy', 'torch._inductor') if m in sys.modules), "
            "file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr


# ---- hub ids -----------------------------------------------------------------------------------------------

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding acme/tiny-moe (the bundled model's files) at main = COMMIT_A and tag v1 =
    COMMIT_B, used offline (no network in tests)."""
    from huggingface_hub import constants
    repo = tmp_path / "hub" / "models--acme--tiny-moe"
    for commit in (COMMIT_A, COMMIT_B):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for name in BUNDLED_FILES:
            (snap / name).symlink_to(DEFAULT_MODEL_DIR / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    (repo / "refs" / "v1").write_text(COMMIT_B)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_hub_id_loads_from_the_cache_offline(hub_cache, eng_bundled):
    eng = moe_engine.load("acme/tiny-moe", device="cpu", progress=False)
    try:
        assert eng.checkpoint.model_dir == (hub_cache / "snapshots" / COMMIT_A).resolve()
        assert eng.generate("def add(a, b):", max_new_tokens=6) == eng_bundled.generate("def add(a, b):",
                                                                                        max_new_tokens=6)
    finally:
        eng.close()


def test_revision_picks_the_snapshot(hub_cache):
    assert resolve_model("acme/tiny-moe") == hub_cache / "snapshots" / COMMIT_A
    assert resolve_model("acme/tiny-moe", revision="v1") == hub_cache / "snapshots" / COMMIT_B
    assert resolve_model("acme/tiny-moe", revision=COMMIT_B) == hub_cache / "snapshots" / COMMIT_B


def test_hub_id_not_cached_offline_says_how_to_download(hub_cache, capsys):
    err = one_line_error(capsys, ["generate", "acme/missing", "--prompt", "hi", "--revision", "v2"])
    assert "acme/missing" in err and "HF_HUB_OFFLINE" in err
    assert "`hf download acme/missing" in err and "--revision v2`" in err
    err = one_line_error(capsys, ["serve", "acme/missing"])           # before the server starts
    assert "hf download acme/missing" in err
    with pytest.raises(CheckpointError) as info:                    # load(): the command in backticks stays whole
        moe_engine.load("acme/missing", revision="v2", progress=False)
    assert "`hf download acme/missing" in str(info.value) and "--revision v2`" in str(info.value)


def test_hub_unreachable_falls_back_or_says_how(monkeypatch, tmp_path):
    """Online but the hub unreachable: huggingface_hub's own fallback to the cache raises LocalEntryNotFoundError
    when the files are not there, any other failure is one line too; both name `hf download`."""
    import huggingface_hub
    from huggingface_hub import errors
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for raised, words in ((errors.LocalEntryNotFoundError("no cached snapshot"), "hub cannot be reached"),
                          (OSError("No space left on device"), "downloading failed (OSError: No space left")):
        def fail(*a, _e=raised, **kw):
            raise _e
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(CheckpointError) as info:
            resolve_model("acme/gone")
        assert words in str(info.value) and "`hf download acme/gone" in str(info.value)
        assert "\n" not in str(info.value)


def test_local_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert not is_hub_id("org/model") and not is_hub_id("./a/b") and not is_hub_id("/abs/path")
    assert is_hub_id("Qwen/Qwen1.5-MoE-A2.7B") and not is_hub_id("a/b/c")
    with pytest.raises(CheckpointError, match="--revision v1 applies to a Hugging Face hub id"):
        resolve_model(str(tmp_path / "org" / "model"), revision="v1")


def test_simulate_takes_a_hub_id(hub_cache, capsys):
    assert main(["simulate", "acme/tiny-moe", "--cache-experts", "4", "--sequences", "2"]) == 0
    assert "tiny-moe" in capsys.readouterr().out


# ---- traces that are not npz -------------------------------------------------------------------------------

def bad_trace_files(tmp_path) -> dict[str, Path]:
    files = {"text": tmp_path / "notes.npz", "empty": tmp_path / "empty.npz", "npy": tmp_path / "one.npy",
             "object": tmp_path / "obj.npz", "zip": tmp_path / "broken.npz"}
    files["text"].write_text("experts: 1 2 3\n")
    files["empty"].write_bytes(b"")
    np.save(files["npy"], np.zeros(3))
    np.savez(files["object"], experts=np.array([{"a": 1}], dtype=object))
    files["zip"].write_bytes(b"PK\x03\x04 not really a zip")
    return files


@pytest.mark.parametrize("kind", ["text", "empty", "npy", "object", "zip"])
def test_a_trace_that_is_not_an_npz_is_one_line(tmp_path, capsys, kind):
    path = bad_trace_files(tmp_path)[kind]
    for argv in (["simulate", "--trace", str(path)],
                 ["train-predictor", "--trace", str(path), "--kind", "path", "--out", str(tmp_path / "p.pt")]):
        err = one_line_error(capsys, argv)
        assert f"--trace {path}" in err, err
    assert not (tmp_path / "p.pt").exists()


def test_npz_files_are_never_unpickled():
    for path in [*(ROOT / "moe_engine").rglob("*.py"), *(ROOT / "predictors").rglob("*.py")]:
        for call in re.findall(r"np\.load\([^)]*\)", path.read_text(encoding="utf-8")):
            assert "allow_pickle=False" in call, f"{path}: {call}"


# ---- errors in the caller's words ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, flag, api_word", [
    ({"gpu_mem": "1M"}, ["--gpu-mem", "1M"], "gpu_mem"),
    ({"max_kv_tokens": 0}, ["--max-kv-tokens", "0"], "max_kv_tokens"),
    ({"threads": 0}, ["--threads", "0"], "threads"),
    ({"device": "tpu"}, ["--device", "tpu"], "device"),
    ({"quant_scope": "all"}, ["--quant-scope", "all"], "quant_scope"),
])
def test_api_errors_name_keywords_and_cli_errors_name_flags(capsys, kw, flag, api_word):
    with pytest.raises(ConfigError) as info:
        moe_engine.load(progress=False, **kw)
    api = str(info.value)
    assert api_word in api and "--" not in api, api
    cli = one_line_error(capsys, ["generate", "--prompt", "hi", "--no-progress", *flag])
    assert flag[0] in cli and f"{api_word}=" not in cli and f"{api_word} /" not in cli, cli


# ---- small things ---------------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moe-engine {moe_engine.__version__}"


def test_no_progress_still_prints_the_placement_plan(capsys):
    assert main(["generate", "--prompt", "hi", "--max-new-tokens", "2", "--gpu-mem", "18M", "--no-progress",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "placement plan" in err and "slots per layer" in err
    assert "loading weights" not in err and "%|" not in err              # no progress bars


def test_profile_figure_title_wraps_and_hit_rates_are_percent():
    pytest.importorskip("matplotlib")
    from moe_engine.profiling import plot
    settings = {"model": "tiny-moe", "device": "cpu", "dtype": "bfloat16", "gpu_mem": "18M", "cpu_mem": None,
                "predictor": "gate-lookahead", "policy": "default", "quant": "none",
                "prompt_file": "/a/rather/long/path/to/a/prompt/file/that/goes/on/and/on/prompts.jsonl"}
    p = {"cache": {"hit_rate": 0.9}, "optimal": {"belady_hit_rate": 0.85},
         "profile": {"settings": settings,
                     "layers": {"moe_layers": [0, 1], "hit_rate": [0.95, 0.85], "belady_hit_rate": [0.9, 0.8]},
                     "time_per_token": {"compute_s": 0.004, "stall_s": 0.001, "io_s": 0.002, "total_s": 0.005,
                                        "decode_steps": 10},
                     "cache_sweep": {"cache_experts_per_layer": [2, 4], "belady_hit_rate": [0.5, 0.9],
                                     "policy_hit_rate": [0.45, 0.85], "policy": "default",
                                     "live": {"mean_cache_experts_per_layer": 3.0, "hit_rate": 0.9}},
                     "lrc": {"suggested_cache_experts": 3}}}
    fig = plot.make_figure(p)
    try:
        title = fig._suptitle.get_text()
        assert "\n" in title and max(len(line) for line in title.splitlines()) <= plot.TITLE_WIDTH
        layers, _, sweep = fig.axes[:3]
        for ax in (layers, sweep):
            assert ax.get_ylim() == (0, 100) and "%" in ax.get_ylabel()
        heights = sorted(round(b.get_height(), 6) for b in layers.patches)
        assert heights == [80.0, 85.0, 90.0, 95.0]                   # the bars are percentages too
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


# ---- README, followed as written -------------------------------------------------------------------------------

def readme_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import check_readme
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return check_readme


def test_readme_commands_are_found_and_classified():
    cr = readme_check()
    cmds = cr.commands()
    runs = [c.text for c in cmds if c.kind == "run"]
    assert any(c.startswith("moe-engine generate --prompt") for c in runs)
    assert any(c.startswith("moe-engine train-predictor") and "--out" in c for c in runs)
    assert "moe-engine simulate" in runs and "moe-engine --version" in runs
    assert [c.text for c in cmds if c.kind == "tests"] == ["python -m pytest -q tests"]
    assert any(c.text == 'pip install -e ".[test]"' for c in cmds if c.kind == "install")
    assert all(c.why for c in cmds if c.kind == "skip")
    assert cr.classify("moe-engine serve Qwen/Qwen1.5-MoE-A2.7B")[0] == "skip"


def test_readme_commands_run_as_written(tmp_path, capsys):
    """Every fast command of README.md in order, in one directory, through the CLI in this process."""
    cr = readme_check()
    done = cr.check(cr.run_in_process, tmp_path)
    assert len(done) >= 8
    assert (tmp_path / "learned.pt").is_file() and (tmp_path / "trace.npz").is_file()


@pytest.fixture(scope="module")
def eng_bundled():
    eng = moe_engine.load(device="cpu", progress=False)
    yield eng
    eng.close()

