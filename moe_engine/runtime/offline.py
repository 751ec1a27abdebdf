"""Offline batches through the serving loop: `generate(prompts, max_batch=N)` with token rescheduling.

    prompts -> one Request each (row i samples with seed + i, as the padded batch does)
            -> EngineLoop(max_batch=N, scheduler=...) -> token ids per row, in prompt order

A list longer than one step's batch is not cut into fixed chunks: all rows are admitted as the
KV reserve allows and the same scheduler as the server (scheduling/) chooses which rows share each
decode step, so rows whose experts overlap run together. Tokens equal the padded-batch path's up
to floating-point reassociation (greedy ties may differ in bfloat16).
"""
from __future__ import annotations

import dataclasses
import threading

from ..errors import ConfigError, MoeEngineError


def generate_scheduled(engine, rows: list[list[int]], prep: dict, max_batch: int, scheduler: str,
                       timeout: float | None = None) -> list[list[int]]:
    """Token ids generated for each row (prep: Engine._prepare's checked arguments)."""
    from .batching import Request
    from .loop import EngineLoop
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch={max_batch!r} is invalid: use a positive integer (sequences per decode step)")
    if scheduler not in ("fifo", "expert"):
        raise ConfigError(f"scheduler={scheduler!r} is not known; use 'expert' or 'fifo'")
    params, stopper = prep["sampler"].params, prep["stopper"]
    new: list[list[int]] = [[] for _ in rows]
    errors: list[str] = []
    left, done, lock = [len(rows)], threading.Event(), threading.Lock()

    def collect(i: int):
        def on_event(ev) -> None:
            with lock:
                new[i].extend(ev.token_ids)
                if ev.finish_reason is not None:
                    if ev.error:
                        errors.append(f"row {i}: {ev.error}")
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return on_event
    loop = EngineLoop(engine, max_num_seqs=len(rows), max_batch=max_batch, scheduler=scheduler,
                      max_waiting=len(rows)).start()
    try:
        for i, (row, n) in enumerate(zip(rows, prep["max_new_tokens"])):
            seed = None if params.seed is None else params.seed + i
            if n == 0:
                left[0] -= 1
                continue
            loop.submit(Request(row, n, dataclasses.replace(params, seed=seed), collect(i),
                                stop=list(stopper.stop_strings), eos_token_ids=set(stopper.eos_token_ids)))
        if left[0] and not done.wait(timeout):
            raise MoeEngineError(f"generate(max_batch={max_batch}) timed out after {timeout} s")
    finally:
        loop.shutdown()
    if errors:
        raise MoeEngineError("generation failed: " + "; ".join(errors))
    for i, ids in enumerate(new):                    # the caller's stopper trims texts at stop strings
        for tok in ids:
            stopper.update(i, tok)
    return new
