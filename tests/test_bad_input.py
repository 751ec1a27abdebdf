"""Bad checkpoints, arguments and flags: each is one MoeEngineError line that names the file, tensor, flag or
value, raised before any work where possible; through the CLI it is exit code 2 and one stderr line."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import moe_engine
from conftest import BASE
from moe_engine import (CheckpointError, ConfigError, MoeEngineError, PromptTooLongError, TokenizerError,
                        UnsupportedArchitectureError)
from moe_engine.cli import main
from tokenized import CONTEXT, copy_checkpoint

SUPPORTED = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
             "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "PhimoeForCausalLM", "GptOssForCausalLM",
             "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM")
EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


def kw_ids(cases) -> list[str]:
    return [",".join(f"{k}={v}" for k, v in kw.items()) for kw, _ in cases]


def load(path, **kw):
    return moe_engine.load(path, **{"device": "cpu", "progress": False, **kw})


def raises_one_line(cls, fn, *needles: str) -> str:
    """fn() raises `cls` with a one-line message containing every needle; returns the message."""
    with pytest.raises(cls) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_cli_error(capsys, argv, *needles: str) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (code, err)
    assert err.startswith("moe-engine: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def mixtral_copy(checkpoint_dir, tmp_path) -> Path:
    """An editable copy of the conftest mixtral checkpoint (single file, no tokenizer)."""
    return copy_checkpoint(checkpoint_dir("mixtral"), tmp_path / "mixtral")


@pytest.fixture(scope="module")
def bare(checkpoint_dir):
    """Engine on a checkpoint with no tokenizer files."""
    eng = load(checkpoint_dir("mixtral"), dtype="float32")
    yield eng
    eng.close()


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value)

    def end(self):
        self.calls.append(None)


# ---- config.json -----------------------------------------------------------------------------
def test_missing_config(mixtral_copy):
    (mixtral_copy / "config.json").unlink()
    raises_one_line(CheckpointError, lambda: load(mixtral_copy), "config.json", str(mixtral_copy))


def test_invalid_json_config(mixtral_copy):
    (mixtral_copy / "config.json").write_text('{"architectures": ["MixtralForCausalLM"], ')
    raises_one_line(CheckpointError, lambda: load(mixtral_copy), str(mixtral_copy / "config.json"), "JSON")


def test_config_not_an_object(mixtral_copy):
    (mixtral_copy / "config.json").write_text("[1, 2]")
    raises_one_line(CheckpointError, lambda: load(mixtral_copy), "config.json")


def test_directory_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    raises_one_line(CheckpointError, lambda: load(missing), str(missing))


def test_unsupported_architecture_llama(tmp_path):
    cfg = tf.LlamaConfig(**BASE, intermediate_size=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    msg = raises_one_line(UnsupportedArchitectureError, lambda: load(tmp_path), "LlamaForCausalLM", "config.json")
    assert all(a in msg for a in SUPPORTED), msg


def test_unsupported_architecture_edited_config(mixtral_copy):
    path = mixtral_copy / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "architectures": ["FooMoeForCausalLM"], "model_type": "foo_moe"}))
    msg = raises_one_line(UnsupportedArchitectureError, lambda: load(mixtral_copy), "FooMoeForCausalLM")
    assert all(a in msg for a in SUPPORTED), msg


# ---- safetensors files -----------------------------------------------------------------------
def test_missing_shard(checkpoint_dir, tmp_path):
    path = copy_checkpoint(checkpoint_dir("mixtral-mha-window-sharded-bf16"), tmp_path / "sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (path / shards[1]).unlink()
    raises_one_line(CheckpointError, lambda: load(path), shards[1], "model.safetensors.index.json")


def test_no_weights_at_all(mixtral_copy):
    (mixtral_copy / "model.safetensors").unlink()
    raises_one_line(CheckpointError, lambda: load(mixtral_copy), "safetensors", str(mixtral_copy))


def test_truncated_safetensors(mixtral_copy):
    f = mixtral_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    raises_one_line(CheckpointError, lambda: load(mixtral_copy), str(f), "truncated")


@pytest.mark.parametrize("garbage", [b"\xff" * 64, (20).to_bytes(8, "little") + b"this is not json!!!!" + b"\0" * 64],
                         ids=["header-length", "header-json"])
def test_corrupt_safetensors_header(mixtral_copy, garbage):
    f = mixtral_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(garbage + data[len(garbage):])
    raises_one_line(CheckpointError, lambda: load(mixtral_copy), str(f), "corrupt")


def rewrite_tensors(path: Path, edit) -> None:
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("name", [EXPERT, "model.layers.0.self_attn.q_proj.weight"])
def test_wrong_shape_tensor(mixtral_copy, name):
    def edit(t):
        t[name] = torch.zeros(t[name].shape[0] - 1, t[name].shape[1])
    rewrite_tensors(mixtral_copy, edit)
    raises_one_line(CheckpointError, lambda: load(mixtral_copy), name, "shape")


@pytest.mark.parametrize("name", [EXPERT, "model.norm.weight", "lm_head.weight"])
def test_missing_tensor(mixtral_copy, name):
    rewrite_tensors(mixtral_copy, lambda t: t.pop(name))
    raises_one_line(CheckpointError, lambda: load(mixtral_copy), name, "missing")


# ---- tokenizer -------------------------------------------------------------------------------
def test_no_tokenizer_token_ids_work_text_does_not(bare):
    ids = torch.tensor([[5, 6, 7, 8]])
    out = bare.generate(ids, max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 7) and torch.equal(out[:, :4], ids)
    raises_one_line(TokenizerError, lambda: bare.generate("hello", max_new_tokens=3), "tokenizer")
    raises_one_line(TokenizerError, lambda: bare.generate(["a", "b"], max_new_tokens=3), "tokenizer")
    raises_one_line(TokenizerError, lambda: next(bare.stream("hello", max_new_tokens=3)), "tokenizer")
    raises_one_line(ConfigError, lambda: bare.generate(ids, max_new_tokens=3, stop="x"), "stop", "tokenizer")


def test_no_tokenizer_cli(checkpoint_dir, capsys):
    assert_cli_error(capsys, [str(checkpoint_dir("mixtral")), "--prompt", "hi", "--no-progress"], "tokenizer")


@pytest.fixture
def no_template_dir(tok_dir, tmp_path) -> Path:
    path = copy_checkpoint(tok_dir, tmp_path / "no-template")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    return path


def test_chat_without_template(no_template_dir, capsys):
    eng = load(no_template_dir)
    try:
        assert isinstance(eng.generate("hi", max_new_tokens=2), str)      # plain text still works
        raises_one_line(TokenizerError, lambda: eng.generate("hi", chat=True, max_new_tokens=2), "chat template")
    finally:
        eng.close()
    assert_cli_error(capsys, [str(no_template_dir), "--prompt", "hi", "--chat", "--no-progress"], "chat template")


# ---- prompt length ---------------------------------------------------------------------------
def test_prompt_longer_than_context(tok_dir, capsys):
    eng = load(tok_dir)
    try:
        n = CONTEXT + 10
        ids = torch.randint(10, 300, (1, n), generator=torch.Generator().manual_seed(0))
        rec = Recorder()
        raises_one_line(PromptTooLongError, lambda: eng.generate(ids, max_new_tokens=2, streamer=rec),
                        str(n), str(CONTEXT))
        assert rec.calls == []
        text = "x = 1\n" * CONTEXT
        assert len(eng.encode(text)) > CONTEXT
        raises_one_line(PromptTooLongError, lambda: eng.generate(text, max_new_tokens=2), str(CONTEXT))
    finally:
        eng.close()
    assert_cli_error(capsys, [str(tok_dir), "--prompt", text, "--no-progress"], str(CONTEXT))


# ---- sampling and generation arguments -------------------------------------------------------
BAD_SAMPLING = [(dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                (dict(top_k=-1), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
                (dict(temperature=float("nan")), "temperature"), (dict(eos_token_id="two"), "eos_token_id")]


@pytest.mark.parametrize("kw,name", BAD_SAMPLING, ids=kw_ids(BAD_SAMPLING))
def test_nonsense_sampling_values(bare, kw, name):
    rec = Recorder()
    ids = torch.tensor([[5, 6, 7]])
    raises_one_line(ConfigError, lambda: bare.generate(ids, streamer=rec, **{"max_new_tokens": 4, **kw}), name)
    assert rec.calls == [], "the streamer was fed before the arguments were checked"


@pytest.mark.parametrize("kw,name", BAD_SAMPLING[:4], ids=kw_ids(BAD_SAMPLING[:4]))
def test_nonsense_sampling_values_stream(tok_dir, kw, name):
    eng = load(tok_dir)
    try:
        raises_one_line(ConfigError, lambda: next(eng.stream("hello", max_new_tokens=4, **kw)), name)
        assert eng.timings.steps == 0
    finally:
        eng.close()


def test_token_id_outside_vocab(bare):
    raises_one_line(ConfigError, lambda: bare.generate(torch.tensor([[5, 10_000]]), max_new_tokens=2), "10000")


def test_bad_value_in_generation_config(mixtral_copy):
    gen = mixtral_copy / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "do_sample": True, "top_p": 2.0}))
    eng = load(mixtral_copy)
    try:
        raises_one_line(ConfigError, lambda: eng.generate(torch.tensor([[5, 6]]), max_new_tokens=2),
                        "top_p", "generation_config.json")
    finally:
        eng.close()


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                                        ("--top-k", "-1")])
def test_cli_nonsense_sampling(tok_dir, capsys, flag, value):
    name = flag[2:].replace("-", "_")
    code, out, err = run_cli(capsys, str(tok_dir), "--prompt", "hi", "--no-progress", flag, value)
    assert code == 2 and err.startswith("moe-engine: error: ") and err.count("\n") == 1, err
    assert name in err and out == "", (err, out)        # nothing generated before the check


# ---- load arguments --------------------------------------------------------------------------
BAD_LOAD = [(dict(gpu_mem="lots"), ("gpu_mem", "lots")), (dict(cpu_mem="-5G"), ("cpu_mem", "-5G")),
            (dict(gpu_mem=0), ("gpu_mem",)), (dict(device="tpu"), ("tpu",)), (dict(dtype="int3"), ("int3",)),
            (dict(predictor="oracle"), ("oracle",)), (dict(quant="int5"), ("5-bit",)), (dict(quant="mixed:1"), ("cannot be met",))]


@pytest.mark.parametrize("kw,needles", BAD_LOAD, ids=kw_ids(BAD_LOAD))
def test_bad_load_arguments(checkpoint_dir, kw, needles):
    raises_one_line(ConfigError, lambda: moe_engine.load(checkpoint_dir("mixtral"), progress=False, **kw), *needles)


@pytest.mark.parametrize("kw", [k for k, _ in BAD_LOAD], ids=kw_ids(BAD_LOAD))
def test_bad_load_arguments_checked_before_reading(tmp_path, kw):
    """A bad flag is reported even when the directory is also wrong: flags are checked first."""
    with pytest.raises(ConfigError):
        moe_engine.load(tmp_path / "missing", progress=False, **kw)


@pytest.mark.parametrize("flag,value", [("--gpu-mem", "lots"), ("--device", "tpu"), ("--dtype", "int3"),
                                        ("--cpu-mem", "12X")])
def test_cli_bad_load_flags(checkpoint_dir, capsys, flag, value):
    assert_cli_error(capsys, [str(checkpoint_dir("mixtral")), "--prompt", "hi", "--no-progress", flag, value], value)


# ---- CLI: checkpoint problems ----------------------------------------------------------------
def test_cli_missing_directory(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert_cli_error(capsys, [str(missing), "--prompt", "hi", "--no-progress"], str(missing))


def test_cli_without_model_dir_and_no_bundled_model(capsys, monkeypatch, tmp_path):
    """No MODEL_DIR means the bundled model; if an install lost it, say so instead of failing deep inside."""
    import moe_engine.runtime.load as load_module
    monkeypatch.setattr(load_module, "DEFAULT_MODEL_DIR", tmp_path / "tiny-moe")
    assert_cli_error(capsys, ["--prompt", "hi", "--no-progress"], "bundled", "MODEL_DIR")


def test_cli_unsupported_architecture(mixtral_copy, capsys):
    path = mixtral_copy / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "architectures": ["LlamaForCausalLM"],
                                "model_type": "llama"}))
    assert_cli_error(capsys, [str(mixtral_copy), "--prompt", "hi", "--no-progress"], "LlamaForCausalLM", *SUPPORTED)


def test_cli_truncated_weights(mixtral_copy, capsys):
    f = mixtral_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert_cli_error(capsys, [str(mixtral_copy), "--prompt", "hi", "--no-progress"], "model.safetensors")


def test_errors_share_one_base():
    for cls in (CheckpointError, ConfigError, TokenizerError, PromptTooLongError, UnsupportedArchitectureError):
        assert issubclass(cls, MoeEngineError)

