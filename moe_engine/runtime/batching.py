"""Continuous batching over the generation core: sequences join and leave the running batch between steps.

    enqueue(seq) -> waiting --admit (seats, KV reserve, grouped prefills)--> prefill together -> first token
                                                                                   |
          running sequences --scheduler picks <= max_batch (scheduling/)--> one decode step together
                                                                                   |
                                    core.sample + core.accept -> (sequence, token) to the driver

The Batcher has no threads: Engine.generate(max_batch=N) drives it on the caller's thread, the server's
EngineLoop (loop.py) on its own. Each sequence has its own KV cache (sized prompt + max_new at admission
and counted against the KV reserve), so its outputs do not depend on which others share its steps.

Admission needs a seat (`max_num_seqs`) and KV reserve (prompt + max_new of every admitted sequence <=
`kv_tokens`). A decode step runs at most `max_batch` sequences, chosen by the scheduler ("fifo" = in
order of readiness, round robin; "expert" = the ExpertFlow-style rescheduler, which forecasts each
sequence's next experts from its next token id, see PathRecorder, and passes nobody over more than
`max_wait_steps` steps). The schedule also steers the cache and admission: the expert cache is told the
experts of the group the scheduler would pick next (evicted last), and with "expert" admission may wait up
to `prefill_wait` steps so that prompts are prefilled together (a prompt touches most experts of every layer).
"""
from __future__ import annotations

import collections
import itertools

import torch

from scheduling import Candidate, make_scheduler

from .core import GenerationCore, Sequence


