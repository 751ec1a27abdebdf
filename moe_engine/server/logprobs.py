"""Log-probabilities in the shapes OpenAI's and vLLM's clients read.

    TokenLogprob entries (core: token id, logprob, [(id, logprob) of the k most likely])
      --completion()--> {"tokens", "token_logprobs", "top_logprobs", "text_offset"}       /v1/completions
      --chat()--------> {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]} /v1/chat/completions
      --prompt()------> [None, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]         vLLM's prompt_logprobs

Logprobs are the model's own (log-softmax of the raw logits; see runtime/logits_process.py). A token's text is
the tokenizer's decoding of that token alone (special tokens included), or "token_id:<id>" with
return_tokens_as_token_ids (vLLM's option) or when the model has no tokenizer. Knows nothing of HTTP.
"""
from __future__ import annotations

from collections.abc import Callable


class TokenText:
    """Token id -> the text clients see for it (cached: the same ids recur)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids or tokenizer is None
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if self.as_ids:
            return f"token_id:{token}"
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text


def completion(entries: list, text: Callable[[int], str], offset: int, k: int) -> tuple[dict, int]:
    """Entries (None for a prompt's first token) -> the completions logprobs object and the next text offset.
    top_logprobs holds the k most likely and the chosen token (up to k + 1, as OpenAI's)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        token, lp, top = entry
        piece = text(token)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if lp is None:                                   # a prompt's first token: nothing to condition on
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(lp)
        best = {text(i): v for i, v in top[:k]}
        best.setdefault(piece, lp)
        out["top_logprobs"].append(best)
    return out, offset


def chat(entries: list, text: Callable[[int], str], k: int) -> dict:
    """Generated entries -> {"content": [...]} with k alternatives per token (chat's top_logprobs)."""
    def one(token: int, lp: float) -> dict:
        piece = text(token)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}
    return {"content": [{**one(token, lp), "top_logprobs": [one(i, v) for i, v in top[:k]]}
                        for token, lp, top in entries]}


def prompt(entries: list, text: Callable[[int], str], k: int) -> list:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {id: {logprob, rank, decoded_token}} holding
    the prompt token and the k most likely. rank is 1-based among the k listed (None when outside them)."""
    out = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        token, lp, top = entry
        ranks = {i: r + 1 for r, (i, _) in enumerate(top)}
        row = {str(i): {"logprob": v, "rank": ranks[i], "decoded_token": text(i)} for i, v in top[:k]}
        row.setdefault(str(token), {"logprob": lp, "rank": ranks.get(token), "decoded_token": text(token)})
        out.append(row)
    return out


__all__ = ["TokenText", "chat", "completion", "prompt"]
