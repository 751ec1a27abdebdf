"""What generate() accepts and returns, on top of token ids: text through the tokenizer, transformers' tensors.

    TextCodec                 the tokenizer (or none): encode(text, chat), decode(ids); a clear error when text
                              or chat is asked of a model without a tokenizer or a chat template
    prompt_rows(prompt, ...)  str | list[str] | LongTensor [B, T] (+ attention_mask) -> rows of ids and the kind
    tensor_output(...)        transformers' convention for tensor input: prompt + new ids, padded with pad_id
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, TokenizerError


class TextCodec:
    def __init__(self, tokenizer, model_dir: Path):
        self.tokenizer, self.model_dir = tokenizer, model_dir

    def require(self, what: str):
        if self.tokenizer is None:
            raise TokenizerError(f"{what} needs a tokenizer, but {self.model_dir} has no tokenizer files "
                                 f"(tokenizer.json / tokenizer_config.json); pass token ids (a LongTensor) instead")
        return self.tokenizer

    def encode(self, text: str, chat: bool = False) -> list[int]:
        tok = self.require("text input")
        if not isinstance(text, str):
            raise ConfigError(f"prompt must be a str, a list of str or a LongTensor of token ids, got "
                              f"{type(text).__name__}")
        if chat:
            if not getattr(tok, "chat_template", None):
                raise TokenizerError(f"--chat needs a chat template, but the tokenizer in {self.model_dir} has none "
                                     f"(tokenizer_config.json 'chat_template'); drop --chat or add a template")
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.require("text output").decode(ids, skip_special_tokens=skip_special)

    @property
    def decoder(self):
        """`decode`, or None without a tokenizer (stop strings are then refused)."""
        return self.decode if self.tokenizer is not None else None


def prompt_rows(codec: TextCodec, prompt, attention_mask, chat: bool) -> tuple[list[list[int]], str]:
    """(rows of token ids, kind): kind "str" (one text), "list" (texts) or "tensor" (ids, padding dropped)."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt[None]
        if ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise ConfigError(f"token-id input must be an integer tensor, got {ids.dtype}")
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}")
        return [row[m].tolist() for row, m in zip(ids, mask)], "tensor"
    if isinstance(prompt, str):
        return [codec.encode(prompt, chat)], "str"
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return [codec.encode(p, chat) for p in prompt], "list"
    raise ConfigError(f"prompt must be a str, a non-empty list of str or a LongTensor of token ids, "
                      f"got {type(prompt).__name__}")


def tensor_output(prompt: torch.Tensor, new: list[list[int]], pad_id: int) -> torch.Tensor:
    """Prompt ids [B, T] (or [T]) + each row's new ids, right-padded with pad_id to the longest."""
    ids = prompt if prompt.dim() == 2 else prompt[None]
    width = max(len(n) for n in new)
    tail = torch.full((len(new), width), pad_id, dtype=ids.dtype)
    for i, n in enumerate(new):
        tail[i, : len(n)] = torch.tensor(n, dtype=ids.dtype)
    out = torch.cat([ids.cpu(), tail], dim=1)
    return out if prompt.dim() == 2 else out[0]
