"""Expert quantization: format, settings, bit allocation, the quantized-expert cache and the engine with it.

Correctness reference: a Hugging Face model whose expert weights were replaced by their
dequantized values must give the quantized engine's logits (float32) and greedy tokens.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import moe_engine
from moe_engine.checkpoint import Checkpoint
from moe_engine.errors import ConfigError
from moe_engine.quant.allocate import allocate_bits, importance, interleaved_bits
from moe_engine.quant.format import (BITS, QuantLayout, dequantize_matrix, pack_planes, quantize_matrix,
                                     unpack_planes)
from moe_engine.quant.settings import QuantSettings, parse_quant

CASES = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                       num_experts=6, num_experts_per_tok=2, norm_topk_prob=False)),
}
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, eos_token_id=2, bos_token_id=1, pad_token_id=0)


def write_model(path, case, seed=0):
    cfg_cls, model_cls, kw = CASES[case]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**BASE, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] > 1:
                p.normal_(0, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory):
    return write_model(tmp_path_factory.mktemp(request.param), request.param)


def dequantized_copy(model_dir, out_dir, quant: dict):
    """The checkpoint with every expert tensor replaced by its dequantized value (the reference model)."""
    ckpt = Checkpoint(model_dir)
    fam, spec = ckpt.family, ckpt.spec
    d, i = spec.hidden_size, spec.moe.intermediate_size
    tensors = load_file(str(model_dir / "model.safetensors"))
    for m, bits in enumerate(quant["bits_per_expert"]):
        layer = spec.moe_layers[m]
        for e, b in enumerate(bits):
            lay = QuantLayout(d, i, b, quant["group_size"])
            names = fam.expert_tensor_names(layer, e)
            gate, up, down = (tensors[n] for n in names)
            w1, w2 = lay.dequantize(lay.quantize(gate, up, down))
            tensors[names[0]], tensors[names[1]], tensors[names[2]] = w1[:i].contiguous(), w1[i:].contiguous(), w2
    ckpt.close()
    out_dir.mkdir()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text((model_dir / "config.json").read_text())
    return out_dir


def min_budget(model_dir, **kw) -> int:
    """The smallest --gpu-mem the engine accepts for this model and settings (from its own error message)."""
    with pytest.raises(ConfigError) as err:
        moe_engine.load(model_dir, gpu_mem="1K", **kw)
    return int(re.search(r"\((\d+) bytes\)", str(err.value)).group(1))


# ---- format -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 2 ** bits, (6, 64), dtype=torch.uint8)
    planes = pack_planes(codes, bits)
    assert sum(p.numel() for p in planes) == codes.numel() * bits // 8          # no waste
    assert torch.equal(unpack_planes(planes, bits, 64), codes.int())


def test_quantization_error_shrinks_with_bits_and_bytes_shrink():
    torch.manual_seed(0)
    g, u, d = torch.randn(128, 192), torch.randn(128, 192), torch.randn(192, 128)
    errs, sizes = [], []
    for bits in BITS:
        lay = QuantLayout(192, 128, bits, 64)
        w1, w2 = lay.dequantize(lay.quantize(g, u, d))
        errs.append(((w2 - d).norm() / d.norm()).item())
        sizes.append(lay.numel)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01 and errs[0] < 0.5
    dense = 3 * 192 * 128 * 2                                                    # bf16 bytes
    for bits, n in zip(BITS, sizes):                                             # codes + fp16 scale & zero per 64
        assert n == pytest.approx(dense * (bits + 2 * 16 / 64) / 16, rel=0.02)


def test_dequantize_is_the_affine_formula():
    w = torch.randn(64, 64)
    codes, scales, zeros = quantize_matrix(w, 4, 32)
    lay = QuantLayout(64, 64, 4, 32).w2
    buf = torch.zeros(QuantLayout(64, 64, 4, 32).numel, dtype=torch.uint8)
    v = lay.views(buf)
    for dst, src in zip(v.planes, pack_planes(codes, 4)):
        dst.copy_(src)
    v.scales.copy_(scales)
    v.zeros.copy_(zeros)
    expect = (codes.float() - zeros.float().repeat_interleave(32, 1)) * scales.float().repeat_interleave(32, 1)
    assert torch.equal(dequantize_matrix(v), expect)
    assert (expect - w).abs().mean() < 0.5 * scales.float().mean()            # clipping may cut outliers


# ---- settings and allocation --------------------------------------------------------------------
def test_parse_quant_accepts_and_rejects():
    assert parse_quant(None) is None and parse_quant("none") is None
    assert parse_quant("int4").bits == 4 and parse_quant("INT8", 128).group_size == 128
    mixed = parse_quant("mixed:2.5")
    assert mixed.avg_bits == 2.5 and mixed.candidates == (2, 3, 4) and mixed.calibration.is_file()
    assert parse_quant("mixed:6").candidates == (4, 8)
    for bad, words in [("int5", "5-bit"), ("int16", "16-bit"), ("fp4", "not recognized"), ("mixed:1.5", "cannot be met"),
                       ("mixed:9", "cannot be met"), ("mixed:x", "not a number"), ("mixed:nan", "cannot be met"),
                       (4, "not a quantization setting")]:
        with pytest.raises(ConfigError, match=words):
            parse_quant(bad)
    with pytest.raises(ConfigError, match="--quant-group 48"):
        parse_quant("int4", 48)
    with pytest.raises(ConfigError, match="no such file"):
        parse_quant("mixed:3", calibration="/nonexistent/calib.txt")
    with pytest.raises(ConfigError, match="only used with --quant mixed"):
        parse_quant("int4", calibration=__file__)


def test_allocation_is_the_exact_optimum():
    rng = np.random.default_rng(0)
    bits = (2, 3, 4)
    for _ in range(20):
        e, avg = 6, float(rng.choice([2.0, 2.5, 3.0, 3.5]))
        err = np.sort(rng.random((e, 3)) * [4, 2, 1], axis=1)[:, ::-1]
        cost = importance(rng.integers(0, 50, e), rng.random(e))[:, None] * err
        got = allocate_bits(cost, bits, avg)
        assert sum(got) <= avg * e + 1e-9
        best = min(sum(cost[k, bits.index(b)] for k, b in enumerate(c))
                   for c in itertools.product(bits, repeat=e) if sum(c) <= avg * e + 1e-9)
        assert sum(cost[k, bits.index(b)] for k, b in enumerate(got)) == pytest.approx(best)


def test_allocation_gives_important_experts_more_bits():
    err = np.tile([[4.0, 2.0, 1.0]], (4, 1))                     # same error curve for every expert
    imp = importance(np.array([100, 1, 1, 1]), np.array([50.0, 1, 1, 1]))
    got = allocate_bits(imp[:, None] * err, (2, 3, 4), 2.5)
    assert got[0] == 4 and sum(got) <= 10
    with pytest.raises(ConfigError, match="cannot be met"):
        allocate_bits(err, (2, 3, 4), 1.5)


def test_interleaved_baseline_meets_the_average():
    got = interleaved_bits(16, 2, 3, 2.5, seed=1)
    assert sorted(got) == [2] * 8 + [3] * 8 and got != interleaved_bits(16, 2, 3, 2.5, seed=2)


# ---- the engine with quantized experts ----------------------------------------------------------
def test_int4_engine_matches_dequantized_transformers_model(model_dir, tmp_path):
    eng = moe_engine.load(model_dir, dtype="float32", quant="int4", quant_group=32, quant_cache=tmp_path / "c",
                          progress=False)
    ref_dir = dequantized_copy(model_dir, tmp_path / "ref", eng.stats()["quant"])
    hf = tf.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    got = eng.logits(ids)
    assert (got - want).abs().max().item() < 1e-4
    prompt = ids[:1, :6]
    with torch.no_grad():
        hf_out = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(eng.generate(prompt, max_new_tokens=8), hf_out)
    eng.close()


@pytest.mark.parametrize("quant", ["int8", "int3"])
def test_outputs_identical_whatever_the_budget_and_policy(model_dir, tmp_path, quant):
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    kw = dict(dtype="float32", quant=quant, quant_group=32, quant_cache=tmp_path, progress=False, max_kv_tokens=64)
    need = min_budget(model_dir, **kw)
    outs = []
    for budget, policy in [(None, None), (need + 40960, "lru"), (need + 40960, None), (need, "lfu")]:
        eng = moe_engine.load(model_dir, gpu_mem=budget, policy=policy, **kw)
        outs.append((eng.logits(ids), eng.generate(ids[:, :5], max_new_tokens=6)))
        if budget is not None:
            assert eng.stats()["cache"]["capacity_experts"] < eng.spec.moe.num_experts * 2   # really offloaded
            assert eng.stats()["io"]["loads"] > 0
        eng.close()
    for logits, tokens in outs[1:]:
        assert torch.equal(logits, outs[0][0]) and torch.equal(tokens, outs[0][1])


def test_quantized_cache_is_reused_then_rebuilt_when_corrupt(model_dir, tmp_path, caplog):
    kw = dict(dtype="float32", quant="int4", quant_group=32, quant_cache=tmp_path, progress=False)
    eng = moe_engine.load(model_dir, **kw)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    want = eng.logits(ids)
    entry = eng.stats()["quant"]["cache_dir"]
    eng.close()
    blob = os.path.join(entry, "experts.bin")
    before = os.stat(blob)
    eng = moe_engine.load(model_dir, **kw)                                     # reused: not rewritten
    assert os.stat(blob).st_ino == before.st_ino and os.stat(blob).st_mtime_ns == before.st_mtime_ns
    eng.close()
    manifest = json.loads(open(os.path.join(entry, "manifest.json")).read())
    with open(blob, "r+b") as f:                                               # flip one byte of one expert
        f.seek(manifest["experts"][3]["offset"] + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with caplog.at_level("WARNING", logger="moe_engine"):
        eng = moe_engine.load(model_dir, **kw)
    assert "stale or corrupt" in caplog.text and "checksum" in caplog.text
    assert torch.equal(eng.logits(ids), want)
    eng.close()
    os.truncate(blob, os.path.getsize(blob) - 4096)                            # truncated
    caplog.clear()
    with caplog.at_level("WARNING", logger="moe_engine"):
        eng = moe_engine.load(model_dir, **kw)
    assert "bytes, expected" in caplog.text and torch.equal(eng.logits(ids), want)
    eng.close()


def test_cache_is_keyed_by_checkpoint_contents_and_settings(tmp_path):
    src = write_model(tmp_path / "m", "mixtral")
    kw = dict(dtype="float32", quant_group=32, quant_cache=tmp_path / "c", progress=False)
    dirs = set()
    for quant in ("int4", "int8"):
        eng = moe_engine.load(src, quant=quant, **kw)
        dirs.add(eng.stats()["quant"]["cache_dir"])
        eng.close()
    eng = moe_engine.load(src, quant="int4", **{**kw, "quant_group": 64})
    dirs.add(eng.stats()["quant"]["cache_dir"])
    eng.close()
    write_model(tmp_path / "m", "mixtral", seed=1)                             # same path, new weights
    eng = moe_engine.load(src, quant="int4", **kw)
    dirs.add(eng.stats()["quant"]["cache_dir"])
    eng.close()
    assert len(dirs) == 4


def test_mixed_allocation_on_the_bundled_model(tmp_path):
    settings = QuantSettings("mixed", avg_bits=2.5, calibration=parse_quant("mixed:3").calibration,
                             calibration_tokens=1024, samples_per_layer=64)
    eng = moe_engine.load(quant=settings, dtype="float32", quant_cache=tmp_path, progress=False, gpu_mem="40M")
    q = eng.stats()["quant"]
    assert q["name"] == "mixed:2.5"
    for bits in q["bits_per_expert"]:
        assert set(bits) <= {2, 3, 4} and sum(bits) <= 2.5 * len(bits) and len(set(bits)) > 1
    assert "bits per expert" in eng.plan.describe() and "quantized mixed:2.5" in eng.plan.describe()
    assert eng.generate("def f(x):", max_new_tokens=4)
    eng.close()


def test_bad_quant_input_fails_before_any_work(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="int5"):
        moe_engine.load(model_dir, quant="int5", quant_cache=tmp_path)
    with pytest.raises(ConfigError, match="group size 128 does not divide .* use a group size of 32"):
        moe_engine.load(model_dir, quant="int4", quant_group=128, quant_cache=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="no tokenizer"):
        moe_engine.load(model_dir, quant="mixed:3", quant_group=32, quant_cache=tmp_path, progress=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):                                             # root ignores permissions
        with pytest.raises(ConfigError, match="quant_cache"):
            moe_engine.load(model_dir, quant="int4", quant_group=32, quant_cache=ro / "x", progress=False)
    assert not list((tmp_path).glob("quant/*"))                                # nothing was written


def test_mixed_widths_through_every_provider_path(tmp_path):
    """Per-expert sizes differ: resident, offloaded (CPU) and the GPU code path's host tier (run on the CPU)."""
    import dataclasses

    from moe_engine.experts import OffloadedExperts
    from moe_engine.experts.costmodel import CostModel, measure_cpu_flops
    from moe_engine.experts.host import HostTier
    from moe_engine.experts.plan import make_plan
    from moe_engine.experts.policies import make_policy
    from moe_engine.quant.prepare import quantized_experts
    from moe_engine.runtime.build import bind_experts, build_decoder, non_expert_bytes
    rng = np.random.default_rng(0)
    table = tuple(tuple(int(b) for b in rng.choice([2, 3, 4, 8], 16)) for _ in range(6))
    settings = QuantSettings("mixed", avg_bits=4.25, bits_table=table)
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    eng = moe_engine.load(quant=settings, dtype="float32", quant_cache=tmp_path, progress=False)
    assert eng.stats()["quant"]["bits_per_expert"] == [list(r) for r in table]
    want = eng.logits(ids)
    ckpt = eng.checkpoint
    offl = moe_engine.load(quant=settings, dtype="float32", quant_cache=tmp_path, progress=False, gpu_mem="16M",
                           max_kv_tokens=64)
    assert offl.stats()["cache"]["capacity_experts"] < 96
    assert torch.equal(offl.logits(ids), want)
    offl.close()
    dev, dt = torch.device("cpu"), torch.float32
    src = quantized_experts(ckpt, settings, tmp_path, progress=False)
    plan = make_plan(ckpt.spec, dev, dt, non_expert_bytes(ckpt, dt), 64 << 20, None, expert_bytes=src.max_expert_bytes)
    quotas = [2 if q else 0 for q in plan.quotas]
    plan = dataclasses.replace(plan, quotas=quotas, device_slots=sum(quotas), host_slots=plan.total_experts)
    assert measure_cpu_flops(src.layout, dt) > 0
    for host_compute in (True, False):
        host = HostTier(src, plan, torch.uint8, dev, pinned=False, progress=False)
        cost = CostModel(h2d_bytes_per_s=1.0 if host_compute else 1e30, cpu_flops_per_s=1e12)
        provider = OffloadedExperts(src, plan, torch.uint8, dev, make_policy("lru"), host=host, cost_model=cost)
        decoder = build_decoder(ckpt, dt, dev, progress=False)
        bind_experts(decoder, provider, src.layouts)
        engine = moe_engine.Engine(ckpt, decoder, provider, None, dev, dt)
        assert torch.allclose(engine.logits(ids), want, atol=1e-5, rtol=0)
        assert (provider.stats()["io"]["loads"] == 0) == host_compute
        provider.close()
    eng.close()


