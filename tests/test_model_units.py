"""Pieces of the decoder against slow, obvious twins: MoE dispatch, masks, KV cache, packed experts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_engine.checkpoint import Checkpoint
from moe_engine.model.decoder import attention_mask
from moe_engine.model.expert_compute import ExpertLoop, dense_ffn
from moe_engine.model.experts import ExpertLayout, LayerFetch, expert_ffn
from moe_engine.model.moe import MoeBlock
from moe_engine.model.spec import MoeSpec
from moe_engine.runtime.kv_cache import SeqKV, StepKV


class DictSource:
    """Experts from a dict (an ExpertSource) that also observes routing; records the calls the MoE block makes."""

    buffers_stable = False

    def __init__(self, experts):
        self.experts, self.prepared, self.got = experts, [], []

    def fetch(self, layer, experts, counts):
        self.prepared.append(list(experts))
        order = [(e, False) for e in reversed(list(experts))]   # any order must give the same output
        return LayerFetch(order, self.get)

    def get(self, expert):
        self.got.append(expert)
        return self.experts[expert]

    def begin_step(self, token_ids, seq_ids):
        pass

    def observe(self, layer, router_input, experts, weights):
        self.observed = (experts.clone(), weights.clone())


def naive_moe(x, router_w, experts, layout, top_k, normalize):
    """Token by token, expert by expert: the definition of the routed MoE output."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = torch.softmax(x[n] @ router_w.T, dim=-1)
        w, ids = probs.topk(top_k)
        if normalize:
            w = w / w.sum()
        for weight, e in zip(w, ids.tolist()):
            gate, up = layout.gate_up(experts[e]).split(layout.intermediate_size)
            h = F.silu(gate @ x[n]) * (up @ x[n])
            out[n] += weight * (layout.down(experts[e]) @ h)
    return out


@pytest.mark.parametrize("n,e,k,d,i,normalize", [
    (1, 4, 1, 8, 12, True), (1, 8, 2, 16, 8, False), (7, 4, 2, 8, 12, True),
    (33, 16, 4, 16, 24, False), (64, 6, 6, 8, 4, True),
])
def test_moe_dispatch_matches_naive(n, e, k, d, i, normalize):
    torch.manual_seed(n * 100 + e)
    layout = ExpertLayout(d, i)
    experts = {j: torch.randn(layout.numel) * 0.3 for j in range(e)}
    block = MoeBlock(0, d, MoeSpec(num_experts=e, top_k=k, intermediate_size=i, norm_topk_prob=normalize), "silu")
    torch.nn.init.normal_(block.router.weight, std=1.0)
    source = DictSource(experts)
    block.experts = ExpertLoop(source, e, dense_ffn(block.layout, block.act))
    block.observers.add(source)
    x = torch.randn(n, d)
    with torch.no_grad():
        got = block(x)
        ref = naive_moe(x, block.router.weight, experts, layout, k, normalize)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    used = sorted(set(source.observed[0].flatten().tolist()))
    assert source.prepared == [used]           # every used expert announced once, before any is taken
    assert source.got == used[::-1]             # taken exactly once, in the order fetch gave


def test_expert_layout_pack_roundtrip_and_ffn():
    layout = ExpertLayout(6, 10)
    gate, up, down = torch.randn(10, 6), torch.randn(10, 6), torch.randn(6, 10)
    packed = layout.pack(gate, up, down)
    assert packed.shape == (layout.numel,) and packed.is_contiguous()
    assert torch.equal(layout.gate_up(packed), torch.cat([gate, up]))
    assert torch.equal(layout.down(packed), down)
    x = torch.randn(3, 6)
    ref = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    assert torch.allclose(expert_ffn(x, packed, layout), ref, atol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_mask_matches_definition(window):
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    start, t = 5, 3
    mask = attention_mask(valid, start, t, window)
    assert mask.shape == (2, 1, t, 8)
    for b in range(2):
        for q in range(t):
            qs = start + q
            for s in range(8):
                expect = bool(valid[b, s]) and s <= qs and (window is None or qs - s < window)
                expect = expect or s == qs
                assert bool(mask[b, 0, q, s]) == expect, (b, q, s)


def test_step_kv_writes_each_sequence_and_reads_them_right_aligned():
    """Two sequences' caches through four steps (a left-padded prefill, decodes, a step one row sits out): each
    row reads exactly its own keys so far, right-aligned before the new slots; each cache keeps what was written."""
    seqs = [SeqKV(num_layers=2, kv_heads=1, head_dim=3, capacity=6, dtype=torch.float32, device="cpu")
            for _ in range(2)]
    written = [[], []]
    for new, t in [([2, 1], 2), ([1, 1], 1), ([1, 0], 1), ([1, 1], 1)]:
        mask = torch.zeros(2, t, dtype=torch.bool)
        for i, n in enumerate(new):
            mask[i, t - n:] = True
        kv = StepKV(seqs)
        start = kv.begin(mask)
        assert start == max(s.length for s in seqs)
        k = torch.randn(2, 1, t, 3)
        for i, n in enumerate(new):
            written[i].append(k[i, :, t - n:])
        k_all, v_all = kv.update(0, k, k + 1)
        assert k_all.shape[2] == start + t
        for i in range(2):
            real = kv.valid[i]                                                # [S + t] the row's real slots
            assert torch.equal(k_all[i, :, real], torch.cat(written[i], dim=1))
            assert torch.equal(v_all[i, :, real], k_all[i, :, real] + 1)
        kv.commit()
    assert [s.length for s in seqs] == [5, 3]
    assert torch.equal(seqs[0].k[0][:, :5], torch.cat(written[0], dim=1))
    one = StepKV(seqs[1:])                                                    # one row: its own cache, no copy
    one.begin(torch.ones(1, 1, dtype=torch.bool))
    k_new, v_new, k_all, _ = one.slots(0, 1)
    assert k_all.data_ptr() == seqs[1].k[0].data_ptr() and k_new.shape == (1, 1, 1, 3) and k_all.shape[2] == 4
    assert StepKV(seqs).slots(0, 1) is None
    with pytest.raises(ValueError, match="holds 6 tokens"):
        StepKV(seqs[:1]).begin(torch.ones(1, 2, dtype=torch.bool))           # 5 + 2 > 6


def test_expert_byte_ranges_hold_the_packed_expert(checkpoint_dir):
    """Reading the three byte ranges by hand gives the packed expert (what the offload tiers rely on)."""
    ckpt = Checkpoint(checkpoint_dir("mixtral-mha-window-sharded-bf16"))
    layer, expert = 1, 4
    raw = b""
    for info in ckpt.expert_infos(layer, expert):
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            raw += f.read(info.nbytes)
    by_hand = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16)
    assert torch.equal(ckpt.read_expert(layer, expert, torch.bfloat16), by_hand)
    assert torch.equal(ckpt.read_expert(layer, expert, torch.float32), by_hand.float())
    assert ckpt.expert_nbytes() == len(raw)
    ckpt.close()
