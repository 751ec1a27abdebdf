"""The token-id generation loop: left-padded batched prefill, then one decode step per token.

Knows nothing of text: token ids in, token ids out. Each yielded step carries the new token of
every row (None for a row that finished earlier); rows finish on eos / stop strings (via the
StopChecker) or at their token limit.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model.decoder import Decoder
from .kv_cache import KVCache
from .sampling import Sampler
from .stopping import StopChecker


@dataclass
class Timings:
    """Wall-clock split of one generate call (for Engine.stats)."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0
    finish_reasons: list = field(default_factory=list)
    step_s: list = field(default_factory=list)     # seconds between consecutive decode steps' tokens (TPOT samples)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts -> ids [B, T], token_mask [B, T] bool, positions [B, T] (0 at each row's first real token)."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, t - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, t - len(r):] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.inference_mode()
def generate_tokens(decoder: Decoder, rows: list[list[int]], max_new_tokens: list[int], sampler: Sampler,
                    stopper: StopChecker, pad_id: int, device, timings: Timings,
                    seq_ids: torch.Tensor | None = None) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each row (None once a row is done). seq_ids [B]: ids for predictors."""
    spec = decoder.spec
    t0 = time.perf_counter()
    ids, mask, positions = left_pad(rows, pad_id, device)
    b, t = ids.shape
    cache = KVCache.for_spec(spec, b, t + max(max_new_tokens), decoder.embed.weight.dtype, device)
    logits = decoder(ids, positions, cache, mask, last_only=True, seq_ids=seq_ids)[:, 0]          # [B, V]
    timings.prompt_tokens += int(mask.sum())
    active = [n > 0 for n in max_new_tokens]
    timings.finish_reasons = ["length"] * b
    produced = [0] * b
    next_pos = positions[:, -1] + 1                                              # [B]
    first, t_prev = True, t0
    while any(active):
        tokens = sampler(logits).tolist()
        now = time.perf_counter()
        if first:
            timings.prefill_s += now - t0
            timings.ttft_s = now - t0
            first, t_decode = False, now
        else:
            timings.step_s.append(now - t_prev)
        t_prev = now
        step = []
        for i in range(b):
            if not active[i]:
                step.append(None)
                continue
            step.append(tokens[i])
            produced[i] += 1
            if stopper.update(i, tokens[i]) or produced[i] >= max_new_tokens[i]:
                active[i] = False
                timings.finish_reasons[i] = stopper.reason(i) or "length"
        timings.steps += 1
        yield step
        if not any(active):
            break
        step_ids = torch.tensor([[tok if tok is not None else pad_id] for tok in step], device=device)
        step_mask = torch.tensor([[a] for a in active], device=device)
        logits = decoder(step_ids, next_pos[:, None], cache, step_mask, last_only=True, seq_ids=seq_ids)[:, 0]
        next_pos = next_pos + 1
        timings.decode_tokens += sum(active)
    if not first:
        timings.decode_s += time.perf_counter() - t_decode
