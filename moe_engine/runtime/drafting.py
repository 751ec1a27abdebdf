"""Draft sources for speculative decoding, their cost per step, and what the expert cache learns from them.

    Drafter.propose(seqs) -> one draft per sequence (possibly empty), each at most core.room(seq) long
        ngram        prompt lookup over the sequence's own ids (speculative.propose_ngram): no model, no IO
        resident     the same model, each MoE layer routing only among the experts ready in the compute tier
                     (MoeBlock.restrict; the renormalized top-k of those), greedy, k single-token steps batched over
                     the sequences: drafting loads no expert, reads the cache without counting a lookup
                     (cache.peeking) and is unseen by routing observers. The draft's keys and values are
                     overwritten by the verify step (the KV length is rolled back after drafting).
        draft_model  a smaller checkpoint sharing the tokenizer (loaded once per engine, every expert resident):
                     each sequence has a copy in the draft's core, caught up on the tokens the target accepted
                     (its KV past the first difference dropped), then k greedy single-token steps
    Drafter.update(seq, drafted, kept)   acceptance per sequence (an exponential average)
    draft length: k maximizing expected emitted tokens (1 - a^(k+1)) / (1 - a) per unit of expected step cost
                  (1 + k * extra_cost), a = the sequence's acceptance, extra_cost = what one more verified token
                  adds to a step relative to a plain decode step (measured from the verify steps' own times);
                  after PROBE_EVERY steps at length 0 one token is drafted to re-measure the acceptance

Expert awareness (only with an offloading cache, where experts can miss):
    forecast   the verify step's experts per layer and fed position: resident drafts record what the exact
               router picks for each token they feed (MoeBlock.unrestricted; exact at the first MoE layer, a
               forecast after it); otherwise, and for the last drafted token, the token's own routing history
               (token_routes: counts[token, layer, expert] learned online from every real step)
    cost       ngram and draft_model drafts are cut where a token's forecast loads above the average (each worth
               load_ratio = one load's seconds / a plain step's, measured) make the expected tokens per cost fall
               (MoE-Spec's point: long drafts touch many distinct experts)
    prefetch   the forecast experts start loading before the verify step (resident: after each draft step, never
               evicting the experts the draft computes with) and are evicted last (cache.hint_upcoming)
Outputs never depend on any of this: the verify step routes exactly.

The verify step itself is core.speculate(); the drivers (generation.speculative_lockstep, batching.py) call
propose, speculate and update. Knows nothing of text or of the server.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError, MoeEngineError
from ..model.moe import MoeBlock
from .batching import PathRecorder
from .core import NonFiniteError
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
        # expert awareness, only where experts can miss (an offloading cache)
        self.evicts = bool(cache is not None and cache.evicts)
        self.routes = token_routes(core) if self.evicts else None   # token id -> experts per layer (learned online)
        self.miss_avg = 0.0                       # forecast experts not resident, per drafted token (average)
        self.load_ratio = 0.0                     # one expert load's seconds / a plain decode step's
        self.forecast_prefetches = 0              # loads started from drafts' forecasts before their verify step
        self.truncated = 0                        # drafted tokens dropped because their experts cost more than they earn
        self.draft = draft_engine(core, config) if config.method == "draft_model" else None
        self._mirrors: dict[int, object] = {}     # draft_model: seq id -> the draft model's copy of the sequence
        self.draft_failures: list[str] = []       # draft steps whose logits were NaN/inf (that step drafted nothing)

    # ---- drafts -----------------------------------------------------------------------------------
    def propose(self, seqs, limits: list[int] | None = None) -> list[list[int]]:
        """One draft per sequence (possibly empty), at most core.room(seq) tokens. With an offloading cache the
        verify step's experts are forecast from the drafted tokens: drafts are cut where a token's forecast loads
        cost more than its expected acceptance earns (ngram, draft_model), the forecast experts start loading now
        and are evicted last (cache.prefetch, cache.hint_upcoming). limits: the most tokens each may draft (a
        scheduler's token budget), else K."""
        lengths = [self.length(s) for s in seqs]
        if limits is not None:
            lengths = [min(k, n) for k, n in zip(lengths, limits)]
        routes: dict[int, list[list[frozenset[int]]]] = {}      # resident: what the exact router would pick
        if self.config.method == "ngram":
            c = self.config
            drafts = [propose_ngram(s.tokens, k, c.prompt_lookup_max, c.prompt_lookup_min) if k else []
                      for s, k in zip(seqs, lengths)]
        elif self.config.method == "resident":
            drafts = self._resident(seqs, lengths, routes)
        else:
            drafts = self._draft_model(seqs, lengths)
        if self.evicts and any(drafts):
            drafts = self._expert_aware(seqs, drafts, routes)
        return drafts

    def length(self, seq) -> int:
        """Draft length for this step: the best expected tokens per cost, within K and the sequence's room."""
        if not self.core.can_speculate(seq):
            return 0
        top = min(self.config.num_speculative_tokens, self.core.room(seq))
        if not self.config.adaptive or top == 0:
            return top
        a = min(self.accept.get(seq.seq_id, ACCEPT_PRIOR), 0.99)
        rate = [expected_tokens(a, k) / (1 + k * self.extra_cost) for k in range(top + 1)]
        k = max(range(top + 1), key=rate.__getitem__)
        idle = self.idle.get(seq.seq_id, 0)
        if k == 0 and idle >= PROBE_EVERY:      # keep measuring: a sequence that stopped drafting would never learn
            k = 1                               # that its acceptance went up again
        self.idle[seq.seq_id] = 0 if k else idle + 1
        return k

    def _resident(self, seqs, lengths: list[int], routes: dict) -> list[list[int]]:
        """Greedy drafts from the model restricted to the experts ready in the cache (read without counting a
        lookup: cache.peeking). Each draft step also records what the exact router would have picked for the
        token it fed (the verify step's forecast for that position); with an offloading cache the missing ones
        start loading before the next draft step, whose mask leaves out whatever those loads evict."""
        if not any(lengths):
            return [[] for _ in seqs]
        live = [s for s, k in zip(seqs, lengths) if k]
        base = {s.seq_id: (len(s.tokens), s.kv.length) for s in live}
        want = {s.seq_id: k for s, k in zip(seqs, lengths) if k}
        try:
            with self.cache.peeking():
                for _ in range(max(lengths)):
                    masks = self._resident_masks()
                    if masks is None:                   # a layer has fewer ready experts than top-k: stop here
                        break
                    live = [s for s in live if len(s.tokens) - base[s.seq_id][0] < want[s.seq_id]]
                    if not live:
                        break
                    with restricted(self.core.decoder, masks) as routing:
                        logits = self.core.step(live)                                   # [B, V]
                    layers = self.core.spec.moe_layers
                    for i, (s, t) in enumerate(zip(live, logits.argmax(-1).tolist())):
                        routes.setdefault(s.seq_id, []).append([frozenset(routing.exact[m][i]) for m in layers])
                        s.tokens.append(t)
                    if self.evicts:     # the fed tokens' exact experts load while drafting goes on; the experts the
                        exact = {m: frozenset(e for row in routing.exact[m] for e in row) for m in layers}
                        keep = {m: frozenset(e for row in routing.used[m] for e in row) for m in layers}
                        self._prefetch(exact, keep)     # draft just used stay for its next token
            drafts = {sid: s.tokens[base[sid][0]:] for s in seqs if (sid := s.seq_id) in base}
        finally:
            for s in seqs:
                if s.seq_id in base:
                    n, kv = base[s.seq_id]
                    del s.tokens[n:]
                    s.kv.length = kv
        return [drafts.get(s.seq_id, [])[:k] for s, k in zip(seqs, lengths)]

    def _resident_masks(self) -> dict[int, torch.Tensor] | None:
        """bool [E] per MoE layer of the experts ready in the cache now; None when a layer has fewer than top-k of
        them (a draft there would have to load)."""
        spec = self.core.spec
        masks = {}
        for layer in spec.moe_layers:
            mask = torch.zeros(spec.moe.num_experts, dtype=torch.bool)
            mask[list(self.cache.ready(layer))] = True
            if int(mask.sum()) < spec.moe.top_k:
                return None
            masks[layer] = mask
        return masks

    def _draft_model(self, seqs, lengths: list[int]) -> list[list[int]]:
        """Greedy drafts from the smaller checkpoint: each sequence has a copy in the draft model's core, fed the
        tokens the target accepted since its last draft (its keys and values past the first difference dropped),
        then k single-token steps batched over the sequences."""
        core = self.draft.core
        live, base = [], {}
        for s, k in zip(seqs, lengths):
            if not k or len(s.tokens) + k > core.max_context:   # past the draft model's context: no draft
                continue
            m = self._mirror(s)
            fed = m.tokens[:m.kv.length]
            same = next((i for i, (a, b) in enumerate(zip(fed, s.tokens)) if a != b), min(len(fed), len(s.tokens)))
            m.tokens[:] = s.tokens
            m.kv.length = min(same, len(s.tokens) - 1)          # at least the last token is fed again
            live.append(m)
            base[s.seq_id] = (m, len(m.tokens), k)
        vocab = self.core.spec.vocab_size
        try:
            for _ in range(max(lengths, default=0)):
                live = [m for m in live if len(m.tokens) - base[m.seq_id][1] < base[m.seq_id][2]]
                if not live:
                    break
                logits = core.step(live)[:, :vocab]             # [B, V]: ids the target has
                for m, t in zip(live, logits.argmax(-1).tolist()):
                    m.tokens.append(t)
        except NonFiniteError as e:         # the draft's fault, not the request's: drop its copies, draft nothing
            self.draft_failures.append(str(e))
            for sid in base:
                self._mirrors.pop(sid, None)
            return [[] for _ in seqs]
        return [base[s.seq_id][0].tokens[base[s.seq_id][1]:] if s.seq_id in base else [] for s in seqs]

    def _mirror(self, seq):
        m = self._mirrors.get(seq.seq_id)
        if m is None:
            core = self.draft.core
            room = seq.kv_tokens + self.config.num_speculative_tokens + 1
            m = core.sequence(list(seq.tokens), room - len(seq.tokens))
            m.seq_id = seq.seq_id                               # one id on both sides (the drafts are keyed by it)
            core.start(m)
            m.kv.length = 0
            self._mirrors[seq.seq_id] = m
        return m

    # ---- expert awareness -------------------------------------------------------------------------
    def _expert_aware(self, seqs, drafts: list[list[int]], routes: dict) -> list[list[int]]:
        """Forecast each fed position's experts (resident: the draft pass's exact-router picks; else the token's
        own routing history, token_routes), cut ngram / draft_model drafts by expected cost, then prefetch the
        verify step's forecast experts and tell the cache to evict them last."""
        layers = self.core.spec.moe_layers
        covered = [set(self.cache.residents(m)) for m in layers]          # loaded, or needed by the pending tokens
        plans = []
        for s, d in zip(seqs, drafts):
            fed = [s.tokens[-1], *d]
            known = routes.get(s.seq_id, [])
            paths = [known[j] if j < len(known) else self.routes.forecast(s.seq_id, t) for j, t in enumerate(fed)]
            plans.append(paths)
            if paths[0] is not None:
                for j, m in enumerate(layers):
                    covered[j] |= paths[0][j]
        out, upcoming = [], [set() for _ in layers]
        for s, d, paths in zip(seqs, drafts, plans):
            if d and self.config.method != "resident":
                d = self._cut(s, d, paths, covered)
            out.append(d)
            for path in paths[:len(d) + 1]:
                if path is not None:
                    for j in range(len(layers)):
                        upcoming[j] |= path[j]
        self._prefetch(dict(zip(layers, map(frozenset, upcoming))))
        return out

    def _cut(self, seq, draft: list[int], paths, covered: list[set[int]]) -> list[int]:
        """The draft's prefix with the best expected tokens per cost, where a drafted token's cost is the average
        one (extra_cost, measured) plus its forecast loads above the average (load_ratio each)."""
        if not self.config.adaptive:
            return draft
        a = min(self.accept.get(seq.seq_id, ACCEPT_PRIOR), 0.99)
        seen = [set(c) for c in covered]
        best, best_rate, misses = 0, 1.0, 0
        for k in range(1, len(draft) + 1):
            path = paths[k]
            new = 0 if path is None else sum(len(p - c) for p, c in zip(path, seen))
            if path is not None:
                for p, c in zip(path, seen):
                    c |= p
            misses += new
            self.miss_avg = 0.95 * self.miss_avg + 0.05 * new
            cost = 1 + k * self.extra_cost + self.load_ratio * (misses - k * self.miss_avg)
            rate = expected_tokens(a, k) / max(cost, 1e-6)
            if rate > best_rate:
                best, best_rate = k, rate
        self.truncated += len(draft) - best
        return draft[:best]

    def _prefetch(self, experts: dict[int, frozenset[int]], keep: dict[int, frozenset[int]] | None = None) -> None:
        self.cache.hint_upcoming(experts)
        self.forecast_prefetches += self.cache.prefetch(experts, keep)

    # ---- feedback ---------------------------------------------------------------------------------
    def update(self, seq, drafted: int, kept: int) -> None:
        if drafted == 0:
            return
        prev = self.accept.get(seq.seq_id, ACCEPT_PRIOR)
        self.accept[seq.seq_id] = ACCEPT_DECAY * prev + (1 - ACCEPT_DECAY) * kept / drafted
        self.drafted += drafted
        self.kept += kept

    def timed(self, tokens_fed: int, rows: int, seconds: float, plain_step: float | None) -> None:
        """A verify step's time against a plain decode step's (both measured by the driver) -> extra_cost; with an
        offloading cache also one expert load's time against the plain step (load_ratio)."""
        extra = tokens_fed - rows
        if plain_step and extra > 0:
            sample = max(0.0, seconds / plain_step - 1) / extra
            self.extra_cost = 0.8 * self.extra_cost + 0.2 * sample
        load_s = getattr(self.cache, "load_seconds", None) if self.evicts else None   # an offloading cache's
        if plain_step and load_s:
            self.load_ratio = load_s / plain_step

    def forget(self, seq) -> None:
        self.accept.pop(seq.seq_id, None)
        self.idle.pop(seq.seq_id, None)
        self._mirrors.pop(seq.seq_id, None)

    def stats(self) -> dict:
        out = {"method": self.config.method, "drafted": self.drafted, "accepted": self.kept,
               "acceptance": self.kept / self.drafted if self.drafted else None, "verify_steps": self.steps}
        if self.evicts:
            out.update(forecast_prefetches=self.forecast_prefetches, cut_tokens=self.truncated)
        if self.draft_failures:
            out["draft_failures"] = len(self.draft_failures)
        return out


def expected_tokens(a: float, k: int) -> float:
    """Tokens a verify step emits on average with a draft of k tokens each kept with probability a (in order)."""
    return (1 - a ** (k + 1)) / (1 - a)


def token_routes(core):
    """The engine's table of which experts each token id used per MoE layer (batching.PathRecorder), made once per
    generation core and fed by every step's routing from then on: the verify step's forecast for drafted ids."""
    rec = getattr(core, "token_routes", None)
    if rec is None:
        spec = core.spec
        rec = PathRecorder(spec.moe_layers, spec.vocab_size, spec.moe.num_experts, spec.moe.top_k,
                           track_paths=False)       # registered for good: no per-sequence state to outlive requests
        core.decoder.observers.add(rec)
        core.token_routes = rec
    return rec


def draft_engine(core, config: SpeculativeConfig):
    """The draft_model method's checkpoint, loaded once per generation core (every expert resident, the target's
    device and dtype; its bytes are outside the target's --gpu-mem budget), checked to share the vocabulary."""
    engines = core.__dict__.setdefault("draft_engines", {})
    key = str(config.model)
    if key not in engines:
        from .load import load                                  # load builds engines, which use this module
        try:
            draft = load(config.model, device=str(core.device), dtype=str(core.dtype).removeprefix("torch."),
                         progress=False)
        except MoeEngineError as e:
            raise ConfigError(f"speculative draft_model {config.model!r} could not be loaded: {e}") from None
        problem = vocab_mismatch(draft.tokenizer, getattr(core, "tokenizer", None))
        if problem:
            draft.close()
            raise ConfigError(f"speculative draft_model {config.model!r} does not share the model's tokenizer "
                              f"({problem}): give a draft checkpoint of the same family (\"model\" in "
                              f"--speculative-config)")
        engines[key] = draft
    return engines[key]


def vocab_mismatch(draft_tok, target_tok) -> str | None:
    """Why two tokenizers would not give the same ids to the same text (None: they agree, or one is missing, as in
    id-only checkpoints). Vocabulary sizes may differ (padded embeddings); the common token strings may not."""
    if draft_tok is None or target_tok is None:
        return None
    a, b = draft_tok.get_vocab(), target_tok.get_vocab()
    common = a.keys() & b.keys()
    differ = next((t for t in common if a[t] != b[t]), None)
    if differ is not None:
        return f"token {differ!r} is id {a[differ]} in the draft, {b[differ]} in the model"
    if len(common) < 0.99 * min(len(a), len(b)):
        return f"only {len(common)} of their {len(a)} and {len(b)} tokens are common"
    return None


class DraftRouting:
    """What a restricted pass routed, per MoE layer and token: `exact` the unrestricted router's top-k (the verify
    step's forecast), `used` the experts the draft computed with."""

    def __init__(self):
        self.exact: dict[int, list[list[int]]] = {}
        self.used: dict[int, list[list[int]]] = {}


@contextlib.contextmanager
def restricted(decoder, masks: dict[int, torch.Tensor]):
    """Every MoE block routes only among masks[layer] while the block runs, unseen by the routing observers (a
    draft is not the model's routing: predictors, recorders and profilers never hear of it). Yields a
    DraftRouting, filled at exit."""
    blocks = [m for m in decoder.modules() if isinstance(m, MoeBlock)]
    routing = DraftRouting()
    for b in blocks:
        b.restrict = masks.get(b.layer)
        b.unrestricted = [] if b.restrict is not None else None
    try:
        with decoder.observers.muted():
            yield routing
        for b in blocks:
            if b.unrestricted:
                routing.exact[b.layer] = torch.cat([e for e, _ in b.unrestricted]).tolist()
                routing.used[b.layer] = torch.cat([u for _, u in b.unrestricted]).tolist()
    finally:
        for b in blocks:
            b.restrict = b.unrestricted = None


__all__ = ["Drafter", "restricted"]