def test_cli_quant_flags(capsys, tmp_path):
    from moe_engine.cli import main
    args = ["generate", "--no-progress", "--device", "cpu", "--dtype", "float32", "--prompt", "def f(x):",
            "--max-new-tokens", "4", "--quant-cache", str(tmp_path)]
    assert main([*args, "--quant", "int4"]) == 0
    out, err = capsys.readouterr()
    eng = moe_engine.load(dtype="float32", quant="int4", quant_cache=tmp_path, progress=False)
    assert out == eng.generate("def f(x):", max_new_tokens=4, do_sample=False) + "\n"
    eng.close()
    for flags, words in [(["--quant", "int5"], "5-bit"), (["--quant", "mixed:1"], "cannot be met"),
                         (["--quant", "int4", "--quant-group", "100"], "--quant-group 100"),
                         (["--quant", "mixed:3", "--calibration", str(tmp_path / "none.txt")], "no such file")]:
        assert main([*args, *flags]) == 2
        assert words in capsys.readouterr().err


def test_bf16_quantized_decode_takes_the_fused_op_and_matches_its_twin(tmp_path):
    """A bf16 model with quantized experts of every width decodes through the decode ops' fused quantized call
    (one per layer); the reference quant kernel (the per-expert loop over the torch twins) gives the same tokens."""
    from moe_engine.model.expert_compute import ExpertLoop, FusedExperts
    from moe_engine.runtime.config import KernelConfig
    rng = np.random.default_rng(1)
    table = tuple(tuple(int(b) for b in rng.choice([2, 3, 4, 8], 16)) for _ in range(6))
    settings = QuantSettings("mixed", avg_bits=4.25, bits_table=table)
    kw = dict(quant=settings, dtype="bfloat16", quant_cache=tmp_path, progress=False)
    fast = moe_engine.load(**kw)
    twin = moe_engine.load(**kw, kernels=KernelConfig(quant="reference"))
    blocks = list(fast.decoder.moe_blocks())
    fused = moe_engine._ops.HAS_C_EXT
    assert all(isinstance(b.experts, FusedExperts if fused else ExpertLoop) for b in blocks)
    assert all(isinstance(b.experts, ExpertLoop) for b in twin.decoder.moe_blocks())
    prompt = torch.randint(3, 4000, (1, 12), generator=torch.Generator().manual_seed(2))
    a = fast.generate(prompt, max_new_tokens=12)
    b = twin.generate(prompt, max_new_tokens=12)
    assert (a == b).float().mean().item() >= 0.9          # bf16: near-ties may round apart late in the text
    assert torch.equal(a[:, :18], b[:, :18])
    fast.close()
    twin.close()
