"""A tiny random Mixtral checkpoint that carries a real tokenizer (byte-level BPE with a chat template).

The tokenizer is trained by bench/make_checkpoint.py's train_tokenizer (under a second); the model is
float32 with the conftest BASE shape except the vocabulary, which matches the tokenizer's. Written
once per test session (a module-level cache, since several test modules use it) and shared read-only:
tests that need to change a file copy the directory first (`copy_checkpoint`).
"""
from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import torch
import transformers as tf

from conftest import BASE

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384          # 256 byte symbols + 7 specials + merges
CONTEXT = 64         # max_position_embeddings: small, so prompt-too-long tests stay cheap
_made: dict[str, Path] = {}


def _make_checkpoint_module():
    spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "bench" / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tokenized_checkpoint(path: Path, seed: int = 0) -> Path:
    """Tokenizer files + a random float32 Mixtral (vocab = tokenizer size) in `path`."""
    _make_checkpoint_module().train_tokenizer(path, VOCAB)
    cfg = tf.MixtralConfig(**{**BASE, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT},
                           intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    model = tf.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():   # larger weights than the 0.02 init, so greedy text does not repeat one token
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5 if name.endswith("gate.weight") else 0.15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


def tokenized_checkpoint(tmp_path_factory) -> Path:
    """The session's tokenizer-bearing checkpoint (written on first use)."""
    if "main" not in _made:
        _made["main"] = write_tokenized_checkpoint(tmp_path_factory.mktemp("tokenized"))
    return _made["main"]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint directory that a test may edit."""
    shutil.copytree(src, dst)
    return dst
