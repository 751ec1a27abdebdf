"""DeepSeek-V2/V3 and Phi-MoE beyond parity: routers against transformers' own over a grid, the compressed
MLA KV cache in the budget, offloading under a tight budget, continuous batching, int4 experts, bad configs."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.phimoe.modeling_phimoe import sparsemixer as hf_sparsemixer

import moe_engine
from conftest import BASE, write_checkpoint
from moe_engine.checkpoint import Checkpoint
from moe_engine.errors import CheckpointError, ConfigError
from moe_engine.experts.plan import kv_bytes_per_token
from moe_engine.model.mla import MlaAttention
from moe_engine.model.routing import select_experts, sparsemixer
from moe_engine.model.spec import MlaSpec, MoeSpec
from moe_engine.runtime.kv_cache import SeqKV

NEW_FAMILIES = ["deepseek_v2-qlora-grouped-yarn", "deepseek_v3", "phimoe-longrope-window-jitter"]
IDS = torch.randint(3, BASE["vocab_size"], (1, 14), generator=torch.Generator().manual_seed(7))


def _sorted(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row's (id, weight) pairs by id, so top-k outputs compare whatever their order."""
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


def _hf_router(cls, cfg: dict) -> torch.nn.Module:
    router = cls(type("Cfg", (), cfg)())
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.uniform_(-0.3, 0.3)
    return router


@pytest.mark.parametrize("experts,top_k,n_group,topk_group", [(8, 2, 1, 1), (8, 3, 4, 2), (16, 4, 4, 1), (12, 6, 3, 2)])
def test_v3_router_matches_transformers(experts, top_k, n_group, topk_group):
    cfg = dict(num_experts_per_tok=top_k, num_local_experts=experts, hidden_size=24, routed_scaling_factor=2.5,
               n_group=n_group, topk_group=topk_group, norm_topk_prob=True)
    hf = _hf_router(DeepseekV3TopkRouter, cfg)
    x = torch.randn(64, 24)
    _, want_w, want_ids = hf(x)
    spec = MoeSpec(experts, top_k, 8, True, scoring="sigmoid", n_group=n_group, topk_group=topk_group,
                   group_score_top=2, correction_bias=True)
    w, ids = select_experts(x @ hf.weight.T, spec, hf.e_score_correction_bias)
    w, ids = _sorted(w * 2.5, ids)
    want_w, want_ids = _sorted(want_w, want_ids)
    assert torch.equal(ids, want_ids) and torch.allclose(w, want_w, atol=1e-6)
    _, unbiased = _sorted(*select_experts(x @ hf.weight.T, spec, None))
    assert not torch.equal(unbiased, ids)              # the bias really changes the choice here


@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", None, None), ("group_limited_greedy", 4, 2),
                                                       ("group_limited_greedy", 8, 3)])
def test_v2_router_matches_transformers(method, n_group, topk_group):
    cfg = dict(num_experts_per_tok=3, num_experts=16, hidden_size=24, routed_scaling_factor=1.0,
               topk_method=method, n_group=n_group, topk_group=topk_group)
    hf = _hf_router(DeepseekV2TopkRouter, cfg)
    x = torch.randn(64, 24)
    _, want_w, want_ids = hf(x)
    spec = MoeSpec(16, 3, 8, False, n_group=n_group or 1, topk_group=topk_group or 1)
    w, ids = _sorted(*select_experts(x @ hf.weight.T, spec))
    want_w, want_ids = _sorted(want_w, want_ids)
    assert torch.equal(ids, want_ids) and torch.allclose(w, want_w, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.3, 1.0])
def test_sparsemixer_matches_transformers(eps):
    logits = torch.randn(256, 8) * 2
    want_w, want_ids = hf_sparsemixer(logits, jitter_eps=eps, training=False)
    w, ids = sparsemixer(logits, 2, eps)
    assert torch.equal(ids, want_ids) and torch.allclose(w, want_w, atol=1e-6)
    if eps >= 0.3:
        assert (w[:, 0] < 0.999).any()          # a wide margin really shares the softmax


def test_mla_kv_cache_holds_the_compressed_latent(checkpoint_dir):
    spec = Checkpoint(checkpoint_dir("deepseek_v3")).spec
    mla = spec.mla
    assert spec.kv_dims == (1, mla.kv_lora_rank, mla.qk_rope_head_dim)
    per_token = kv_bytes_per_token(spec, torch.float32)
    assert per_token == spec.num_layers * (mla.kv_lora_rank + mla.qk_rope_head_dim) * 4
    full = spec.num_layers * spec.num_heads * (mla.qk_head_dim + mla.v_head_dim) * 4
    assert per_token < full
    caches = [SeqKV.for_spec(spec, capacity=10, dtype=torch.float32, device="cpu") for _ in range(3)]
    assert sum(c.nbytes() for c in caches) == 3 * 10 * per_token


@pytest.mark.parametrize("heads,rank,dn,dr,dv,t,s", [(4, 16, 8, 4, 6, 1, 9), (2, 32, 16, 8, 16, 3, 20),
                                                     (8, 8, 4, 2, 12, 1, 1)])