class PathRecorder:
    """A routing observer that learns, online, which experts each token id tends to use at each MoE layer.

    Routing depends strongly on the token itself (on the bundled model the experts a token id used
    before predict 68-94% of its next routing per layer, recall@2; its previous token's experts
    only 35-47%), so a sequence's next step is forecast from a table counts[token, layer, expert]
    filled from every routed token (prompts included), falling back to the experts the sequence's
    previous token used for ids never seen. Large vocabularies hash ids into a bounded table.
    """

    MAX_TABLE = 32 << 20                                    # entries (float32) in the token table

    def __init__(self, moe_layers: list[int], vocab_size: int, num_experts: int, top_k: int):
        self.index = {m: i for i, m in enumerate(moe_layers)}
        self.top_k = top_k
        self.buckets = max(1, min(vocab_size, self.MAX_TABLE // max(1, len(moe_layers) * num_experts)))
        self.table = torch.zeros(self.buckets, len(moe_layers), num_experts)   # [V', L, E] routed counts
        self.paths: dict[int, list[frozenset[int]]] = {}    # seq -> experts of its latest token per layer
        self._rows: list[int] = []
        self._tokens = torch.empty(0, dtype=torch.long)

    def begin_step(self, token_ids, seq_ids) -> None:
        self._rows = seq_ids.tolist()
        self._tokens = token_ids.cpu() % self.buckets

    def observe(self, layer, router_input, experts, weights) -> None:
        i = self.index[layer]
        ex = experts.cpu()                                                   # [N, K]
        if len(self._tokens) == len(ex):
            rows = self._tokens[:, None].expand_as(ex)
            self.table[:, i].index_put_((rows.flatten(), ex.flatten()), torch.ones(ex.numel()), accumulate=True)
        last = {seq: row for row, seq in enumerate(self._rows)}          # a sequence's last token in this step
        ids = ex.tolist()
        for seq, row in last.items():
            path = self.paths.setdefault(seq, [frozenset()] * len(self.index))
            path[i] = frozenset(ids[row])

    def forecast(self, seq_id: int, next_token: int) -> list[frozenset[int]] | None:
        """Predicted experts per MoE layer of the sequence's next step (feeding `next_token`)."""
        counts = self.table[next_token % self.buckets]                    # [L, E]
        prev = self.paths.get(seq_id)
        top = torch.topk(counts, self.top_k, dim=-1).indices.tolist()
        seen = (counts.sum(-1) > 0).tolist()
        out = [frozenset(t) if ok else (prev[i] if prev else None) for i, (t, ok) in enumerate(zip(top, seen))]
        return None if any(p is None for p in out) else out


class Batcher:
    def __init__(self, core: GenerationCore, cache, max_num_seqs: int, max_batch: int | None = None,
                 scheduler: str = "expert", kv_tokens: int | None = None, max_wait_steps: int | None = None,
                 max_prefill: int = 4, miss_weight: float = 2.0, schedule_aware_eviction: bool = True,
                 prefill_wait: int | None = None):
        self.core, self.cache, self.spec = core, cache, core.spec
        self.max_num_seqs = max_num_seqs
        self.max_batch = max_batch or max_num_seqs
        self.max_prefill = max_prefill            # waiting sequences prefilled together in one step
        self.schedule_aware_eviction = schedule_aware_eviction   # cache keeps the next group's forecast experts
        self.kv_tokens = kv_tokens or max_num_seqs * core.max_context
        self.scheduler_name = scheduler
        if max_wait_steps is None:          # 4x the round-robin period (>= 1x - 1, so the bound can always hold)
            max_wait_steps = 4 * -(-max_num_seqs // self.max_batch) - 1
        self.scheduler = make_scheduler(scheduler, max_wait=max_wait_steps, miss_weight=miss_weight) \
            if scheduler != "fifo" else make_scheduler("fifo")
        if prefill_wait is None:                  # expert-aware scheduling also groups prefills; FIFO admits at once
            prefill_wait = 0 if scheduler == "fifo" else max_wait_steps
        self.prefill_wait = prefill_wait
        self._held = 0                            # steps admission has been held for a fuller prefill group
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}
        self.kv_reserved = 0
        self._ready = itertools.count()
        self.arrival: dict[int, int] = {}         # seq -> order of readiness (FIFO = round robin)
        self.steps = self.prefills = self.decode_tokens = self.prompt_tokens = 0
        self.recorder = PathRecorder(self.spec.moe_layers, self.spec.vocab_size, self.spec.moe.num_experts,
                                     self.spec.moe.top_k)

    # ---- admission --------------------------------------------------------------------------------
    def enqueue(self, seq: Sequence) -> None:
        self.arrival[seq.seq_id] = next(self._ready)
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Waiting sequences (in order) that get a seat and KV reserve now, at most max_prefill.

        With `prefill_wait` > 0 and sequences decoding, admission holds while fewer sequences than a full
        prefill group (max_prefill, or all that wait) would get in, for at most `prefill_wait` steps: prompts
        prefilled together share their expert loads (a prompt touches most experts of every layer).
        """
        fits = self._admittable()
        if 0 < fits < min(self.max_prefill, len(self.waiting)) and self.running and self._held < self.prefill_wait:
            self._held += 1
            return []
        self._held = 0
        out = [self.waiting.popleft() for _ in range(fits)]
        for s in out:
            self.kv_reserved += s.kv_tokens
            self.running[s.seq_id] = s
        return out

    def _admittable(self) -> int:
        seats = self.max_num_seqs - len(self.running)
        kv, n = self.kv_reserved, 0
        for s in itertools.islice(self.waiting, min(seats, self.max_prefill)):
            if kv + s.kv_tokens > self.kv_tokens:
                break
            kv, n = kv + s.kv_tokens, n + 1
        return n

    def release(self, seq: Sequence) -> bool:
        """A sequence leaves (finished, cancelled or failed): its seat and KV reserve are free again. False when it
        was not running (it was still waiting, or had already left)."""
        if self.running.pop(seq.seq_id, None) is None:
            return False
        self.kv_reserved -= seq.kv_tokens
        self.scheduler.forget(seq.seq_id)
        self.recorder.paths.pop(seq.seq_id, None)
        self.arrival.pop(seq.seq_id, None)
        seq.kv = None
        return True

    # ---- steps ------------------------------------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Admitted prompts in one forward (their expert loads are shared) -> each one's first token."""
        for s in seqs:
            self.core.start(s)
        logits = self.core.step(seqs)
        self.prefills += 1
        self.prompt_tokens += sum(s.prompt_len for s in seqs)
        return self._emit(seqs, logits)

    def decoding(self) -> list[Sequence]:
        return [s for s in self.running.values() if s.kv is not None and not s.done]

    def decode(self, batch: list[Sequence]) -> list[tuple[Sequence, int]]:
        """One decode step over `batch` (pick's choice) -> each one's next token."""
        logits = self.core.step(batch)
        self.steps += 1
        self.decode_tokens += len(batch)
        return self._emit(batch, logits)

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, int]]:
        tokens = self.core.sample(seqs, logits)
        for s, tok in zip(seqs, tokens):
            self.core.accept(s, tok)
            self.arrival[s.seq_id] = next(self._ready)     # ready again: FIFO order is order of readiness
        return list(zip(seqs, tokens))

    # ---- the schedule -----------------------------------------------------------------------------
    def pick(self, decoding: list[Sequence]) -> list[Sequence]:
        """The sequences of this decode step (always through the scheduler, so its wait counters stay true)."""
        cands = [Candidate(s.seq_id, self.arrival[s.seq_id], self.recorder.forecast(s.seq_id, s.tokens[-1]))
                 for s in decoding]
        resident = self._resident()
        chosen = set(self.scheduler.select(cands, self.max_batch, resident))
        self._hint_next([c for c in cands if c.seq_id not in chosen], resident)
        return [s for s in decoding if s.seq_id in chosen]

    def _hint_next(self, passed_over: list, resident) -> None:
        """Schedule-aware eviction: tell the expert cache which experts the next step's group (the scheduler's
        pick among the sequences passed over now) is forecast to use, so this step evicts others first."""
        if not self.cache.evicts or not self.schedule_aware_eviction:
            return
        nxt = set(self.scheduler.peek(passed_over, self.max_batch, resident)) if passed_over else set()
        paths = [c.experts for c in passed_over if c.seq_id in nxt and c.experts is not None]
        self.cache.hint_upcoming({m: frozenset().union(*(p[i] for p in paths))
                                  for i, m in enumerate(self.spec.moe_layers)})

    def _resident(self) -> list[frozenset[int]] | None:
        """Each MoE layer's resident experts, for the scheduler; None when every expert is resident."""
        return [self.cache.residents(m) for m in self.spec.moe_layers] if self.cache.evicts else None

    def counters(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_reserved": self.kv_reserved,
                "steps": self.steps, "prefills": self.prefills, "decode_tokens": self.decode_tokens,
                "prompt_tokens": self.prompt_tokens}
