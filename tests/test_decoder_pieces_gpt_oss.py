"""GPT-OSS / Granite decoder pieces against slow, obvious twins: attention sinks through SDPA (an extra
zero key whose mask value is the sink), the clamped SwiGLU, the packed expert layout with biases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_engine.model.attention import with_sink
from moe_engine.model.decoder import attention_mask
from moe_engine.model.experts import ExpertLayout, expert_ffn, glu
from moe_engine.model.spec import ClampedSwiGlu


def sink_attention_slow(q, k, v, mask, sinks, scale):
    """Per batch row, head and query: softmax over [scores of visible keys, sink], sink share dropped."""
    b, h, t, dh = q.shape
    rep = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                keys = [s for s in range(k.shape[2]) if mask[bi, 0, ti, s]]
                scores = torch.stack([q[bi, hi, ti] @ k[bi, hi // rep, s] * scale for s in keys] + [sinks[hi]])
                p = torch.softmax(scores.double(), 0)[:-1].float()
                out[bi, hi, ti] = sum(w * v[bi, hi // rep, s] for w, s in zip(p, keys))
    return out


@pytest.mark.parametrize("b,h,hkv,t,s,window", [(1, 2, 2, 1, 5, None), (2, 4, 2, 3, 7, 2), (3, 4, 1, 6, 6, None)])
def test_sink_attention_matches_slow_twin(b, h, hkv, t, s, window):
    g = torch.Generator().manual_seed(b * 100 + t)
    q, k, v = (torch.randn(b, n, m, 8, generator=g) for n, m in ((h, t), (hkv, s), (hkv, s)))
    valid = torch.rand(b, s, generator=g) > 0.3                                  # padding slots anywhere
    mask = attention_mask(valid, s - t, t, window)                               # [B, 1, T, S] bool
    sinks = torch.randn(h, generator=g) * 2
    k2, v2, float_mask = with_sink(k, v, mask, sinks)
    assert k2.shape == (b, hkv, s + 1, 8) and float_mask.shape == (b, h, t, s + 1)
    got = F.scaled_dot_product_attention(q, k2, v2, attn_mask=float_mask, scale=0.3, enable_gqa=h != hkv)
    assert torch.allclose(got, sink_attention_slow(q, k, v, mask, sinks, 0.3), atol=1e-5)


def test_clamped_swiglu_is_the_gpt_oss_formula():
    gate, up = torch.linspace(-9, 9, 37), torch.linspace(9, -9, 37)
    act = ClampedSwiGlu(alpha=1.702, limit=7.0)
    want = [(min(max(u, -7.0), 7.0) + 1) * min(g, 7.0) / (1 + torch.exp(torch.tensor(-1.702 * min(g, 7.0))))
            for g, u in zip(gate.tolist(), up.tolist())]
    assert torch.allclose(glu(gate, up, act), torch.stack(want).float(), atol=1e-5)
    assert torch.equal(glu(gate, up, "silu"), F.silu(gate) * up)


def test_layout_with_biases_packs_and_runs():
    d, i = 6, 4
    layout = ExpertLayout(d, i, bias=True)
    gate, up, down = torch.randn(i, d), torch.randn(i, d), torch.randn(d, i)
    biases = torch.randn(i), torch.randn(i), torch.randn(d)
    packed = layout.pack(gate, up, down, biases=biases)
    assert packed.numel() == layout.numel == 3 * d * i + 2 * i + d
    assert torch.equal(layout.down(packed), down) and torch.equal(layout.biases(packed)[1], biases[2])
    x = torch.randn(5, d)
    act = ClampedSwiGlu(alpha=1.2, limit=0.5)
    want = glu(x @ gate.T + biases[0], x @ up.T + biases[1], act) @ down.T + biases[2]
    assert torch.allclose(expert_ffn(x, packed, layout, act), want, atol=1e-5)
    with pytest.raises(ValueError, match="packs 6 tensors, got 3"):
        layout.pack(gate, up, down)
