"""Continuous batching over the generation core: sequences join and leave the running batch between steps.

    enqueue(seq, client) -> waiting --admit (seats, KV reserve, clients take turns; a client over its seat cap
                                      yields seats to others by preemption)--> running
    plan():   decode   the scheduler's pick (scheduling/) of <= max_batch decode-ready sequences, <= the client
                       cap rows per client while several clients have rows, the cold-expert cap
              chunks   prompts being prefilled, fed in chunks: the token budget's rest after the decode rows,
                       clients taking turns, while prefill has had no more than its share of the time (PhaseGate)
    prefill(chunks) -> first tokens of the prompts fed to their end;  decode(batch) -> next tokens
                       core.sample + core.accept -> (sequence, token) to the driver
    speculative (a Drafter given): plan() reserves each decode row that can_speculate up to K draft tokens in the
                       token budget (before the prompt chunks, as vLLM counts its spec tokens); decode() drafts them
                       (Drafter.propose) and verifies every row in one core.speculate step -> each row's emitted
                       tokens in order, a stop mid-draft dropping the rest; rows with processors or logprobs, or
                       without a draft this step, get one token as without speculation

The Batcher has no threads: Engine.generate(max_batch=N) drives it on the caller's thread (generation.py), the
server's EngineLoop (loop.py) on its own. Each sequence has its own KV cache (sized prompt + max_new at
admission and counted against the KV reserve), so its outputs do not depend on which others share its steps,
on how its prompt was chunked, or on whether it was preempted and recomputed (float32: the same tokens; see
tests/test_fairness.py). A sequence with more than one id not yet fed is being prefilled (it is never sampled
mid-prompt); with exactly one (its last sampled token, or a prompt's last id) it is decode-ready.

Admission needs a seat (`max_num_seqs`) and KV reserve (prompt + max_new of every admitted sequence <=
`kv_tokens`). Each step feeds at most `max_num_batched_tokens` ids (vLLM's budget: decode rows + prefill chunk
ids), decode rows first, so decodes are never starved and long prompts are prefilled over several steps.
The "fifo" scheduler takes decode rows in order of readiness (round robin); "expert" (the ExpertFlow-style
rescheduler) groups rows whose forecast experts overlap (each sequence's next experts forecast from its next
token id, see PathRecorder) and passes nobody over more than `max_wait_steps` steps. Expert scheduling only
matters when experts can miss: with every expert resident it schedules exactly as FIFO does and keeps no
forecasts. When experts can miss, the cache is told the experts of the group the scheduler would pick next
(evicted last), and "expert" admission may wait up to `prefill_wait` steps so that prompts are prefilled
together (a prompt touches most experts of every layer).
"""
from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field

import torch

from scheduling import (Candidate, PhaseGate, chunk_sizes, cold_forced, fair_order, make_scheduler, over_cap,
                        rows_per_client)

from .core import GenerationCore, Sequence

DEFAULT_BATCHED_TOKENS = 512      # ids per step; a prefill chunk of 512 ids takes ~0.5 s on two CPU cores


class PathRecorder:
    """A routing observer that learns, online, which experts each token id tends to use at each MoE layer.

    Routing depends strongly on the token itself (on the bundled model the experts a token id used
    before predict 68-94% of its next routing per layer, recall@2; its previous token's experts
    only 35-47%), so a sequence's next step is forecast from a table counts[token, layer, expert]
    filled from every routed token (prompts included), falling back to the experts the sequence's
    previous token used for ids never seen. Large vocabularies hash ids into a bounded table.
    """

    MAX_TABLE = 32 << 20                                    # entries (float32) in the token table

    def __init__(self, moe_layers: list[int], vocab_size: int, num_experts: int, top_k: int, track_paths: bool = True):
        self.index = {m: i for i, m in enumerate(moe_layers)}
        self.track_paths = track_paths                      # keep each sequence's latest experts (the fallback)
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
        if not self.track_paths:
            return
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


