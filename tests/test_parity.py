"""The engine against transformers on the same checkpoint: float32 logits and greedy tokens, every family/shape."""
from __future__ import annotations

import pytest
import torch

import moe_engine
from conftest import CASES, load_hf

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, checkpoint_dir):
    """(engine, transformers model) of one case, both float32."""
    path = checkpoint_dir(request.param)
    eng = moe_engine.load(path, device="cpu", dtype="float32", progress=False)
    yield eng, load_hf(path)
    eng.close()


def batch_with_padding(vocab: int, lengths: list[int], side: str, seed: int = 0):
    """Random ids [B, T] and attention_mask with padding on `side` (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(t - n, t) if side == "left" else slice(0, n)
        ids[i, cols] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, cols] = 1
    return ids, mask


def test_logits_match_single(pair):
    eng, hf = pair
    ids = torch.randint(3, eng.spec.vocab_size, (1, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    got = eng.logits(ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() < ATOL


def test_logits_match_left_padded_batch(pair):
    eng, hf = pair
    ids, mask = batch_with_padding(eng.spec.vocab_size, [13, 5, 9], "left")
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    got = eng.logits(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max().item() < ATOL


def test_right_padding_equals_unpadded_rows(pair):
    """Right padding: each row's real positions get the logits of that row run alone."""
    eng, hf = pair
    ids, mask = batch_with_padding(eng.spec.vocab_size, [4, 11], "right", seed=2)
    got = eng.logits(ids, attention_mask=mask)
    for i, n in enumerate([4, 11]):
        with torch.no_grad():
            ref = hf(ids[i:i + 1, :n]).logits[0]
        assert (got[i, :n] - ref).abs().max().item() < ATOL


def test_greedy_generation_matches_single(pair):
    eng, hf = pair
    ids = torch.randint(3, eng.spec.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    got = eng.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(got, ref)


def test_greedy_generation_matches_padded_batch(pair):
    eng, hf = pair
    ids, mask = batch_with_padding(eng.spec.vocab_size, [9, 3, 6], "left", seed=4)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    got = eng.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(got, ref)


def test_batch_rows_equal_single_runs(pair):
    """A padded batch gives each row the tokens that row gets alone (no cross-row leakage)."""
    eng, _ = pair
    ids, mask = batch_with_padding(eng.spec.vocab_size, [8, 2], "left", seed=5)
    batch = eng.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    for i, n in enumerate([8, 2]):
        alone = eng.generate(ids[i, -n:], max_new_tokens=12, eos_token_id=[])
        assert torch.equal(batch[i, -12:], alone[-12:])
