"""Speculative decoding's pieces that know nothing of the model: the config, prompt-lookup drafting, verification.

    SpeculativeConfig.parse(json | dict)   vLLM's --speculative-config: {"method": "ngram" | "resident" |
                                           "draft_model", "num_speculative_tokens": K, ...}, checked once
    choose(call's value, engine's)         None: the engine's default (load's speculative_config); False: off
    propose_ngram(tokens, k, n_max, n_min) prompt lookup: the longest suffix n-gram (n_max down to n_min) seen
                                           before in the sequence -> the (up to) k tokens that followed it
    verify_greedy(logits [k+1, V], draft)  -> accepted draft prefix + the target's own next token
    verify_sampled(probs [k+1, V], draft, draft_probs [k, V] | None, generator)
                                           standard speculative rejection sampling (Leviathan et al. 2023,
                                           Chen et al. 2023): draft token i is kept with probability
                                           min(1, p_i(x) / q_i(x)); at the first rejection the token is drawn
                                           from norm(max(0, p_i - q_i)); when all k are kept a bonus token is
                                           drawn from p_k. A deterministic draft (prompt lookup) has q = one-hot.
                                           The output tokens are distributed exactly as sampling from p alone.

The generation core (core.py) feeds [last token, draft...] in one step, calls these on the step's logits and
rolls the KV cache back past the first rejection; the greedy path returns exactly the tokens plain greedy
decoding would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import ConfigError

METHODS = ("ngram", "resident", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int = 4          # K: the most tokens drafted per step
    prompt_lookup_max: int = 4               # ngram: longest suffix n-gram looked up
    prompt_lookup_min: int = 1               # ngram: shortest
    model: str | None = None                 # draft_model: its checkpoint directory
    adaptive: bool = True                    # draft length chosen per step by expected cost (else always K)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"speculative method {self.method!r} is unknown: use one of {', '.join(METHODS)} "
                              f"(--speculative-config)")
        for name, low in (("num_speculative_tokens", 1), ("prompt_lookup_max", 1), ("prompt_lookup_min", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"speculative {name}={value!r} is invalid: use an integer >= {low} "
                                  f"(--speculative-config)")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"speculative prompt_lookup_min={self.prompt_lookup_min} is more than "
                              f"prompt_lookup_max={self.prompt_lookup_max} (--speculative-config)")
        if (self.method == "draft_model") != (self.model is not None):
            raise ConfigError("speculative method draft_model needs \"model\": the draft checkpoint's directory; "
                              "the other methods take no model (--speculative-config)")
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"speculative adaptive={self.adaptive!r} is invalid: use true or false")

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """None, a SpeculativeConfig, a dict or its JSON text (vLLM's --speculative-config) -> the config."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ConfigError(f"--speculative-config is not valid JSON ({e}); e.g. "
                                  f"'{{\"method\": \"ngram\", \"num_speculative_tokens\": 4}}'") from None
        if not isinstance(value, dict) or "method" not in value:
            raise ConfigError(f"--speculative-config must be a JSON object with a \"method\" (ngram, resident or "
                              f"draft_model), got {value!r:.80}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"speculative config has unknown key {unknown[0]!r}; known: "
                              f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**value)


def choose(value, default: SpeculativeConfig | None) -> SpeculativeConfig | None:
    """A call's speculative_config against the engine's (load(speculative_config=...)): None -> the engine's;
    False -> no speculation for this call; a config, dict or JSON -> that one (checked by parse)."""
    if value is None:
        return default
    if value is False:
        return None
    return SpeculativeConfig.parse(value)


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Prompt lookup: for n from n_max down to n_min, find the latest earlier occurrence of the sequence's last n
    tokens; return up to k tokens that followed it ([] when no suffix recurs)."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n:]
        for start in range(size - n - 1, -1, -1):         # latest match first: the most recent context
            if tokens[start:start + n] == suffix:
                follow = tokens[start + n:start + n + k]
                if follow:
                    return follow
    return []


def verify_greedy(logits: torch.Tensor, draft: list[int]) -> list[int]:
    """logits [k+1, V] of a verify step (row i scores the token after draft[:i]) -> the tokens greedy decoding
    emits: the draft's longest prefix that matches the argmax, then the argmax at the first mismatch (or after
    the whole draft)."""
    best = logits.argmax(-1).tolist()                       # [k+1]
    out = []
    for i, token in enumerate(draft):
        if best[i] != token:
            break
        out.append(token)
    out.append(best[len(out)])
    return out


def verify_sampled(probs: torch.Tensor, draft: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None) -> list[int]:
    """probs [k+1, V]: the target's distributions (after the sampling filters) at each verify position;
    draft_probs [k, V]: the drafter's, or None for a deterministic draft (q = one-hot at the drafted token).
    Returns the kept draft prefix and one more token (a correction or the bonus), distributed as p."""
    out = []
    for i, token in enumerate(draft):
        p = probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        accept = min(1.0, float(p[token]) / q_token) if q_token > 0 else 0.0
        if float(torch.rand((), generator=generator)) < accept:
            out.append(token)
            continue
        residual = p.clone()
        if draft_probs is None:
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp(min=0)
        if float(residual.sum()) <= 0:                       # p and q agree: any draw from p is the same law
            residual = p
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
    return out


__all__ = ["METHODS", "SpeculativeConfig", "choose", "propose_ngram", "verify_greedy", "verify_sampled"]