@dataclass
class StepPlan:
    """One step's work: prompt chunks (sequence, ids to feed) in one forward, then one decode step."""
    chunks: list[tuple[Sequence, int]]
    decode: list[Sequence]
    admitted: list[Sequence]                      # admitted by this plan (their chunks may come in later steps)
    draft_room: list[int] = field(default_factory=list)   # per decode row: draft tokens reserved in the budget

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Batcher:
    def __init__(self, core: GenerationCore, cache, max_num_seqs: int, max_batch: int | None = None,
                 scheduler: str = "expert", kv_tokens: int | None = None, max_wait_steps: int | None = None,
                 max_prefill: int = 4, miss_weight: float = 2.0, schedule_aware_eviction: bool = True,
                 prefill_wait: int | None = None, max_num_batched_tokens: int | None = None,
                 max_seqs_per_client: int | None = None, max_cold_experts: int | None = None,
                 prefill_share: float | None = None, clock=time.perf_counter, drafter=None):
        self.core, self.cache, self.spec = core, cache, core.spec
        self.drafter = drafter                    # a drafting.Drafter: decode steps verify drafts (None: no drafts)
        self._plain_step: float | None = None     # seconds of a decode step without drafts (the drafter's yardstick)
        self._room: dict[int, int] = {}           # seq id -> draft tokens the latest plan reserved it
        self.max_num_seqs = max_num_seqs
        self.max_batch = max_batch or max_num_seqs
        self.max_prefill = max_prefill            # prompts chunked together in one forward
        self.schedule_aware_eviction = schedule_aware_eviction   # cache keeps the next group's forecast experts
        self.kv_tokens = kv_tokens or max_num_seqs * core.max_context
        self.budget = max_num_batched_tokens or max(DEFAULT_BATCHED_TOKENS, 2 * self.max_batch)
        if self.budget <= self.max_batch:
            raise ValueError(f"max_num_batched_tokens={self.budget} must be more than max_batch={self.max_batch} "
                             f"(a step's decode rows come first; prompts need room after them): raise "
                             f"--max-num-batched-tokens or lower --max-batch")
        self.client_cap = max_seqs_per_client or max(1, max_num_seqs // 4)
        self.evicts = bool(cache.evicts)          # experts can miss: forecasts, hints and grouping pay off
        self.max_cold = max_cold_experts if max_cold_experts is not None else \
            self.spec.moe.top_k * len(self.spec.moe_layers) // 2
        self.scheduler_name = scheduler
        if max_wait_steps is None:          # 4x the round-robin period (>= 1x - 1, so the bound can always hold)
            max_wait_steps = 4 * -(-max_num_seqs // self.max_batch) - 1
        self.max_wait_steps = max_wait_steps
        self.scheduler = make_scheduler(scheduler, max_wait=max_wait_steps, miss_weight=miss_weight) \
            if scheduler != "fifo" else make_scheduler("fifo")
        if prefill_wait is None:                  # expert-aware scheduling also groups prefills; FIFO admits at once
            prefill_wait = 0 if scheduler == "fifo" else max_wait_steps
        self.prefill_wait = prefill_wait if self.evicts else 0   # all resident: grouping saves nothing
        self.gate = PhaseGate(prefill_share)
        self.clock = clock
        self._held = 0                            # steps admission has been held for a fuller prefill group
        self._contended = False                   # this step's prompt chunks run while sequences decode
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}
        self.clients: dict[int, object] = {}      # seq -> client (fairness; None: the one anonymous client)
        self.kv_reserved = 0
        self._ready = itertools.count()
        self.arrival: dict[int, int] = {}         # seq -> order of readiness (FIFO = round robin)
        self._cold_waits: dict[int, int] = {}     # seq -> steps left out by the cold-expert cap in a row
        self._cold_seen: dict[int, float] = {}    # seq -> cold experts it alone needed in its recent steps (mean)
        self._step_resident = None                # the residents the last pick saw (to measure the step after)
        self._prefill_served: dict[object, int] = {}   # client -> prompt ids fed while it has prompts to feed
        self.steps = self.prefills = self.decode_tokens = self.prompt_tokens = self.preemptions = 0
        self.decode_rows = 0                      # sequences in decode steps (decode_tokens / decode_rows: per verify)
        self.spec_drafts = self.spec_draft_tokens = self.spec_accepted = 0   # rows with a draft, its tokens, kept
        self.recorder = PathRecorder(self.spec.moe_layers, self.spec.vocab_size, self.spec.moe.num_experts,
                                     self.spec.moe.top_k) if self.evicts else None

    @property
    def observer(self) -> PathRecorder | None:
        """The routing observer the driver registers with the engine while it runs (None: none needed)."""
        return self.recorder

    # ---- admission --------------------------------------------------------------------------------
    def enqueue(self, seq: Sequence, client=None) -> None:
        self.clients[seq.seq_id] = client
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Waiting sequences that get a seat and KV reserve now (see _admission), or none while "expert" admission
        holds for a fuller prefill group: with experts that can miss, sequences decoding and fewer sequences than
        a full group (max_prefill, or all that wait) getting in, for at most `prefill_wait` steps."""
        out, victims = self._admission()
        if not victims and 0 < len(out) < min(self.max_prefill, len(self.waiting)) and self.running \
                and self._held < self.prefill_wait:
            self._held += 1
            return []
        self._held = 0
        for s in victims:
            self._preempt(s)
        for s in out:
            self.waiting.remove(s)
            self.kv_reserved += s.kv_tokens
            self.running[s.seq_id] = s
            self.core.start(s)
            if self._left(s) == 1:
                self._stamp(s)
        return out

    def _admission(self) -> tuple[list[Sequence], list[Sequence]]:
        """(to admit, to preempt first). Clients take turns (fair_order: a client's k-th waiting sequence ranks
        after every client running fewer), and admission stops at the first that does not fit, so a large
        request is not passed over for ever. A client under its cap that does not fit takes the seats and KV of
        sequences other clients run beyond their caps (over_cap: their least advanced first)."""
        running = collections.Counter(self.clients[sid] for sid in self.running)
        order = fair_order([(s.seq_id, self.clients[s.seq_id]) for s in self.waiting], offset=running)
        by_id = {s.seq_id: s for s in self.waiting}
        seats, kv = self.max_num_seqs - len(self.running), self.kv_reserved
        out, victims = [], []
        spare = None
        for sid in order:
            s, client = by_id[sid], self.clients[sid]
            while (seats < 1 or kv + s.kv_tokens > self.kv_tokens) and running[client] < self.client_cap:
                if spare is None:
                    spare = [self.running[v] for v in over_cap(self._progress(), self.client_cap)]
                spare = [v for v in spare if self.clients[v.seq_id] != client]
                if not spare:
                    break
                v = spare.pop(0)
                victims.append(v)
                running[self.clients[v.seq_id]] -= 1
                seats, kv = seats + 1, kv - v.kv_tokens
            if seats < 1 or kv + s.kv_tokens > self.kv_tokens:
                break
            out.append(s)
            running[client] += 1
            seats, kv = seats - 1, kv + s.kv_tokens
        return out, victims

    def _progress(self) -> list[tuple[int, object, int]]:
        return [(sid, self.clients[sid], s.kv.length if s.kv is not None else 0) for sid, s in self.running.items()]

    def _preempt(self, seq: Sequence) -> None:
        """Give a seat back: its KV cache is dropped and it waits again at the front; when readmitted its prompt and
        the tokens it generated are fed again (recomputed), then it goes on where it stopped."""
        self._leave(seq)
        if seq.prompt_logprobs is not None:      # scored again as its prompt is fed again (the same values)
            seq.prompt_logprobs = []
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def release(self, seq: Sequence) -> bool:
        """A sequence leaves (finished, cancelled or failed): its place in the queue, or its seat and KV reserve, are
        free again. False when it had already left."""
        if seq.seq_id not in self.clients:
            return False
        if seq.seq_id in self.running:
            self._leave(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        del self.clients[seq.seq_id]
        return True

    def _leave(self, seq: Sequence) -> None:
        del self.running[seq.seq_id]
        self.kv_reserved -= seq.kv_tokens
        self.scheduler.forget(seq.seq_id)
        if self.recorder is not None:
            self.recorder.paths.pop(seq.seq_id, None)
        self.arrival.pop(seq.seq_id, None)
        self._cold_waits.pop(seq.seq_id, None)
        self._cold_seen.pop(seq.seq_id, None)
        if self.drafter is not None:
            self.drafter.forget(seq)
        seq.kv = None

    # ---- the plan of a step -----------------------------------------------------------------------
    @staticmethod
    def _left(seq: Sequence) -> int:
        """Ids the model has not seen yet (1: decode-ready)."""
        return len(seq.tokens) - seq.kv.length

    def _stamp(self, seq: Sequence) -> None:
        self.arrival[seq.seq_id] = next(self._ready)     # ready now: FIFO order is order of readiness

    def decoding(self) -> list[Sequence]:
        """Running sequences whose next step is one id: a decode, or a prompt's last id."""
        return [s for s in self.running.values() if s.kv is not None and not s.done and self._left(s) == 1]

    def prefilling(self) -> list[Sequence]:
        return [s for s in self.running.values() if s.kv is not None and not s.done and self._left(s) > 1]

    def plan(self) -> StepPlan:
        """Admission, then this step's decode rows and prompt chunks (see the module docstring)."""
        admitted = self.admit()
        ready = self.decoding()
        batch = self.pick(ready) if ready else []
        self._contended = bool(batch)
        room = self._draft_room(batch)
        self._room = {s.seq_id: n for s, n in zip(batch, room)}
        return StepPlan(self._chunks(self.budget - len(batch) - sum(room), bool(batch)), batch, admitted, room)

    def _draft_room(self, batch: list[Sequence]) -> list[int]:
        """Draft tokens each decode row may verify this step: K (the config's num_speculative_tokens) within its
        room, for rows that can speculate, while the token budget after the decode rows lasts."""
        if self.drafter is None:
            return [0] * len(batch)
        left, out = self.budget - len(batch), []
        k = self.drafter.config.num_speculative_tokens
        for s in batch:
            n = min(k, self.core.room(s), left) if self.core.can_speculate(s) else 0
            out.append(n)
            left -= n
        return out

    def _chunks(self, budget: int, decoding: bool) -> list[tuple[Sequence, int]]:
        """Prompts being prefilled take turns by client (the one fed least since it began prefilling first), at most
        max_prefill per forward, the budget split evenly among them (chunk_sizes)."""
        todo = self.prefilling()
        if not todo or budget < 1 or not self.gate.allows(decoding):
            return []
        clients = {self.clients[s.seq_id] for s in todo}
        self._prefill_served = {c: n for c, n in self._prefill_served.items() if c in clients}
        order = fair_order([(s.seq_id, self.clients[s.seq_id]) for s in todo], priority=self._prefill_served)
        by_id = {s.seq_id: s for s in todo}
        rows = [by_id[sid] for sid in order[:self.max_prefill]]
        sizes = chunk_sizes([self._left(s) for s in rows], budget)
        chunks = [(s, n) for s, n in zip(rows, sizes) if n > 0]
        for s, n in chunks:
            c = self.clients[s.seq_id]
            self._prefill_served[c] = self._prefill_served.get(c, 0) + n
        return chunks

    def pick(self, decoding: list[Sequence]) -> list[Sequence]:
        """The sequences of this decode step (always through the scheduler, so its wait counters stay true)."""
        ready = sorted(decoding, key=lambda s: (self.arrival[s.seq_id], s.seq_id))
        allowed = set(rows_per_client([(s.seq_id, self.clients[s.seq_id]) for s in ready], self.client_cap))
        ready = [s for s in ready if s.seq_id in allowed]
        forecast = self.recorder.forecast if self.recorder is not None else None
        cands = [Candidate(s.seq_id, self.arrival[s.seq_id], forecast and forecast(s.seq_id, s.tokens[-1]))
                 for s in ready]
        resident = self._step_resident = self._resident()
        cands = self._cold_cap(cands, resident)
        chosen = set(self.scheduler.select(cands, self.max_batch, resident))
        self._hint_next([c for c in cands if c.seq_id not in chosen], resident)
        return [s for s in ready if s.seq_id in chosen]

    def _cold_cap(self, cands: list[Candidate], resident) -> list[Candidate]:
        """Leave out, while others are ready, a row that would force more than `max_cold` non-resident experts no
        other row needs (a routing-diverse request), for at most max_wait_steps steps in a row. Its count: the
        larger of its forecast's and the mean of what it really forced in its recent steps (_measure_cold), so a
        request whose routing the forecast misses is caught too."""
        if resident is None or len(cands) < 2:
            return cands
        forced = cold_forced(cands, resident)
        out = {c.seq_id for c in cands
               if max(forced.get(c.seq_id, 0), self._cold_seen.get(c.seq_id, 0.0)) > self.max_cold
               and self._cold_waits.get(c.seq_id, 0) < self.max_wait_steps}
        if len(out) == len(cands):                # nobody else is ready: nobody to protect
            out = set()
        for c in cands:
            if c.seq_id in out:
                self._cold_waits[c.seq_id] = self._cold_waits.get(c.seq_id, 0) + 1
            else:
                self._cold_waits.pop(c.seq_id, None)
        return [c for c in cands if c.seq_id not in out]

    def _hint_next(self, passed_over: list, resident) -> None:
        """Schedule-aware eviction: tell the expert cache which experts the next step's group (the scheduler's
        pick among the sequences passed over now) is forecast to use, so this step evicts others first."""
        if not self.evicts or not self.schedule_aware_eviction:
            return
        nxt = set(self.scheduler.peek(passed_over, self.max_batch, resident)) if passed_over else set()
        paths = [c.experts for c in passed_over if c.seq_id in nxt and c.experts is not None]
        self.cache.hint_upcoming({m: frozenset().union(*(p[i] for p in paths))
                                  for i, m in enumerate(self.spec.moe_layers)})

    def _resident(self) -> list[frozenset[int]] | None:
        """Each MoE layer's resident experts, for the scheduler; None when every expert is resident."""
        return [self.cache.residents(m) for m in self.spec.moe_layers] if self.evicts else None

    # ---- steps ------------------------------------------------------------------------------------
    def prefill(self, chunks: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Prompt chunks in one forward (their expert loads are shared) -> the first token of each prompt fed to its
        end; the others are not sampled (their logits are of a prompt's middle)."""
        seqs = [s for s, _ in chunks]
        t0 = self.clock()
        logits = self.core.step(seqs, feed=[n for _, n in chunks])
        self.gate.prefilled(self.clock() - t0, self._contended)
        self.prefills += 1
        self.prompt_tokens += sum(n for _, n in chunks)
        fed = [i for i, s in enumerate(seqs) if self._left(s) == 0]
        for s in seqs:
            if self._left(s) == 1:
                self._stamp(s)
        return self._emit([seqs[i] for i in fed], logits[fed]) if fed else []

    def decode(self, batch: list[Sequence]) -> list[tuple[Sequence, int]]:
        """One decode step over `batch` (pick's choice) -> each one's next token; with a drafter, a verify step of
        the drafts the plan made room for -> each one's emitted tokens, in order."""
        room = [self._room.get(s.seq_id, 0) for s in batch]
        drafting = self.drafter is not None and any(room)
        drafts = self.drafter.propose(batch, room) if drafting else []
        if not any(drafts):
            return self._decode_plain(batch)
        t0 = self.clock()
        kept = self.core.speculate(batch, drafts)
        took = self.clock() - t0
        self.gate.decoded(took)
        self._measure_cold(batch)
        self.drafter.timed(sum(len(d) + 1 for d in drafts), len(batch), took, self._plain_step)
        self.drafter.steps += 1
        out = []
        for s, d, toks in zip(batch, drafts, kept):
            if d:
                self.drafter.update(s, len(d), len(toks) - 1)
                self.spec_drafts, self.spec_draft_tokens = self.spec_drafts + 1, self.spec_draft_tokens + len(d)
                self.spec_accepted += len(toks) - 1
            for tok in toks:
                out.append((s, tok))
                if self.core.accept(s, tok):             # ended (stop, eos, length): the rest is dropped
                    break
            self._stamp(s)
        self.steps += 1
        self.decode_rows += len(batch)
        self.decode_tokens += len(out)
        return out

    def _decode_plain(self, batch: list[Sequence]) -> list[tuple[Sequence, int]]:
        t0 = self.clock()
        logits = self.core.step(batch)
        took = self.clock() - t0
        self.gate.decoded(took)
        self._measure_cold(batch)
        self.steps += 1
        self.decode_rows += len(batch)
        self.decode_tokens += len(batch)
        if self.drafter is not None:
            self.drafter.steps += 1
            self._plain_step = took if self._plain_step is None else 0.8 * self._plain_step + 0.2 * took
        return self._emit(batch, logits)

    def _measure_cold(self, batch: list[Sequence]) -> None:
        """What each row of a shared step really forced: the experts its token used that were not resident before
        the step and that no other row used (its routing, from the recorder), averaged over its steps (EMA 1/2)."""
        if self._step_resident is None or len(batch) < 2:
            return
        used = [Candidate(s.seq_id, 0, self.recorder.paths.get(s.seq_id)) for s in batch]
        for sid, n in cold_forced(used, self._step_resident).items():
            self._cold_seen[sid] = 0.5 * self._cold_seen.get(sid, float(n)) + 0.5 * n

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, int]]:
        tokens = self.core.sample(seqs, logits)
        for s, tok in zip(seqs, tokens):
            self.core.accept(s, tok)
            self._stamp(s)
        return list(zip(seqs, tokens))

    def counters(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_reserved": self.kv_reserved,
                "steps": self.steps, "prefills": self.prefills, "decode_tokens": self.decode_tokens,
                "prompt_tokens": self.prompt_tokens, "preemptions": self.preemptions,
                **({"spec_drafts": self.spec_drafts, "spec_draft_tokens": self.spec_draft_tokens,
                    "spec_accepted_tokens": self.spec_accepted} if self.drafter is not None else {})}
