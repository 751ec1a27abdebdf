"""MXFP4 experts (GPT-OSS's released format): the decoder against its slow twin and transformers', and a
GPT-OSS checkpoint whose experts this test encodes to MXFP4 against transformers loading the same files."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import moe_engine
from conftest import write_model
from moe_engine.checkpoint import Checkpoint
from moe_engine.errors import CheckpointError
from moe_engine.checkpoint.mxfp4 import dequantize_mxfp4, dequantize_mxfp4_reference
from test_offload import minimum_budget
from test_parity import batch_with_padding

# FP4 E2M1 value of each 4-bit code (OCP Microscaling spec): sign bit 3, exponent bits 2-1, mantissa bit 0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def encode_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., C] float -> (blocks [..., C/32, 16] uint8, scales [..., C/32] uint8), round to nearest.

    Each block of 32 gets the power of two 2^e that puts its largest magnitude in [4, 8) (E2M1's
    top binade, largest value 6); scale byte e + 127; two codes per byte, the even column low.
    """
    g = w.float().reshape(*w.shape[:-1], -1, 32)                          # [..., G, 32]
    e = torch.floor(torch.log2(g.abs().amax(-1).clamp_min(2.0 ** -100))) - 2
    codes = (g[..., None] / torch.exp2(e)[..., None, None] - E2M1).abs().argmin(-1).to(torch.uint8)   # [..., G, 32]
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (e + 127).to(torch.uint8)


@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 3, 64), (4, 5, 96), (1, 7, 160)])
def test_dequantize_matches_reference_and_transformers(shape):
    g = torch.Generator().manual_seed(sum(shape))
    *lead, c = shape
    blocks = torch.randint(0, 256, (*lead, c // 32, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 140, (*lead, c // 32), dtype=torch.uint8, generator=g)
    fast = dequantize_mxfp4(blocks, scales)                                    # [E, R, C]
    assert fast.shape == shape
    assert torch.equal(fast, dequantize_mxfp4_reference(blocks, scales))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, C, R]
    assert torch.equal(fast, theirs.transpose(1, 2))
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.bfloat16), fast.bfloat16())   # exact in bf16


def test_encoder_is_idempotent_and_close():
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    once = dequantize_mxfp4(*encode_mxfp4(w))
    assert torch.equal(dequantize_mxfp4(*encode_mxfp4(once)), once)       # decoded values are representable
    step = torch.exp2(torch.floor(torch.log2(w.reshape(6, 4, 32).abs().amax(-1))) - 2)   # [6, 4] 2^e per block
    # within half the widest gap (4 -> 6: 2^e), or 2 x 2^e for the block maximum when it clips from (6, 8) to 6
    assert ((once - w).reshape(6, 4, 32).abs() <= 2 * step[..., None]).all()


def write_mxfp4_copy(src, dst):
    """The float checkpoint `src` with its experts in MXFP4, laid out as the released GPT-OSS checkpoints:
    *_blocks [E, R, C/32, 16] + *_scales [E, R, C/32] of each weight as a linear layer's [R out, C in], biases and
    everything else in bfloat16, and quantization_config.quant_method "mxfp4"."""
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = encode_mxfp4(t.transpose(1, 2))   # [E, D, 2I] -> [E, 2I, D]
        else:
            out[name] = t.bfloat16()
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.update(dtype="bfloat16", quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def mx_dir(tmp_path_factory):
    src = write_model(tmp_path_factory.mktemp("gpt_oss-float"), tf.GptOssConfig, tf.GptOssForCausalLM,
                      dict(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                           head_dim=16, sliding_window=6, swiglu_limit=0.8, initializer_range=0.1), {})
    return write_mxfp4_copy(src, tmp_path_factory.mktemp("gpt_oss-mxfp4") / "model")


@pytest.fixture(scope="module")
def hf_mx(mx_dir):
    """transformers' own MXFP4 loading (dequantized on CPU) of the same files, in float32."""
    return tf.GptOssForCausalLM.from_pretrained(mx_dir, dtype=torch.float32,
                                                quantization_config=tf.Mxfp4Config(dequantize=True)).eval()


def test_mxfp4_checkpoint_matches_transformers(mx_dir, hf_mx):
    eng = moe_engine.load(mx_dir, device="cpu", dtype="float32", progress=False)
    ids, mask = batch_with_padding(128, [15, 6, 11], "left", seed=7)
    with torch.no_grad():
        want = hf_mx(ids, attention_mask=mask).logits
    got = eng.logits(ids, attention_mask=mask)
    assert (got - want)[mask.bool()].abs().max().item() < 1e-4
    ref = hf_mx.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(eng.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False), ref)
    eng.close()


def test_mxfp4_experts_offloaded_read_their_disk_bytes(mx_dir):
    ckpt = Checkpoint(mx_dir)
    d, i, e = 64, 32, 4
    mxfp4_bytes = 2 * i * d // 2 + 2 * i * d // 32 + 2 * i * 2 + d * i // 2 + d * i // 32 + d * 2   # blocks, scales, bf16 bias
    assert ckpt.expert_nbytes() == mxfp4_bytes
    assert ckpt.layout.nbytes(torch.float32) == (3 * d * i + 2 * i + d) * 4 and not ckpt.raw_is_packed(torch.float32)
    ckpt.close()
    ids = torch.randint(3, 128, (1, 14), generator=torch.Generator().manual_seed(3))
    ref = moe_engine.load(mx_dir, device="cpu", dtype="float32", progress=False)
    want = ref.logits(ids), ref.generate(ids, max_new_tokens=10)
    ref.close()
    budget = minimum_budget(mx_dir)
    eng = moe_engine.load(mx_dir, device="cpu", dtype="float32", gpu_mem=budget, progress=False)
    got = eng.logits(ids), eng.generate(ids, max_new_tokens=10)
    stats = eng.stats()
    eng.close()
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=0) and torch.equal(got[1], want[1])
    assert stats["cache"]["capacity_experts"] < 2 * e and stats["io"]["loads"] > 0
    assert stats["io"]["bytes_disk_read"] >= stats["io"]["loads"] * mxfp4_bytes
    # memory under the budget is measured (peak RSS of a fresh process): test_hardening.py's test_measured_peak_*


def test_unknown_quant_method_and_wrong_block_dtype_are_named(mx_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(mx_dir / "model.safetensors")
    config = json.loads((mx_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method='gptq' is not supported.*mxfp4"):
        moe_engine.load(bad, device="cpu", progress=False)
    tensors = load_file(str(mx_dir / "model.safetensors"))
    name = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[name] = tensors[name].to(torch.int8)
    (bad / "model.safetensors").unlink()
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((mx_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"{name} is torch.int8, expected torch.uint8.*MXFP4"):
        moe_engine.load(bad, device="cpu", progress=False)

