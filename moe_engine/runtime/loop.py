"""The serving loop: one thread that owns the engine and runs continuous batching (see batching.py).

    loop thread:  cancels -> admit + prefill (one per iteration while others decode) -> one decode step
    callers:      submit(Request) / cancel(id) / drain() / shutdown() / counters()

Admission needs a seat (`max_num_seqs`) and KV reserve (prompt + max_tokens of every admitted
sequence <= `kv_tokens`). A decode step runs at most `max_batch` sequences, chosen by the
scheduler (`scheduling/`: "fifo" = in order of readiness, round robin; "expert" = the ExpertFlow-style
rescheduler, which forecasts each sequence's next experts from its next token id, see
batching.PathRecorder, and passes nobody over more than `max_wait_steps` steps). With "expert" the
schedule also steers the cache and admission: the expert cache is told the experts of the group the
scheduler would pick next (evicted last), and admission may wait up to `prefill_wait` steps so that
prompts are prefilled together (a prompt touches most experts of every layer). A failure
inside a step (e.g. an expert read error) ends the requests of that step with an error event;
the loop keeps serving the others.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import torch

from .batching import Event, PathRecorder, QueueFull, Request, SeqKV, StepKV, _Seq
from .detokenize import IncrementalText
from .sampling import Sampler
from .stopping import StopChecker, normalize_stop

log = logging.getLogger("moe_engine")


class EngineLoop:
    def __init__(self, engine, max_num_seqs: int = 16, max_batch: int | None = None, scheduler: str = "expert",
                 max_waiting: int | None = None, kv_tokens: int | None = None, max_wait_steps: int | None = None,
                 max_prefill: int = 4, miss_weight: float = 2.0, schedule_aware_eviction: bool = True,
                 prefill_wait: int | None = None):
        from scheduling import make_scheduler
        self.engine = engine
        self.max_num_seqs = max_num_seqs
        self.max_batch = max_batch or max_num_seqs
        self.max_prefill = max_prefill            # waiting requests prefilled together in one step
        self.schedule_aware_eviction = schedule_aware_eviction   # cache keeps the next group's forecast experts
        self._held = 0                            # steps admission has been held for a fuller prefill group
        self.max_waiting = max_waiting if max_waiting is not None else 8 * max_num_seqs
        plan_kv = engine.plan.kv_tokens if engine.plan is not None else None
        self.kv_tokens = kv_tokens or plan_kv or max_num_seqs * engine.max_context
        self.scheduler_name = scheduler
        if max_wait_steps is None:          # 4x the round-robin period (>= 1x - 1, so the bound can always hold)
            max_wait_steps = 4 * -(-max_num_seqs // self.max_batch) - 1
        self.scheduler = make_scheduler(scheduler, max_wait=max_wait_steps, miss_weight=miss_weight) \
            if scheduler != "fifo" else make_scheduler("fifo")
        if prefill_wait is None:                  # expert-aware scheduling also groups prefills; FIFO admits at once
            prefill_wait = 0 if scheduler == "fifo" else max_wait_steps
        self.prefill_wait = prefill_wait
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: dict[int, _Seq] = {}
        self.kv_reserved = 0
        self._cancel: set[str] = set()
        self._cond = threading.Condition()
        self._arrivals = itertools.count()
        self._stop = False
        self._draining = False
        self.steps = 0
        self.prefills = 0                         # prefill steps (each prefills up to max_prefill prompts)
        self.decode_tokens = 0
        self.prompt_tokens = 0
        spec = engine.spec
        self.recorder = PathRecorder(spec.moe_layers, spec.vocab_size, spec.moe.num_experts, spec.moe.top_k)
        self._thread = threading.Thread(target=self._run, name="moe-engine-loop", daemon=True)

    # ---- callers' side --------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        self.engine.observers.add(self.recorder)         # removed again at shutdown; other observers stay
        self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        """Queue a request (its checks were done by the caller); raises QueueFull when the queue is full."""
        with self._cond:
            if self._draining or self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the queue holds "
                                f"{self.max_waiting}); retry later")
            if len(req.prompt_ids) + req.max_tokens > self.kv_tokens:
                raise ValueError(f"the prompt ({len(req.prompt_ids)} tokens) plus max_tokens ({req.max_tokens}) "
                                 f"needs more KV cache than the server reserves ({self.kv_tokens} tokens)")
            self.waiting.append(_Seq(req, self.engine._new_seq_ids(1).item(), next(self._arrivals)))
            self._cond.notify_all()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancel.add(request_id)
            self._cond.notify_all()

    def counters(self) -> dict:
        with self._cond:
            return {"running": len(self.running), "waiting": len(self.waiting), "kv_reserved": self.kv_reserved,
                    "steps": self.steps, "prefills": self.prefills, "decode_tokens": self.decode_tokens,
                    "prompt_tokens": self.prompt_tokens}

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting new requests; wait until every queued and running one has finished."""
        with self._cond:
            self._draining = True
            self._cond.notify()
            return self._cond.wait_for(lambda: not self.waiting and not self.running, timeout)

    def shutdown(self, timeout: float = 30) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.engine.observers.remove(self.recorder)

    # ---- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self.waiting or self.running or self._cancel)
                if self._stop:
                    break
                cancels, self._cancel = self._cancel, set()
                admitted = self._admit()
            self._apply_cancels(cancels)
            admitted = [s for s in admitted if s.seq_id in self.running]     # not cancelled as they were admitted
            if admitted:
                self._guarded(admitted, lambda: self._prefill(admitted))
            decoding = [s for s in self.running.values() if s.last_token is not None]
            if decoding:
                batch = self._pick(decoding)
                self._guarded(batch, lambda: self._decode(batch))
            with self._cond:
                self._cond.notify_all()                       # drain() waiters
        for s in list(self.waiting) + list(self.running.values()):
            self._finish(s, "abort")

    def _admit(self) -> list[_Seq]:
        """Waiting requests (in order) that get a seat and KV reserve now, at most max_prefill.

        With `prefill_wait` > 0 and sequences decoding, admission holds while fewer requests than a full
        prefill group (max_prefill, or all that wait) would get in, for at most `prefill_wait` steps: prompts
        prefilled together share their expert loads (a prompt touches most experts of every layer).
        """
        fits = self._admittable()
        if 0 < fits < min(self.max_prefill, len(self.waiting)) and self.running and \
                self._held < self.prefill_wait:
            self._held += 1
            return []
        self._held = 0
        out = [self.waiting.popleft() for _ in range(fits)]
        for s in out:
            self.kv_reserved += s.kv_tokens
            self.running[s.seq_id] = s
        return out

    def _admittable(self) -> int:
        """How many waiting requests (in order) would get a seat and KV reserve now (at most max_prefill)."""
        seats = self.max_num_seqs - len(self.running)
        kv, n = self.kv_reserved, 0
        for s in itertools.islice(self.waiting, min(seats, self.max_prefill)):
            if kv + s.kv_tokens > self.kv_tokens:
                break
            kv, n = kv + s.kv_tokens, n + 1
        return n

    def _apply_cancels(self, ids: set[str]) -> None:
        if not ids:
            return
        with self._cond:
            gone = [s for s in self.waiting if s.req.request_id in ids]
            for s in gone:
                self.waiting.remove(s)
        for s in gone + [s for s in list(self.running.values()) if s.req.request_id in ids]:
            self._finish(s, "abort")

    def _guarded(self, seqs: list[_Seq], fn) -> None:
        try:
            fn()
        except Exception as e:   # noqa: BLE001 -- one failed step ends its requests, not the server
            log.exception("a step failed; ending its %d requests", len(seqs))
            for s in seqs:
                self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def _pick(self, decoding: list[_Seq]) -> list[_Seq]:
        """The sequences of this decode step (always through the scheduler, so its wait counters stay true)."""
        from scheduling import Candidate
        cands = [Candidate(s.seq_id, s.arrival, self.recorder.forecast(s.seq_id, s.last_token)) for s in decoding]
        resident = self._resident()
        chosen = set(self.scheduler.select(cands, self.max_batch, resident))
        self._hint_next([c for c in cands if c.seq_id not in chosen], resident)
        return [s for s in decoding if s.seq_id in chosen]

    def _hint_next(self, passed_over: list, resident) -> None:
        """Schedule-aware eviction: tell the expert cache which experts the next step's group (the scheduler's
        pick among the sequences passed over now) is forecast to use, so this step evicts others first."""
        cache = self.engine.experts
        if not cache.evicts or not self.schedule_aware_eviction:
            return
        nxt = set(self.scheduler.peek(passed_over, self.max_batch, resident)) if passed_over else set()
        paths = [c.experts for c in passed_over if c.seq_id in nxt and c.experts is not None]
        cache.hint_upcoming({m: frozenset().union(*(p[i] for p in paths))
                             for i, m in enumerate(self.engine.spec.moe_layers)})

    def _resident(self) -> list[frozenset[int]] | None:
        """Each MoE layer's resident experts, for the scheduler; None when every expert is resident."""
        cache = self.engine.experts
        return [cache.residents(m) for m in self.engine.spec.moe_layers] if cache.evicts else None

    # ---- model work -----------------------------------------------------------------------------
    def _setup(self, s: _Seq) -> None:
        eng, spec = self.engine, self.engine.spec
        s.kv = SeqKV.for_spec(spec, s.kv_tokens, eng.dtype, eng.device)
        s.sampler = Sampler(s.req.sampling, 1, eng.device)
        eos = s.req.eos_token_ids if s.req.eos_token_ids is not None else eng._eos_value(None)
        decode = eng.decode if eng.tokenizer is not None else None
        s.stopper = StopChecker(eos, s.req.stop, decode, 1)
        s.text = IncrementalText(decode) if decode is not None else None
        s.hold = max((len(x) for x in normalize_stop(s.req.stop)), default=1) - 1

    @torch.inference_mode()
    def _forward(self, seqs: list[_Seq], ids: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = StepKV([s.kv for s in seqs])
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        seq_ids = torch.tensor([s.seq_id for s in seqs])
        logits = self.engine.decoder(ids, positions, kv, mask, last_only=True, seq_ids=seq_ids)[:, 0]   # [B, V]
        kv.commit()
        return logits

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Prompts of newly admitted sequences, left-padded into one forward (their expert loads are shared)."""
        from .generation import left_pad
        for s in seqs:
            self._setup(s)
        ids, mask, positions = left_pad([s.req.prompt_ids for s in seqs], 0, self.engine.device)
        logits = self._forward(seqs, ids, positions, mask)
        self.prefills += 1
        now = time.perf_counter()
        for i, s in enumerate(seqs):
            self.prompt_tokens += len(s.req.prompt_ids)
            s.t_first = now
            self._emit(s, int(s.sampler(logits[i:i + 1])[0]))

    def _decode(self, batch: list[_Seq]) -> None:
        dev = self.engine.device
        ids = torch.tensor([[s.last_token] for s in batch], device=dev)
        positions = torch.tensor([[s.kv.length] for s in batch], device=dev)
        logits = self._forward(batch, ids, positions)
        self.steps += 1
        self.decode_tokens += len(batch)
        for i, s in enumerate(batch):
            self._emit(s, int(s.sampler(logits[i:i + 1])[0]))

    # ---- events ---------------------------------------------------------------------------------
    def _emit(self, s: _Seq, token: int) -> None:
        s.produced += 1
        s.pending.append(token)
        done = s.stopper.update(0, token) or s.produced >= s.req.max_tokens \
            or s.kv.length + 1 >= self.engine.max_context
        s.last_token = None if done else token
        s.arrival = next(self._arrivals)       # ready again: FIFO order is order of readiness (round robin)
        if s.text is None:
            delta = ""
        else:
            s.text.push(token)
            # at the end: the whole text decoded once more (flushes a held partial character), stop string cut
            visible = s.stopper.trim(0, self.engine.decode(s.text.ids)) if done else s.text.text
            ready = len(visible) if done else len(visible) - s.hold
            delta = visible[s.sent:ready] if ready > s.sent else ""
            s.sent = max(s.sent, ready)
        if done:
            reason = s.stopper.reason(0)
            self._finish(s, "stop" if reason in ("eos", "stop") else "length", text=delta)
        elif delta or s.text is None:
            self._send(s, Event(s.req.request_id, delta, s.pending, None, len(s.req.prompt_ids), s.produced))
            s.pending = []

    def _finish(self, s: _Seq, reason: str, text: str = "", error: str | None = None) -> None:
        with self._cond:
            if self.running.pop(s.seq_id, None) is not None:
                self.kv_reserved -= s.kv_tokens
        self.scheduler.forget(s.seq_id)
        self.recorder.paths.pop(s.seq_id, None)
        now = time.perf_counter()
        ttft = (s.t_first - s.t_submit) if s.t_first is not None else None
        self._send(s, Event(s.req.request_id, text, s.pending, reason, len(s.req.prompt_ids), s.produced,
                            error, ttft, now - s.t_submit))
        s.pending, s.kv = [], None

    def _send(self, s: _Seq, event: Event) -> None:
        try:
            s.req.on_event(event)
        except Exception:   # noqa: BLE001 -- a broken consumer must not stop the loop
            log.exception("the event consumer of request %s failed", s.req.request_id)
            self.cancel(s.req.request_id)


__all__ = ["EngineLoop", "Event", "QueueFull", "Request"]
