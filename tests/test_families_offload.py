"""GPT-OSS and Granite-MoE beyond the parity suite: offloaded under a small budget (stacked expert tensors
sliced by byte range, converted at load) with the outputs of the all-resident engine, and int4 experts
(biases kept in float32, the clamped SwiGLU) against transformers on the dequantized weights."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import moe_engine
from conftest import load_hf, write_model
from moe_engine.checkpoint import Checkpoint
from moe_engine.quant.format import QuantLayout
from test_offload import minimum_budget
from test_quant import min_budget

# gpt_oss: always converted (transpose + de-interleave); granitemoe float32: read in place; the bf16 cases run in
# float32, so their raw bytes go through the staging buffers
OFFLOAD_CASES = ["gpt_oss", "gpt_oss-gqa-layer-types-sharded-bf16", "granitemoe", "granitemoeshared-sharded-bf16"]


@pytest.mark.parametrize("case", OFFLOAD_CASES)
def test_offloaded_under_budget_gives_resident_outputs(case, checkpoint_dir):
    path = checkpoint_dir(case)
    ids = torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(11))
    ref = moe_engine.load(path, device="cpu", dtype="float32", progress=False)
    want = ref.logits(ids), ref.generate(ids[:1], max_new_tokens=12)
    total = len(ref.spec.moe_layers) * ref.spec.moe.num_experts
    ref.close()
    budget = minimum_budget(path)
    eng = moe_engine.load(path, device="cpu", dtype="float32", gpu_mem=budget, progress=False)
    got = eng.logits(ids), eng.generate(ids[:1], max_new_tokens=12)
    stats = eng.stats()
    eng.close()
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1])
    assert stats["cache"]["capacity_experts"] < total and stats["io"]["loads"] > stats["cache"]["capacity_experts"]
    # memory under the budget is measured (peak RSS of a fresh process): test_hardening.py's test_measured_peak_*


QUANT_CASES = {
    "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM,
                dict(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                     sliding_window=5, swiglu_limit=0.6, initializer_range=0.1)),
    "granitemoeshared": (tf.GraniteMoeSharedConfig, tf.GraniteMoeSharedForCausalLM,
                         dict(hidden_size=64, intermediate_size=32, shared_intermediate_size=32, num_local_experts=4,
                              num_experts_per_tok=2, embedding_multiplier=4.0, attention_multiplier=0.2,
                              residual_multiplier=0.5, logits_scaling=3.0, initializer_range=0.1)),
}


def interleave_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows a0, b0, a1, b1, ... (GPT-OSS's gate/up column order, as rows)."""
    return torch.stack([a, b], dim=1).flatten(0, 1)


def dequantized_copy(model_dir, out_dir, bits: int, group: int):
    """The checkpoint with every expert replaced by its quantize -> dequantize value, in the family's own layout."""
    ckpt = Checkpoint(model_dir)
    spec, i = ckpt.spec, ckpt.spec.moe.intermediate_size
    tensors = load_file(str(model_dir / "model.safetensors"))
    for layer in spec.moe_layers:
        names = [n.format(l=layer) for n in ckpt.expert_format.names]
        for e in range(spec.moe.num_experts):
            sections = ckpt.layout.sections(ckpt.read_expert(layer, e, torch.float32))
            lay = QuantLayout(spec.hidden_size, i, bits, group, spec.moe.expert_bias)
            buf = lay.quantize(*sections[:3], biases=sections[3:] or None)
            w1, w2 = lay.dequantize(buf)                                         # [2I, D] gate then up, [D, I]
            if spec.family == "gpt_oss":                                         # gate_up_proj, _bias, down_proj, _bias
                b1, b2 = lay.biases(buf)
                tensors[names[0]][e] = interleave_rows(w1[:i], w1[i:]).t()
                tensors[names[1]][e] = interleave_rows(b1[:i], b1[i:])
                tensors[names[2]][e], tensors[names[3]][e] = w2.t(), b2
            else:                                                                # input_linear, output_linear
                tensors[names[0]][e], tensors[names[1]][e] = w1, w2
    ckpt.close()
    out_dir.mkdir()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text((model_dir / "config.json").read_text())
    return out_dir


@pytest.mark.parametrize("case", sorted(QUANT_CASES))
def test_int4_experts_match_transformers_on_dequantized_weights(case, tmp_path):
    path = write_model(tmp_path / case, *QUANT_CASES[case], {})
    kw = dict(device="cpu", dtype="float32", quant="int4", quant_group=32, quant_cache=tmp_path / "cache",
              progress=False)
    eng = moe_engine.load(path, **kw)
    hf = load_hf(dequantized_copy(path, tmp_path / "ref", 4, 32))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    assert (eng.logits(ids) - want).abs().max().item() < 1e-4
    prompt = ids[:1, :6]
    want_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert torch.equal(eng.generate(prompt, max_new_tokens=8), want_tokens)
    eng.close()
    offloaded = moe_engine.load(path, gpu_mem=min_budget(path, **kw), **kw)    # quantized experts offloaded too
    assert torch.equal(offloaded.generate(prompt, max_new_tokens=8), want_tokens)
    assert offloaded.stats()["io"]["loads"] > 0
    offloaded.close()