def test_mla_absorbed_attention_equals_expanded(checkpoint_dir, heads, rank, dn, dr, dv, t, s):
    """The decode path (kv_b_proj folded into q and o) is the slow expanded path up to reassociation."""
    base = Checkpoint(checkpoint_dir("deepseek_v3")).spec
    mla = MlaSpec(kv_lora_rank=rank, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, q_lora_rank=None)
    spec = dataclasses.replace(base, num_heads=heads, num_kv_heads=heads, mla=mla)
    attn = MlaAttention(0, spec)
    g = torch.Generator().manual_seed(s)
    b = 2
    q_nope, q_pe = torch.randn(b, heads, t, dn, generator=g), torch.randn(b, heads, t, dr, generator=g)
    c_kv, k_pe = torch.randn(b, 1, s, rank, generator=g), torch.randn(b, 1, s, dr, generator=g)
    mask = torch.rand(b, 1, t, s, generator=g) > 0.3
    mask[..., -1] = True
    want = attn.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask)
    got = attn.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
    assert got.shape == (b, heads, t, dv) and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def _min_budget(path, **kw) -> int:
    with pytest.raises(ConfigError) as err:
        moe_engine.load(path, gpu_mem=1, **kw)
    return int(re.search(r"\((\d+) bytes\)", str(err.value)).group(1))


@pytest.mark.parametrize("case", NEW_FAMILIES)
def test_offloaded_under_budget_matches_resident(checkpoint_dir, case):
    path = checkpoint_dir(case)
    kw = dict(device="cpu", dtype="float32", progress=False, max_kv_tokens=64)
    ref = moe_engine.load(path, **kw)
    want = ref.logits(IDS), ref.generate(IDS[:, :6], max_new_tokens=10)
    ref.close()
    budget = _min_budget(path, **kw)
    eng = moe_engine.load(path, gpu_mem=budget, **kw)
    got = eng.logits(IDS), eng.generate(IDS[:, :6], max_new_tokens=10)
    stats = eng.stats()
    eng.close()
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=0) and torch.equal(got[1], want[1])
    total = len(eng.spec.moe_layers) * eng.spec.moe.num_experts
    assert stats["cache"]["capacity_experts"] < total and stats["io"]["loads"] > 0
    # memory under the budget is measured (peak RSS of a fresh process): test_hardening.py's test_measured_peak_*


@pytest.mark.parametrize("case", ["deepseek_v2-lite", "phimoe"])
def test_continuous_batching_matches_padded_batch(checkpoint_dir, case):
    """The serving loop's per-sequence caches (SeqKV/StepKV) hold MLA latents and Phi-MoE's KV alike."""
    eng = moe_engine.load(checkpoint_dir(case), device="cpu", dtype="float32", progress=False)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[2, :7] = 0
    want = eng.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    got = eng.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[], max_batch=2)
    eng.close()
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["deepseek_v3", "phimoe"])
def test_int4_experts_match_dequantized_transformers(tmp_path, case):
    import transformers as tf
    from test_quant import dequantized_copy
    wide = {"hidden_size": 64, "moe_intermediate_size": 32} if case.startswith("deepseek") else \
        {"hidden_size": 64, "intermediate_size": 32}
    path = write_checkpoint(tmp_path / "ckpt", case, overrides=wide)
    eng = moe_engine.load(path, dtype="float32", quant="int4", quant_group=32, quant_cache=tmp_path / "q",
                          progress=False)
    ref_dir = dequantized_copy(path, tmp_path / "ref", eng.stats()["quant"])
    hf = tf.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(IDS).logits
    got = eng.logits(IDS)
    eng.close()
    assert (got - want).abs().max().item() < 1e-4


def _edit_config(path, **changes) -> None:
    cfg_path = path / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **changes}))


@pytest.mark.parametrize("case,changes,needles", [
    ("deepseek_v2-lite", {"topk_method": "noaux_tc"}, ("noaux_tc", "greedy, group_limited_greedy")),
    ("deepseek_v3", {"topk_method": "greedy"}, ("greedy", "supported: noaux_tc")),
    ("phimoe", {"num_experts_per_tok": 3}, ("num_experts_per_tok=3", "set it to 2")),
])
def test_unsupported_settings_name_the_fix(tmp_path, case, changes, needles):
    path = write_checkpoint(tmp_path, case)
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError) as err:
        moe_engine.load(path, progress=False)
    assert all(n in str(err.value) for n in needles), str(err.value)


@pytest.mark.parametrize("case", ["mixtral-mha-window-sharded-bf16", "gpt_oss-gqa-layer-types-sharded-bf16"])
def test_bf16_serving_steps_read_each_cache_in_place(checkpoint_dir, case, monkeypatch):
    """bf16 on the CPU, sliding windows and attention sinks: the loop's decode steps attend over each sequence's own
    cache (StepKV.rows) and give the padded batch's tokens."""
    eng = moe_engine.load(checkpoint_dir(case), device="cpu", dtype="bfloat16", progress=False)
    if eng.decoder.layers[0].attn.ops is None:
        pytest.skip("no decode ops (moe_engine._C not loaded)")
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[2, :7] = 0
    want = eng.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    from moe_engine.runtime import kv_cache
    rows, calls = kv_cache.StepKV.rows, []
    monkeypatch.setattr(kv_cache.StepKV, "rows", lambda self, *a: calls.append(1) or rows(self, *a))
    got = eng.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], max_batch=2)
    eng.close()
    assert calls and torch.equal(got, want)
