"""SafetensorsIndex against safetensors' own loader, hand-read byte ranges and broken checkpoints."""

import json
import os
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_engine.checkpoint.safetensors_index import SafetensorsIndex, TensorInfo
from moe_engine.errors import CheckpointError, ConfigError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.f16": torch.randn(7, generator=g).half(),
        "w.bf16": torch.randn(4, 6, generator=g).bfloat16(),
        "w.f64": torch.randn(2, 2, generator=g).double(),
        "w.i64": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "w.i32": torch.randint(-1000, 1000, (3, 3), dtype=torch.int32, generator=g),
        "w.i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "w.u8": torch.randint(0, 255, (2, 3, 4), dtype=torch.uint8, generator=g),
        "w.bool": torch.rand(6, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def _header(path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _rewrite_header(path, edit) -> None:
    """Apply `edit` to the header JSON and write it back in front of the unchanged data section."""
    header, start = _header(path)
    with open(path, "rb") as f:
        data = f.read()[start:]
    edit(header)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _last_tensor(path) -> str:
    header, _ = _header(path)
    header.pop("__metadata__", None)
    return max(header, key=lambda n: header[n]["data_offsets"][1])


@pytest.fixture
def single(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    d = tmp_path_factory.mktemp("mixtral")
    MixtralForCausalLM(cfg).save_pretrained(d, max_shard_size="20KB")
    return d


# --- values and byte ranges ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(_tensors()))
def test_read_matches_safetensors_loader(single, name):
    expected = load_file(str(single / "model.safetensors"))[name]
    with SafetensorsIndex(single) as idx:
        got = idx.read(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)
        assert idx.info(name).shape == tuple(expected.shape)


def test_names_skip_metadata_and_are_sorted(single):
    with SafetensorsIndex(single) as idx:
        assert idx.names() == sorted(_tensors())
        assert "__metadata__" not in idx and "w.f32" in idx
        assert idx.files == [str(single / "model.safetensors")]


def test_byte_ranges_match_file_bytes(single):
    path = single / "model.safetensors"
    expected = load_file(str(path))
    blob = path.read_bytes()
    with SafetensorsIndex(single) as idx:
        for name, t in expected.items():
            info = idx.info(name)
            assert info.path == str(path) and os.path.isabs(info.path)
            assert info.nbytes == t.numel() * t.element_size()
            assert blob[info.offset:info.offset + info.nbytes] == t.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_read_returns_independent_owned_tensors(single):
    with SafetensorsIndex(single) as idx:
        a, b = idx.read("w.f32"), idx.read("w.f32")
        a.fill_(0)
        assert not torch.equal(b, a)
        assert a.untyped_storage().nbytes() == idx.info("w.f32").nbytes


def test_total_bytes(single):
    tensors = _tensors()
    with SafetensorsIndex(single) as idx:
        assert idx.total_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
        assert idx.total_bytes(["w.f16", "w.bf16"]) == 7 * 2 + 24 * 2


def test_read_into_out_fills_given_tensor(single):
    expected = load_file(str(single / "model.safetensors"))
    with SafetensorsIndex(single) as idx:
        for name in ["w.bf16", "w.f32", "scalar", "w.bool"]:
            out = torch.empty_like(expected[name])
            ptr = out.data_ptr()
            got = idx.read(name, out=out)
            assert got is out and out.data_ptr() == ptr
            assert torch.equal(out, expected[name])


@pytest.mark.parametrize("bad", [torch.empty(4, 6), torch.empty(4, 5, dtype=torch.bfloat16),
                                 torch.empty(6, 4, dtype=torch.bfloat16).t()])
def test_read_into_wrong_out_is_refused(single, bad):
    with SafetensorsIndex(single) as idx, pytest.raises(ConfigError, match="w.bf16"):
        idx.read("w.bf16", out=bad)


def test_read_into_bytes(single):
    blob = (single / "model.safetensors").read_bytes()
    with SafetensorsIndex(single) as idx:
        info = idx.info("w.i64")
        buf = bytearray(info.nbytes)
        idx.read_into_bytes("w.i64", buf)
        assert bytes(buf) == blob[info.offset:info.offset + info.nbytes]
        with pytest.raises(ConfigError, match=str(info.nbytes)):
            idx.read_into_bytes("w.i64", bytearray(info.nbytes - 1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_close_releases_file_descriptors(single):
    before = len(os.listdir("/proc/self/fd"))
    with SafetensorsIndex(single) as idx:
        idx.read("w.f32")
        idx.read("w.f16")
        assert len(os.listdir("/proc/self/fd")) == before + 1  # one fd per file, reused
    assert len(os.listdir("/proc/self/fd")) == before


# --- finding files ------------------------------------------------------------------------------------------------

def test_sharded_transformers_checkpoint(mixtral_dir):
    index = json.loads((mixtral_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1, "fixture should produce a sharded checkpoint"
    with SafetensorsIndex(mixtral_dir) as idx:
        assert idx.files == [str(mixtral_dir / s) for s in shards]
        assert idx.names() == sorted(index)
        for shard in shards:
            for name, t in load_file(str(mixtral_dir / shard)).items():
                assert idx.info(name).path == str(mixtral_dir / shard)
                assert torch.equal(idx.read(name), t), name


def test_unindexed_files_are_all_found(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "part-a.safetensors"))
    save_file({"b": torch.zeros(3, dtype=torch.float16)}, str(tmp_path / "part-b.safetensors"))
    with SafetensorsIndex(tmp_path) as idx:
        assert idx.names() == ["a", "b"]
        assert idx.info("b").path == str(tmp_path / "part-b.safetensors")
        assert torch.equal(idx.read("b"), torch.zeros(3, dtype=torch.float16))


def test_same_tensor_in_two_unindexed_files(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError, match="y.safetensors"):
        SafetensorsIndex(tmp_path)


# --- broken checkpoints -------------------------------------------------------------------------------------------

def test_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-model"):
        SafetensorsIndex(tmp_path / "no-such-model")


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        SafetensorsIndex(tmp_path)


def test_missing_shard(mixtral_dir, tmp_path):
    index = json.loads((mixtral_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for s in shards[:-1]:
        (tmp_path / s).write_bytes((mixtral_dir / s).read_bytes())
    with pytest.raises(CheckpointError, match=rf"{shards[-1]}.*model\.safetensors\.index\.json"):
        SafetensorsIndex(tmp_path)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": [1]})])
def test_bad_index_file(tmp_path, text):
    save_file({"a": torch.ones(2)}, str(tmp_path / "shard.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        SafetensorsIndex(tmp_path)


def test_index_names_tensor_absent_from_shard(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "shard-1.safetensors"))
    weight_map = {"a": "shard-1.safetensors", "ghost.weight": "shard-1.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="ghost.weight.*shard-1.safetensors"):
        SafetensorsIndex(tmp_path)


def test_truncated_file(single):
    path = single / "model.safetensors"
    last = _last_tensor(path)
    blob = path.read_bytes()
    path.write_bytes(blob[:-3])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{last}.*re-download"):
        SafetensorsIndex(single)


def test_file_truncated_after_indexing(single):
    path = single / "model.safetensors"
    last = _last_tensor(path)
    with SafetensorsIndex(single) as idx:
        os.truncate(path, path.stat().st_size - 2)
        with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{last}.*truncated"):
            idx.read(last)


def test_garbage_header(single):
    path = single / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[8:40] = os.urandom(32)
    blob[8] = 0xFF  # never valid UTF-8 or JSON
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|JSON)"):
        SafetensorsIndex(single)


@pytest.mark.parametrize("content", [struct.pack("<Q", 10**9) + b"{}", b"\x05\x00"])
def test_header_length_past_eof(tmp_path, content):
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*re-download"):
        SafetensorsIndex(tmp_path)


def _set(name, key, value):
    return lambda h: h[name].__setitem__(key, value)


@pytest.mark.parametrize("edit,expect", [
    (_set("w.f32", "dtype", "F7"), "unknown dtype"),
    (_set("w.f32", "shape", [3, 6]), "needs 72"),
    (_set("w.f32", "data_offsets", [10**7, 10**7 + 60]), "file has"),
    (_set("w.f32", "shape", [-3, -5]), "non-negative"),
    (lambda h: h["w.f32"].pop("dtype"), "dtype"),
])
def test_inconsistent_header_entry(single, edit, expect):
    _rewrite_header(single / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors.*w\.f32.*{expect}"):
        SafetensorsIndex(single)


def test_unknown_tensor_lookup(single):
    with SafetensorsIndex(single) as idx:
        assert "nope" not in idx
        with pytest.raises(CheckpointError, match=rf"nope.*{single.name}"):
            idx.info("nope")
        with pytest.raises(CheckpointError, match="nope"):
            idx.read("nope")


def test_tensor_info_is_frozen(single):
    with SafetensorsIndex(single) as idx:
        info = idx.info("w.f32")
    assert isinstance(info, TensorInfo)
    with pytest.raises(AttributeError):
        info.offset = 0


def test_short_reads_are_retried(single, monkeypatch):
    import moe_engine.checkpoint.safetensors_index as mod

    real = os.preadv
    calls = []

    def dribble(fd, buffers, offset):  # a pread that returns at most 3 bytes, as slow filesystems may
        calls.append(offset)
        return real(fd, [memoryview(buffers[0])[:3]], offset)

    monkeypatch.setattr(mod.os, "preadv", dribble)
    expected = load_file(str(single / "model.safetensors"))["w.f32"]
    with SafetensorsIndex(single) as idx:
        assert torch.equal(idx.read("w.f32"), expected)
    assert len(calls) == 20  # 60 bytes in 3-byte pieces


def test_relative_model_dir_gives_absolute_paths(single, monkeypatch):
    monkeypatch.chdir(single.parent)
    with SafetensorsIndex(single.name) as idx:
        assert idx.info("w.f32").path == str(single / "model.safetensors")
        assert torch.equal(idx.read("w.i8"), _tensors()["w.i8"])
