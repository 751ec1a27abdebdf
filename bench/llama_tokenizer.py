"""Write a synthetic Llama-2-style (SPM-like BPE w/ byte fallback) tokenizer with exactly 32000 tokens."""
import json
import string
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers
from tokenizers.models import BPE

out = Path(sys.argv[1])
N = 32000
vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for b in range(256):
    vocab[f"<0x{b:02X}>"] = len(vocab)
chars = ["\u2581"] + [c for c in string.ascii_letters + string.digits + string.punctuation]
for c in chars:
    vocab[c] = len(vocab)
merges = []


def add(a, b):
    t = a + b
    if t in vocab or len(vocab) >= N:
        return
    vocab[t] = len(vocab)
    merges.append((a, b))


pairs = [a + b for a in chars for b in chars]
for a in chars:
    for b in chars:
        add(a, b)
for p in pairs:
    for c in chars:
        add(p, c)
        if len(vocab) >= N:
            break
    if len(vocab) >= N:
        break
assert len(vocab) == N, len(vocab)
tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
assert tok.get_vocab_size() == N
tok.save(str(out / "tokenizer.json"))
cfg = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
       "add_bos_token": True, "add_eos_token": False, "add_prefix_space": None, "legacy": False,
       "model_max_length": 4096, "clean_up_tokenization_spaces": False}
(out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
(out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
print("ok", tok.get_vocab_size(), tok.encode("Hello world!\n").tokens)
