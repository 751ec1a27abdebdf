"""Draft sources for speculative decoding, and the draft length chosen per step by expected cost.

    Drafter.propose(seqs) -> one draft per sequence (possibly empty), each at most core.room(seq) long
        ngram     prompt lookup over the sequence's own ids (speculative.propose_ngram): no model, no IO
        resident  the same model, each MoE layer routing only among the experts resident in the compute tier
                  (MoeBlock.restrict; the renormalized top-k of those), greedy, k single-token steps batched over
                  the sequences: drafting loads no expert. The draft's keys and values are overwritten by the
                  verify step (the KV length is rolled back after drafting).
    Drafter.update(seq, drafted, kept)   acceptance per sequence (an exponential average)
    draft length: k maximizing expected emitted tokens (1 - a^(k+1)) / (1 - a) per unit of expected step cost
                  (1 + k * extra_cost), a = the sequence's acceptance, extra_cost = what one more verified token
                  adds to a step relative to a plain decode step (measured from the verify steps' own times);
                  after PROBE_EVERY steps at length 0 one token is drafted to re-measure the acceptance

The verify step itself is core.speculate(); the drivers (generation.py, batching.py) call propose, speculate and
update. Knows nothing of text or of the server.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ..model.moe import MoeBlock
from .speculative import SpeculativeConfig, propose_ngram

ACCEPT_PRIOR = 0.5        # acceptance assumed before a sequence has verified anything
ACCEPT_DECAY = 0.8        # weight of the past in the acceptance average
PROBE_EVERY = 8           # steps without a draft after which one 1-token draft re-measures acceptance


class Drafter:
    def __init__(self, core, cache, config: SpeculativeConfig):
        self.core, self.cache, self.config = core, cache, config
        self.accept: dict[int, float] = {}        # seq id -> acceptance (fraction of drafted tokens kept)
        self.idle: dict[int, int] = {}            # seq id -> steps since its last draft
        self.extra_cost = 0.1                     # one more verified token's share of a decode step's time
        self.drafted = self.kept = self.steps = 0

    # ---- drafts -----------------------------------------------------------------------------------
    def propose(self, seqs) -> list[list[int]]:
        lengths = [self.length(s) for s in seqs]
        if self.config.method == "ngram":
            c = self.config
            return [propose_ngram(s.tokens, k, c.prompt_lookup_max, c.prompt_lookup_min) if k else []
                    for s, k in zip(seqs, lengths)]
        if self.config.method == "resident":
            return self._resident(seqs, lengths)
        raise NotImplementedError(f"speculative method {self.config.method!r} has no drafter in this build")

    def length(self, seq) -> int:
        """Draft length for this step: the best expected tokens per cost, within K and the sequence's room."""
        if not self.core.can_speculate(seq):
            return 0
        top = min(self.config.num_speculative_tokens, self.core.room(seq))
        if not self.config.adaptive or top == 0:
            return top
        a = min(self.accept.get(seq.seq_id, ACCEPT_PRIOR), 0.99)
        rate = [(1 - a ** (k + 1)) / (1 - a) / (1 + k * self.extra_cost) for k in range(top + 1)]
        k = max(range(top + 1), key=rate.__getitem__)
        idle = self.idle.get(seq.seq_id, 0)
        if k == 0 and idle >= PROBE_EVERY:      # keep measuring: a sequence that stopped drafting would never learn
            k = 1                               # that its acceptance went up again
        self.idle[seq.seq_id] = 0 if k else idle + 1
        return k

    def _resident(self, seqs, lengths: list[int]) -> list[list[int]]:
        masks = self._resident_masks()
        if masks is None or not any(lengths):
            return [[] for _ in seqs]
        live = [s for s, k in zip(seqs, lengths) if k]
        steps = max(lengths)
        base = {s.seq_id: (len(s.tokens), s.kv.length) for s in live}
        try:
            with restricted(self.core.decoder, masks):
                for _ in range(steps):
                    logits = self.core.step(live)                                   # [B, V]
                    for s, t in zip(live, logits.argmax(-1).tolist()):
                        s.tokens.append(t)
            drafts = {s.seq_id: s.tokens[base[s.seq_id][0]:] for s in live}
        finally:
            for s in live:
                n, kv = base[s.seq_id]
                del s.tokens[n:]
                s.kv.length = kv
        return [drafts.get(s.seq_id, [])[:k] for s, k in zip(seqs, lengths)]

    def _resident_masks(self) -> dict[int, torch.Tensor] | None:
        """bool [E] per MoE layer of the experts resident now; None when a layer has fewer than top-k of them
        (a draft there would have to load)."""
        spec = self.core.spec
        masks = {}
        for layer in spec.moe_layers:
            mask = torch.zeros(spec.moe.num_experts, dtype=torch.bool)
            resident = self.cache.residents(layer) if self.cache.evicts else range(spec.moe.num_experts)
            mask[list(resident)] = True
            if int(mask.sum()) < spec.moe.top_k:
                return None
            masks[layer] = mask
        return masks

    # ---- feedback ---------------------------------------------------------------------------------
    def update(self, seq, drafted: int, kept: int) -> None:
        if drafted == 0:
            return
        prev = self.accept.get(seq.seq_id, ACCEPT_PRIOR)
        self.accept[seq.seq_id] = ACCEPT_DECAY * prev + (1 - ACCEPT_DECAY) * kept / drafted
        self.drafted += drafted
        self.kept += kept

    def timed(self, tokens_fed: int, rows: int, seconds: float, plain_step: float | None) -> None:
        """A verify step's time against a plain decode step's (both measured by the driver) -> extra_cost."""
        extra = tokens_fed - rows
        if plain_step and extra > 0:
            sample = max(0.0, seconds / plain_step - 1) / extra
            self.extra_cost = 0.8 * self.extra_cost + 0.2 * sample

    def forget(self, seq) -> None:
        self.accept.pop(seq.seq_id, None)
        self.idle.pop(seq.seq_id, None)

    def stats(self) -> dict:
        return {"method": self.config.method, "drafted": self.drafted, "accepted": self.kept,
                "acceptance": self.kept / self.drafted if self.drafted else None, "verify_steps": self.steps}


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


@contextlib.contextmanager
def restricted(decoder, masks: dict[int, torch.Tensor]):
    """Every MoE block routes only among masks[layer] while the block runs."""
    blocks = [m for m in decoder.modules() if isinstance(m, MoeBlock)]
    for b in blocks:
        b.restrict = masks.get(b.layer)
    try:
        yield
    finally:
        for b in blocks:
            b.restrict = None


__all__ = ["Drafter", "restricted", "speculative_lockstep"]
