"""--quant-scope all: the dense matmul weights quantized like the experts (quant/dense.py).

The reference is the same model with only its experts quantized (--quant-scope experts): int8 dense weights
must leave the logits close and the greedy tokens mostly the same, every target matrix must be a QuantLinear
(and nothing else), the placement plan's non-expert bytes must be what the built decoder holds, and the
reference kernel must compute what the fast path does.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_engine
from conftest import write_checkpoint
from moe_engine.checkpoint import Checkpoint
from moe_engine.errors import ConfigError
from moe_engine.model.attention import Attention
from moe_engine.model.linear import Linear
from moe_engine.model.mla import MlaAttention
from moe_engine.model.moe import GatedMlp
from moe_engine.quant.dense import DenseQuant, QuantLinear, module_bytes
from moe_engine.quant.settings import parse_quant
from moe_engine.runtime.build import non_expert_bytes
from moe_engine.runtime.config import KernelConfig

PROMPTS = ["def fibonacci(n):", "Once upon a time", "import numpy as np", "The capital of France is"]

# tiny checkpoints (conftest) with sizes a group of 32 divides: plain attention + untied lm_head; shared experts,
# dense MLP layers and tied embeddings; multi-head latent attention with a dense first layer
FAMILIES = {
    "mixtral": dict(intermediate_size=64),
    "qwen2_moe-sparse-step-window": dict(moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "deepseek_v2-lite": dict(moe_intermediate_size=32, v_head_dim=8),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("quant-cache")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made = {}

    def get(case):
        if case not in made:
            made[case] = write_checkpoint(tmp_path_factory.mktemp(case), case, overrides=FAMILIES[case])
        return made[case]
    return get


def load(cache, model_dir=None, **kw):
    kw = {"dtype": "float32", "quant": "int8", "quant_cache": cache, "progress": False, **kw}
    return moe_engine.load(model_dir, **kw)


def test_int8_dense_weights_keep_logits_and_greedy_tokens(cache):
    ids = torch.randint(3, 4000, (2, 40), generator=torch.Generator().manual_seed(0))
    runs = {}
    for scope in ("experts", "all"):
        eng = load(cache, quant_scope=scope)
        runs[scope] = eng.logits(ids), [eng.generate(p, max_new_tokens=16, do_sample=False) for p in PROMPTS]
        assert eng.stats()["quant"]["scope"] == scope
        eng.close()
    (ref, ref_text), (got, got_text) = runs["experts"], runs["all"]
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert sum(a == b for a, b in zip(got_text, ref_text)) >= len(PROMPTS) - 1


@pytest.mark.parametrize("case", list(FAMILIES))
def test_every_target_is_quantized_and_routers_embeddings_are_not(case, family_dir, cache):
    eng = load(cache, family_dir(case), quant_group=32, quant_scope="all")
    dec = eng.decoder
    quantized = [m for m in dec.modules() if isinstance(m, QuantLinear)]
    routers = [b.router for b in dec.moe_blocks()] + [b.shared_gate for b in dec.moe_blocks() if b.shared_gate]
    assert routers and all(isinstance(r, Linear) and r.weight.dtype == torch.float32 for r in routers)
    # the only dense matmul weights left: routers and shared-expert gates (routing stays exact), and MLA's
    # kv_b_proj (read per head by the absorbed attention)
    dense = [m for m in dec.modules() if isinstance(m, nn.Linear)]
    assert {id(m) for m in dense} == {id(r) for r in routers} | {id(m.kv_b_proj) for m in dec.modules()
                                                                 if isinstance(m, MlaAttention)}
    assert isinstance(dec.embed, nn.Embedding) and dec.embed.weight.dtype == torch.float32
    assert isinstance(dec.lm_head, QuantLinear)
    for m in dec.modules():
        if isinstance(m, Attention):
            assert isinstance(m.qkv_proj, QuantLinear) and isinstance(m.o_proj, QuantLinear)
            assert not hasattr(m, "q_proj") and m.qkv_weight is None
            assert m.qkv_proj.out_features == (m.h + 2 * m.hkv) * m.dh
        elif isinstance(m, GatedMlp):
            assert all(isinstance(getattr(m, a), QuantLinear) for a in ("gate", "up", "down"))
    assert all(q.bits == 8 and q.group == 32 for q in quantized)
    kinds = {"shared": any(b.shared is not None for b in dec.moe_blocks()),
             "dense": any(hasattr(layer, "mlp") for layer in dec.layers)}
    if case.startswith("qwen2"):
        assert kinds == {"shared": True, "dense": True} and eng.spec.tie_word_embeddings
    stats = eng.stats()["quant"]
    assert stats["scope"] == "all" and stats["dense_bits"] == 8 and stats["dense_matrices"] == len(quantized)
    # the plan's non-expert bytes are what the built decoder holds (the experts are not in it)
    ckpt = Checkpoint(family_dir(case))
    qs = parse_quant("int8", 32, None, "all")
    assert module_bytes(dec) == non_expert_bytes(ckpt, torch.float32, qs) < non_expert_bytes(ckpt, torch.float32)
    ckpt.close()
    eng.close()


def test_non_expert_bytes_drop_with_the_width(family_dir, cache):
    ckpt = Checkpoint(family_dir("mixtral"))                  # untied lm_head: every dense matrix is replaced
    dense = non_expert_bytes(ckpt, torch.bfloat16)
    sizes = {q: non_expert_bytes(ckpt, torch.bfloat16, parse_quant(q, 32, None, "all")) for q in ("int8", "int4")}
    assert non_expert_bytes(ckpt, torch.bfloat16, parse_quant("int4", 32, None, "experts")) == dense
    assert sizes["int4"] < sizes["int8"] < dense
    ckpt.close()
    # tied lm_head (the bundled model): the embedding stays, lm_head's quantized copy is held beside it
    ckpt = Checkpoint(moe_engine.runtime.load.DEFAULT_MODEL_DIR)
    dense = non_expert_bytes(ckpt, torch.bfloat16)
    dq = DenseQuant.of(ckpt.spec, torch.bfloat16, parse_quant("int4", 64, None, "all"))
    lm_head = ckpt.spec.vocab_size * ckpt.spec.hidden_size * 2
    assert dq.freed_bytes == dq.dense_bytes - lm_head
    assert dq.non_expert_bytes(dense) == non_expert_bytes(ckpt, torch.bfloat16, parse_quant("int4", 64, None, "all"))
    assert "dense weights quantized to 4 bits" in dq.describe() and "tied" in dq.describe()
    ckpt.close()
    eng = load(cache, quant="int4", quant_scope="all", gpu_mem="40M")          # the plan takes the quantized size
    assert eng.plan.non_expert_bytes == non_expert_bytes(eng.checkpoint, torch.float32, parse_quant(
        "int4", 64, None, "all")) == module_bytes(eng.decoder) < non_expert_bytes(eng.checkpoint, torch.float32)
    eng.close()


def test_reference_kernel_matches_the_fast_path(cache):
    """Each quantized matrix computes the same with the reference kernel as with the fast one (float32, the same
    inputs); end to end the tokens agree (float rounding may flip a near-tie of the routing, so not the logits)."""
    ids = torch.randint(3, 4000, (1, 24), generator=torch.Generator().manual_seed(1))
    seen = {}

    def record(module, inputs, output):
        seen.setdefault(module, (inputs[0].clone(), output.clone()))

    runs = {}
    for kernel in ("auto", "reference"):
        eng = load(cache, quant="int4", quant_scope="all", kernels=KernelConfig(quant=kernel))
        quantized = [q for q in eng.decoder.modules() if isinstance(q, QuantLinear)]
        assert quantized and all(q.kernel == kernel for q in quantized)
        if kernel == "auto":
            for q in quantized:
                q.register_forward_hook(record)
        runs[kernel] = eng.logits(ids), [eng.generate(p, max_new_tokens=8, do_sample=False) for p in PROMPTS[:2]]
        if kernel == "auto":
            assert len(seen) == len(quantized)
            with torch.inference_mode():
                for q, (x, y) in seen.items():
                    q.kernel = "reference"
                    torch.testing.assert_close(q(x), y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
                    q.kernel = "auto"
        eng.close()
    (fast, fast_text), (ref, ref_text) = runs["auto"], runs["reference"]
    assert (fast - ref).abs().max() < 0.1 * ref.abs().max()
    assert fast_text[0] == ref_text[0] or fast_text[1] == ref_text[1]


def test_bf16_decode_ops_run_the_quantized_qkv(cache):
    """bf16 on the CPU: one-token steps go through the decode ops with the quantized q|k|v in one call; the
    torch path (decode ops off) gives the same tokens."""
    texts = {}
    for ops in (True, False):
        eng = load(cache, dtype="bfloat16", quant_scope="all", kernels=KernelConfig(decode_ops=ops))
        texts[ops] = [eng.generate(p, max_new_tokens=16, do_sample=False) for p in PROMPTS[:2]]
        eng.close()
    assert texts[True] == texts[False]


def test_dense_width_of_each_setting():
    assert parse_quant("int3", None, None, "all").dense_bits == 3
    assert parse_quant("mixed:3", None, None, "all").dense_bits == 4
    assert parse_quant("mixed:5", None, None, "all").dense_bits == 8
    assert parse_quant("int4", None, None, None).scope == "experts"
    assert parse_quant(None, None, None, "experts") is None


def test_bad_scope_values_name_the_flag(cache, capsys):
    with pytest.raises(ConfigError, match=r"quant_scope all .*add quant int4 \(or int8\)"):
        moe_engine.load(quant_scope="all", progress=False)
    with pytest.raises(ConfigError, match=r"quant_scope='dense' is not recognized; use experts .* or all"):
        moe_engine.load(quant="int4", quant_scope="dense", progress=False)
    from moe_engine.cli import main
    args = ["generate", "--no-progress", "--device", "cpu", "--prompt", "x", "--max-new-tokens", "2"]
    assert main([*args, "--quant-scope", "all"]) == 2
    err = capsys.readouterr().err
    assert "--quant-scope" in err and "--quant int4" in err and len(err.strip().splitlines()) == 1


def test_group_must_divide_every_dense_matrix(tmp_path, cache):
    path = write_checkpoint(tmp_path / "m", "qwen2_moe", overrides=dict(moe_intermediate_size=32))
    moe_engine.load(path, quant="int4", quant_group=32, quant_cache=cache, progress=False).close()   # experts only
    with pytest.raises(ConfigError, match=r"quant_scope all quant_group=32: .*shared.down has 40 input columns"):
        moe_engine.load(path, quant="int4", quant_group=32, quant_scope="all", quant_cache=cache, progress=False)
