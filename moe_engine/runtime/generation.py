"""Driving the generation core on the caller's thread: generate() and stream() (the server drives it in loop.py).

    lockstep(core, seqs)    every sequence prefilled in one step, then one decode step over all that are still
                            running, until none is; yields each step's tokens (stream() shows them as they come)
    speculative_lockstep(core, drafter, seqs)   lockstep with drafts: after the prefill, verify steps over the
                            sequences still running (drafting.Drafter proposes, core.speculate verifies)
    scheduled(core, ...)    the Batcher (batching.py) with the server's schedule: at most max_batch sequences
                            per decode step, admission within the KV reserve, prompts fed in chunks within the
                            token budget, rows whose experts overlap grouped

Both return what they measured in a Timings (Engine.stats reports the last call's); the sequences hold
the tokens. Knows nothing of text.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from .batching import Batcher
from .core import GenerationCore, Sequence
from .drafting import Drafter


@dataclass
class Timings:
    """Wall-clock split of one generate call (for Engine.stats)."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    steps: int = 0
    step_s: list = field(default_factory=list)     # seconds between consecutive decode steps' tokens (TPOT samples)


def lockstep(core: GenerationCore, seqs: list[Sequence], timings: Timings) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each sequence (None for one that finished earlier)."""
    t0 = time.perf_counter()
    for s in seqs:
        core.start(s)
    logits = core.step(seqs)                                                    # [B, V]: the prefill
    timings.prompt_tokens += sum(s.prompt_len for s in seqs)
    live = [s for s in seqs if s.max_new > 0]
    logits = logits[[i for i, s in enumerate(seqs) if s.max_new > 0]]          # [B_live, V]
    first, t_prev, t_decode = True, t0, t0
    while live:
        tokens = core.sample(live, logits)
        now = time.perf_counter()
        if first:
            timings.prefill_s += now - t0
            timings.ttft_s = now - t0
            first, t_decode = False, now
        else:
            timings.step_s.append(now - t_prev)
        t_prev = now
        new = dict(zip((s.seq_id for s in live), tokens))
        for s, tok in zip(live, tokens):
            core.accept(s, tok)
        timings.steps += 1
        yield [new.get(s.seq_id) for s in seqs]
        live = [s for s in live if not s.done]
        if not live:
            break
        logits = core.step(live)
        timings.decode_tokens += len(live)
    if not first:
        timings.decode_s += time.perf_counter() - t_decode


def scheduled(core: GenerationCore, cache, seqs: list[Sequence], max_batch: int, scheduler: str,
              kv_tokens: int | None, timings: Timings, drafter=None) -> Batcher:
    """Every sequence to its end through the server's Batcher (admission, token budget and schedule), on this thread;
    with a drafter (drafting.py) each decode step verifies drafts. Returns the Batcher (its counters).

    No prefill time share here (vLLM's plain budget: each step's decode rows, then prompt chunks in what is left),
    so the schedule depends on token counts only and a rerun takes the same steps."""
    batcher = Batcher(core, cache, max_num_seqs=len(seqs), max_batch=max_batch, scheduler=scheduler,
                      kv_tokens=kv_tokens, drafter=drafter)
    for s in seqs:
        if s.max_new > 0:
            batcher.enqueue(s)
    t0 = time.perf_counter()
    observing = core.observing(batcher.observer) if batcher.observer is not None else contextlib.nullcontext()
    with observing:
        while batcher.waiting or batcher.running:
            plan = batcher.plan()
            if plan.chunks:
                _release_done(batcher, batcher.prefill(plan.chunks))
            if plan.decode:
                _release_done(batcher, batcher.decode(plan.decode))
    timings.prompt_tokens += batcher.prompt_tokens
    timings.decode_tokens += batcher.decode_tokens
    timings.steps += batcher.steps
    timings.decode_s += time.perf_counter() - t0
    return batcher


def _release_done(batcher: Batcher, tokens: list[tuple[Sequence, int]]) -> None:
    for seq, _ in tokens:
        if seq.done:
            batcher.release(seq)


def speculative_lockstep(core, drafter: Drafter, seqs, timings):
    """generate()'s lockstep with drafts: every sequence prefilled in one step, then verify steps over all that
    still run; yields, per step, each sequence's new tokens (a list, empty for one that finished earlier)."""
    t0 = time.perf_counter()
    for s in seqs:
        core.start(s)
    logits = core.step(seqs)
    timings.prompt_tokens += sum(s.prompt_len for s in seqs)
    live = [s for s in seqs if s.max_new > 0]
    first = dict(zip((s.seq_id for s in live), core.sample(live, logits[[i for i, s in enumerate(seqs)
                                                                         if s.max_new > 0]])))
    for s in live:
        core.accept(s, first[s.seq_id])
    timings.ttft_s = timings.prefill_s = time.perf_counter() - t0
    yield [[first[s.seq_id]] if s.seq_id in first else [] for s in seqs]
    t_decode, plain = time.perf_counter(), None
    while True:
        live = [s for s in seqs if not s.done]
        if not live:
            break
        drafts = drafter.propose(live)
        t = time.perf_counter()
        kept = core.speculate(live, drafts)
        took = time.perf_counter() - t
        if not any(drafts):
            plain = took if plain is None else 0.8 * plain + 0.2 * took
        else:
            drafter.timed(sum(len(d) + 1 for d in drafts), len(live), took, plain)
        drafter.steps += 1
        new = {}
        for s, d, toks in zip(live, drafts, kept):
            drafter.update(s, len(d), len(toks) - 1 if d else 0)
            new[s.seq_id] = []
            for tok in toks:
                if tok is not None:
                    new[s.seq_id].append(tok)
                if core.accept(s, tok):
                    break
        timings.steps += 1
        timings.decode_tokens += sum(len(v) for v in new.values())
        timings.step_s.append(took)
        yield [new.get(s.seq_id, []) for s in seqs]
    timings.decode_s += time.perf_counter() - t_decode
