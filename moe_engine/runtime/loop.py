"""The serving loop: one thread that owns the engine and drives the Batcher (batching.py) for the server.

    loop thread:  cancels -> Batcher.plan (admission, decode rows, prompt chunks within the token budget)
                  -> one prefill forward of the chunks -> one decode step -> each sequence's tokens through its
                  TextStream -> Event callbacks
    callers:      submit(Request) / cancel(id) / drain() / abort_all() / shutdown() / counters()
    metrics:      Event times (queue, first token, per-token gaps, end); on_step(prompt, generated) per iteration

The Batcher decides admission and each step's batch; this module adds what serving needs around it: a
queue fed from other threads, cancellation, draining, text events with stop-string hold-back, and
isolation of failures (a failure inside a step, e.g. an expert read error, ends the requests of that step
with an error event; the loop keeps serving the others). The Batcher's routing observer (its forecasts)
is registered with the engine while the loop runs and removed at shutdown; other observers stay.
"""
from __future__ import annotations

import collections
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .batching import Batcher
from .core import Sequence
from .drafting import Drafter
from .sampling import SamplingParams
from .textstream import TextStream

log = logging.getLogger("moe_engine")


class QueueFull(Exception):
    """More requests are waiting than the server queues; the client should retry later."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    on_event: Callable[[Event], None]                # called on the loop thread; must not block
    stop: list[str] = field(default_factory=list)
    eos_token_ids: set[int] | None = None            # None: the model's
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client: object = None                            # who sent it (fairness: --max-seqs-per-client); None: anonymous
    constraint: object | None = None                 # a grammar's TokenConstraint (runtime/grammar.py)
    keep_stop: bool = False                          # the text keeps the stop string that ended it
    skip_special_tokens: bool = True                 # special tokens left out of the text


@dataclass
class Event:
    request_id: str
    text: str                                        # new text since the previous event (stop strings cut)
    token_ids: list[int]                             # new token ids since the previous event
    finish_reason: str | None = None                 # "stop", "length", "abort", "error" on the last event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    ttft_s: float | None = None                      # on the last event: time to first token, end to end
    e2e_s: float | None = None
    queue_s: float | None = None                     # on the last event: submit -> admission (None: never admitted)
    itl_s: list[float] = field(default_factory=list)  # seconds between consecutive tokens, one per token after the first
    logprobs: list | None = None                     # per token of token_ids (core.TokenLogprob), when asked
    prompt_logprobs: list | None = None              # on the first event, when asked (the first entry is None)
    stop_reason: int | str | None = None             # on the last event: the eos / stop id or stop string that ended it


@dataclass(eq=False)
class _Served:
    """A request being served: its sequence in the core and what its events still owe the client."""
    req: Request
    seq: Sequence
    text: TextStream | None
    pending: list[int] = field(default_factory=list)    # token ids not yet sent in an event
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float | None = None
    t_first: float | None = None
    t_last: float | None = None                          # when its latest token came
    gaps: list[float] = field(default_factory=list)      # inter-token gaps not yet sent in an event
    logprobs_sent: int = 0                               # entries of seq.logprobs already sent
    prompt_logprobs_sent: bool = False


class EngineLoop:
    def __init__(self, engine, max_num_seqs: int = 16, max_batch: int | None = None, scheduler: str = "expert",
                 max_waiting: int | None = None, kv_tokens: int | None = None, prefill_share: float | None = 0.5,
                 **batching):
        """batching: the Batcher's options (max_num_batched_tokens, max_seqs_per_client, max_cold_experts, ...);
        prefill_share: the time prefill may take while sequences decode (PhaseGate; None: no limit). Speculative
        decoding is on when the engine was loaded with a speculative_config (--speculative-config), else off."""
        self.engine = engine
        self.max_waiting = max_waiting if max_waiting is not None else 8 * max_num_seqs
        plan_kv = engine.plan.kv_tokens if engine.plan is not None else None
        spec = engine.speculative_config
        self.drafter = Drafter(engine.core, engine.experts, spec) if spec is not None else None
        self.batcher = Batcher(engine.core, engine.experts, max_num_seqs, max_batch, scheduler,
                               kv_tokens or plan_kv, prefill_share=prefill_share, drafter=self.drafter, **batching)
        self.kv_tokens = self.batcher.kv_tokens
        self.served: dict[int, _Served] = {}            # seq id -> request, waiting or running
        self._cancel: set[str] = set()
        self._cond = threading.Condition()
        self._stop = self._draining = False
        self.on_step: Callable[[int, int], None] | None = None   # (prompt tokens, generated tokens) per iteration
        self._step_tokens = [0, 0]
        self._thread = threading.Thread(target=self._run, name="moe-engine-loop", daemon=True)

    # ---- callers' side --------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        if self.batcher.observer is not None:                # removed again at shutdown; other observers stay
            self.engine.observers.add(self.batcher.observer)
        self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        """Queue a request (its checks were done by the caller); raises QueueFull when the queue is full."""
        with self._cond:
            if self._draining or self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.batcher.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.batcher.waiting)} requests are already waiting (the queue holds "
                                f"{self.max_waiting}); retry later")
            if len(req.prompt_ids) + req.max_tokens > self.kv_tokens:
                raise ValueError(f"the prompt ({len(req.prompt_ids)} tokens) plus max_tokens ({req.max_tokens}) "
                                 f"needs more KV cache than the server reserves ({self.kv_tokens} tokens)")
            served = self._serve(req)
            self.served[served.seq.seq_id] = served
            self.batcher.enqueue(served.seq, req.client)
            self._cond.notify_all()

    def _serve(self, req: Request) -> _Served:
        eng = self.engine
        eos = req.eos_token_ids if req.eos_token_ids is not None else eng.eos_ids(None)
        decode = eng.text.decoder
        if decode is not None and not req.skip_special_tokens:
            decode = functools.partial(eng.text.decode, skip_special=False)
        seq = eng.core.sequence(req.prompt_ids, req.max_tokens, req.sampling, eos, req.stop, decode,
                                constraint=req.constraint, isolate=True, keep_stop=req.keep_stop)
        return _Served(req, seq, TextStream(decode, seq.stopper) if decode is not None else None)

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancel.add(request_id)
            self._cond.notify_all()

    def counters(self) -> dict:
        with self._cond:
            return self.batcher.counters()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting new requests; wait until every queued and running one has finished."""
        with self._cond:
            self._draining = True
            self._cond.notify()
            return self._cond.wait_for(lambda: not self.served, timeout)

    def abort_all(self, timeout: float | None = None) -> bool:
        """End every queued and running request with finish_reason "abort" (after the step in progress); wait
        until they have ended. False when some had not ended within `timeout` (the step was still running)."""
        with self._cond:
            self._cancel.update(s.req.request_id for s in self.served.values())
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self.served, timeout)

    def shutdown(self, timeout: float = 30) -> bool:
        """Stop the loop thread (requests still there end with "abort"); False when the thread was still in a step
        after `timeout` seconds (it then stops after that step, and keeps the engine's routing observer)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self.batcher.observer is not None:
            self.engine.observers.remove(self.batcher.observer)
        return True

    # ---- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        b = self.batcher
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self.served or self._cancel)
                if self._stop:
                    break
                cancels, self._cancel = self._cancel, set()
            self._apply_cancels(cancels)
            with self._cond:
                plan = b.plan()
            now = time.perf_counter()
            for s in plan.admitted:                            # a preempted one keeps its first admission time
                served = self.served[s.seq_id]
                served.t_admit = served.t_admit or now
            if plan.chunks:
                self._guarded([s for s, _ in plan.chunks],
                              lambda: self._send_tokens(b.prefill(plan.chunks), plan.prefill_tokens))
            if plan.decode:
                self._guarded(plan.decode, lambda: self._send_tokens(b.decode(plan.decode)))
            self._report_step()
            with self._cond:
                self._cond.notify_all()                       # drain() waiters
        for served in list(self.served.values()):
            self._finish(served, "abort")

    def _apply_cancels(self, ids: set[str]) -> None:
        if not ids:
            return
        with self._cond:
            gone = [s for s in self.served.values() if s.req.request_id in ids]
            for s in gone:
                if s.seq in self.batcher.waiting:
                    self.batcher.waiting.remove(s.seq)
        for s in gone:
            self._finish(s, "abort")

    def _guarded(self, seqs: list[Sequence], fn) -> None:
        try:
            fn()
        except Exception as e:   # noqa: BLE001 -- one failed step ends its requests, not the server
            log.exception("a step failed; ending its %d requests", len(seqs))
            for seq in seqs:
                served = self.served.get(seq.seq_id)
                if served is not None:
                    self._finish(served, "error", error=f"{type(e).__name__}: {e}")

    def _report_step(self) -> None:
        prompt, generated = self._step_tokens
        self._step_tokens = [0, 0]
        if self.on_step is not None and (prompt or generated):
            try:
                self.on_step(prompt, generated)
            except Exception:   # noqa: BLE001 -- a broken metrics hook must not stop the loop
                log.exception("the loop's on_step hook failed")

    # ---- events ---------------------------------------------------------------------------------
    def _send_tokens(self, tokens: list[tuple[Sequence, int]], prompt_tokens: int = 0) -> None:
        """A step's tokens in order (a verify step gives a sequence several; only its last may end it)."""
        now = time.perf_counter()
        self._step_tokens[0] += prompt_tokens
        self._step_tokens[1] += len(tokens)
        last = {seq.seq_id: i for i, (seq, _) in enumerate(tokens)}
        later = collections.Counter(seq.seq_id for seq, _ in tokens)     # a sequence's tokens still to send
        for i, (seq, token) in enumerate(tokens):
            s = self.served[seq.seq_id]
            ended = seq.done and i == last[seq.seq_id]
            later[seq.seq_id] -= 1
            if s.t_first is None:
                s.t_first = now
            else:
                s.gaps.append(now - s.t_last)
            s.t_last = now
            if token is None:                                  # ended without a token (error, or max_tokens 0)
                self._finish(s, "error" if seq.finish_reason == "error" else "length", error=seq.error)
                continue
            s.pending.append(token)
            delta = s.text.push(token, ended) if s.text is not None else ""
            if ended:
                self._finish(s, "stop" if seq.finish_reason in ("eos", "stop") else "length", text=delta)
                continue
            if delta or s.text is None:
                self._send(s, Event(s.req.request_id, delta, s.pending, None, seq.prompt_len,
                                    len(seq.generated) - later[seq.seq_id], itl_s=s.gaps))
                s.pending, s.gaps = [], []

    def _finish(self, s: _Served, reason: str, text: str = "", error: str | None = None) -> None:
        with self._cond:
            self.served.pop(s.seq.seq_id, None)
            self.batcher.release(s.seq)
        now = time.perf_counter()
        ttft = (s.t_first - s.t_submit) if s.t_first is not None else None
        queue = (s.t_admit - s.t_submit) if s.t_admit is not None else None
        self._send(s, Event(s.req.request_id, text, s.pending, reason, s.seq.prompt_len, len(s.seq.generated),
                            error, ttft, now - s.t_submit, queue, s.gaps))
        s.pending, s.gaps = [], []

    def _send(self, s: _Served, event: Event) -> None:
        seq = s.seq
        if seq.logprobs is not None:
            event.logprobs, s.logprobs_sent = seq.logprobs[s.logprobs_sent:], len(seq.logprobs)
        if (seq.prompt_logprobs is not None and not s.prompt_logprobs_sent
                and len(seq.prompt_logprobs) == seq.prompt_len):
            event.prompt_logprobs, s.prompt_logprobs_sent = seq.prompt_logprobs, True
        if event.finish_reason is not None and seq.finish_reason in ("eos", "stop"):
            event.stop_reason = seq.stopper.stop_reason(0)
        try:
            s.req.on_event(event)
        except Exception:   # noqa: BLE001 -- a broken consumer must not stop the loop
            log.exception("the event consumer of request %s failed", s.req.request_id)
            self.cancel(s.req.request_id)


__all__ = ["EngineLoop", "Event", "QueueFull", "Request"]
