"""The bundled default model: loads with no arguments, matches transformers, generates sensible text."""
from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

import moe_engine
from conftest import load_hf
from moe_engine.cli import main
from moe_engine.runtime.load import DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def bundled():
    eng = moe_engine.load(device="cpu", dtype="float32", progress=False)
    yield eng
    eng.close()


def test_default_is_the_bundled_model_and_fits_the_size_bound(bundled):
    assert bundled.checkpoint.model_dir == DEFAULT_MODEL_DIR
    spec = bundled.spec
    assert spec.num_layers >= 6 and spec.moe.num_experts >= 16 and spec.moe.top_k >= 2
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 25 * 10**6
    for name in ("README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name


def test_bundled_matches_transformers(bundled):
    hf = load_hf(DEFAULT_MODEL_DIR)
    ids = torch.tensor([bundled.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")])
    with torch.no_grad():
        ref = hf(ids).logits
    assert (bundled.logits(ids) - ref).abs().max().item() < 1e-4
    ref_gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    assert torch.equal(bundled.generate(ids, max_new_tokens=32, do_sample=False), ref_gen)


def test_bundled_model_is_trained(bundled):
    """Perplexity on a held-out stdlib file: far below the unigram baseline (a random model is ~vocab size)."""
    card = json.loads((DEFAULT_MODEL_DIR / "card_stats.json").read_text())
    assert card["heldout_ppl"] < card["unigram_ppl"] / 4
    source = Path(sysconfig.get_paths()["stdlib"]) / "aifc.py"    # held out: every 20th file of the sorted corpus
    ids = torch.tensor([bundled.encode(source.read_text())[:512]])
    logits = bundled.logits(ids)[0, :-1]
    ppl = math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    assert ppl < card["unigram_ppl"] / 4, ppl


def test_cli_generate_uses_bundled_model(capsys):
    assert main(["generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "16", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip()) > 0 and "tokens/s" in out.err
