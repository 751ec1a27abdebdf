"""Per-sequence logits processing before the choice, and the log-probabilities the API reports.

    raw logits [V] --logprobs------> log_softmax (float32) -> the chosen token's logprob + the k most likely
                   --LogitsState--> allowed ids -> min_tokens (eos / stop ids masked) -> logit_bias
                                    -> repetition penalty (prompt + generated ids)
                                    -> presence / frequency penalties (generated ids)
                                    -> grammar mask (a TokenConstraint, runtime/grammar.py)
                   -> sampling.py: greedy argmax, or temperature / top-k / top-p / min-p and a draw

The order is vLLM's (allowed ids, min_tokens, logit_bias, then the penalties). Logprobs are the model's own:
log-softmax of the raw logits, before any processing, temperature or filter (vLLM's default, "raw_logprobs"),
so a logprob always equals log_softmax(Engine.logits(...)) at that position. Knows nothing of text.
"""
from __future__ import annotations

import torch

from .sampling import SamplingParams

# one reported position: (token id, its logprob, [(id, logprob) of the k most likely, most likely first])
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


def logprob_entry(raw: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """raw logits [V] -> the logprob of `token` and the k most likely ids with theirs."""
    lsm = torch.log_softmax(raw.float(), dim=-1)                              # [V]
    top = torch.topk(lsm, min(k, lsm.numel())) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return token, float(lsm[token]), pairs


class LogitsState:
    """What one sequence's processors remember: which ids it has seen (repetition), how often it generated each
    (presence / frequency), the fixed masks and biases. process() changes a [1, V] row of logits."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt: list[int], stop_ids: set[int]):
        self.params, self.vocab = params, vocab_size
        self.generated = 0
        self.seen = self.counts = self.bias = self.blocked = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)             # [V] prompt + generated ids
            self.seen[torch.tensor(prompt, dtype=torch.long)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size)                             # [V] generated occurrences
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)
            self.bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(values))
        if params.allowed_token_ids is not None:
            self.blocked = torch.ones(vocab_size, dtype=torch.bool)           # [V] True = may not be generated
            self.blocked[torch.tensor(params.allowed_token_ids, dtype=torch.long)] = False
        self.stop_ids = torch.tensor(sorted(i for i in stop_ids if i < vocab_size), dtype=torch.long)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """[1, V] float32 logits -> processed [1, V] (a new tensor; the input is not changed)."""
        p, out = self.params, logits.float().clone()
        if self.blocked is not None:
            out[0, self.blocked] = float("-inf")
        if self.generated < p.min_tokens and self.stop_ids.numel():
            out[0, self.stop_ids] = float("-inf")
        if self.bias is not None:
            out[0, self.bias[0]] += self.bias[1]
        if self.seen is not None:
            picked = out[0, self.seen]
            out[0, self.seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if self.counts is not None:
            out[0] -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()
        return out

    def accept(self, token: int) -> None:
        self.generated += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def process_reference(logits: torch.Tensor, params: SamplingParams, prompt: list[int], generated: list[int],
                      stop_ids: set[int]) -> torch.Tensor:
    """The slow twin of LogitsState.process: every rule from the whole history, one token at a time. [V] -> [V]."""
    out = [float(x) for x in logits.float().tolist()]
    allowed = set(params.allowed_token_ids) if params.allowed_token_ids is not None else None
    for i in range(len(out)):
        if allowed is not None and i not in allowed:
            out[i] = float("-inf")
        if len(generated) < params.min_tokens and i in stop_ids:
            out[i] = float("-inf")
    for token, bias in params.logit_bias:
        out[token] += bias
    if params.repetition_penalty != 1.0:
        for token in set(prompt) | set(generated):
            out[token] = out[token] * params.repetition_penalty if out[token] < 0 else out[token] / params.repetition_penalty
    for token in set(generated):
        out[token] -= params.frequency_penalty * generated.count(token) + params.presence_penalty
    return torch.tensor(out)


__all__ = ["LogitsState", "TokenLogprob", "logprob_entry", "process_reference"]
