"""The generation core: token ids in, logits and next tokens out, over per-sequence KV caches.

    Sequence          one sequence: prompt + generated ids, its own KV cache (kv_cache.SeqKV), how it samples
                      and when it stops; `pending` = its ids not yet fed to the model
    core.step(seqs)   one forward in which every sequence feeds its pending ids: a whole prompt (prefill), the
                      one token sampled last (decode), or several (a chunk; speculative decoding's drafted run
                      to verify, with all_logits=True) -> left-padded [B, T] ids and positions, a StepKV over the
                      sequences' caches, the decoder -> logits of each sequence's last token (or of every token)
    core.sample / core.accept   next tokens from logits (logits_process.py's per-sequence rules and logprobs,
                      sampling.py's choice); the stop checks (eos ids, stop strings, length, context)

Non-finite logits (NaN/inf weights, float16 overflow) are caught after every forward (one sum over the logits;
exact isfinite checks and a rerun that names the first layer only once that sum is not finite): an isolated
sequence (the server's) ends alone with finish_reason "error", any other raises NonFiniteError before the step's
KV is committed (`check_finite` switches this off).

Knows nothing of text, scheduling or threads. Engine.generate() / stream() drive it on the caller's thread
(generation.py: all sequences in lockstep, or batching.Batcher's schedule), the server's EngineLoop (loop.py)
drives the same Batcher on its own thread; one core, so a sequence's tokens do not depend on who drives it.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch

from ..errors import MoeEngineError
from .kv_cache import SeqKV, StepKV
from .logits_process import LogitsState, TokenLogprob, logprob_entry
from .sampling import Sampler, SamplingParams, warp_logits
from .speculative import verify_greedy, verify_sampled
from .stopping import StopChecker


class NonFiniteError(MoeEngineError):
    """A step's logits hold NaN or inf. seq_ids: the sequences whose logits did; layer: the first decoder layer whose
    output held them (-1: the embedding; None: only the final norm / lm_head). The step's KV was not committed."""

    def __init__(self, message: str, seq_ids: list[int], layer: int | None):
        super().__init__(message)
        self.seq_ids, self.layer = seq_ids, layer


@dataclass(eq=False)
class Sequence:
    seq_id: int
    tokens: list[int]                      # the prompt, then every generated token
    prompt_len: int
    max_new: int                           # tokens it may generate (its KV cache holds prompt + max_new)
    sampler: Sampler
    stopper: StopChecker
    kv: SeqKV | None = None                # allocated when the sequence starts
    finish_reason: str | None = None       # "eos", "stop", "length" (or "error", see isolate) once it has ended
    processor: LogitsState | None = None   # penalties, bias, masks (None: the logits are used as they come)
    constraint: object | None = None       # a grammar's TokenConstraint (runtime/grammar.py), or None
    logprobs: list[TokenLogprob] | None = None          # per generated token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None   # per prompt token (the first is None)
    isolate: bool = False                  # a failure to pick its token ends it alone ("error") instead of raising
    error: str | None = None               # why it failed, with finish_reason "error"

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def pending(self) -> list[int]:
        """Ids the model has not seen yet: the prompt at first, then the token sampled last."""
        return self.tokens[self.kv.length:]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def kv_tokens(self) -> int:
        """KV cache slots it reserves."""
        return self.prompt_len + self.max_new


class GenerationCore:
    def __init__(self, decoder, device: torch.device, dtype: torch.dtype):
        self.decoder, self.spec = decoder, decoder.spec
        self.device, self.dtype = device, dtype
        self.max_context = self.spec.max_position_embeddings
        self._seq_ids = itertools.count()      # unique for this engine: predictors tell sequences apart by them
        self.check_finite = True               # refuse NaN/inf logits (see the module docstring)
        self.tokenizer = None                  # the engine's, if any (a speculative draft model must share it)

    @contextlib.contextmanager
    def observing(self, observer):
        """`observer` sees the routing of every step while the block runs (model.experts.Observers)."""
        self.decoder.observers.add(observer)
        try:
            yield observer
        finally:
            self.decoder.observers.remove(observer)

    def sequence(self, prompt: list[int], max_new: int, params: SamplingParams | None = None, eos=(), stop=None,
                 decode=None, constraint=None, isolate: bool = False, keep_stop: bool = False) -> Sequence:
        """A new sequence (its KV cache is allocated by start()): it samples with `params` (None: never samples,
        e.g. a logits pass) and stops on the eos ids and stop strings (decode: ids -> text, needed for stop strings;
        keep_stop: the text keeps the stop string that ended it). constraint: a grammar's TokenConstraint;
        isolate: see Sequence.isolate (the server's loop sets it)."""
        sampler = None if params is None else Sampler(params, 1, self.device)
        stopper = StopChecker(eos, stop, decode, 1, min_tokens=params.min_tokens if params else 0, keep_stop=keep_stop)
        seq = Sequence(next(self._seq_ids), list(prompt), len(prompt), max_new, sampler, stopper,
                       constraint=constraint, isolate=isolate)
        if params is not None:
            params.check_vocab(self.spec.vocab_size)
            if params.processes:
                seq.processor = LogitsState(params, self.spec.vocab_size, seq.tokens, stopper.eos_token_ids)
            seq.logprobs = [] if params.logprobs is not None else None
            seq.prompt_logprobs = [] if params.prompt_logprobs is not None else None
        return seq

    def start(self, seq: Sequence) -> None:
        seq.kv = SeqKV.for_spec(self.spec, seq.kv_tokens, self.dtype, self.device)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], all_logits: bool = False,
             feed: list[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Feed every sequence its pending ids in one forward, or only the first feed[i] of them (a prompt chunk:
        the logits of a sequence left with pending ids are of its prompt's middle, not for sampling). Returns
        float32 logits of each sequence's last id fed [B, V], or with all_logits a list of [n_i, V] (one row per
        id fed)."""
        feeds = [s.pending for s in seqs]
        if feed is not None:
            if len(feed) != len(seqs) or any(not 1 <= n <= len(f) for n, f in zip(feed, feeds)):
                raise ValueError(f"feed={feed} must give each of the {len(seqs)} sequences 1..its pending ids "
                                 f"({[len(f) for f in feeds]})")
            feeds = [f[:n] for f, n in zip(feeds, feed)]
        starts = [s.kv.length for s in seqs]
        ids, mask, positions = left_pad(feeds, starts, self.device)              # [B, T] each
        kv = StepKV([s.kv for s in seqs])
        seq_ids = torch.tensor([s.seq_id for s in seqs])
        scored = [s.prompt_logprobs is not None and start < s.prompt_len for s, start in zip(seqs, starts)]
        every = all_logits or any(scored)
        logits = self.decoder(ids, positions, kv, mask, last_only=not every, seq_ids=seq_ids)
        if self.check_finite and not bool(torch.isfinite(logits.sum()).all()):      # one pass; exact check below
            self._nonfinite(seqs, logits, (ids, positions, kv, mask), seq_ids, every)
        kv.commit()
        for s, start, n, want, row in zip(seqs, starts, map(len, feeds), scored, logits):
            if want and s.error is None:
                _score_prompt(s, start, row[row.shape[0] - n:])
        if not all_logits:
            return logits[:, -1]
        t = ids.shape[1]
        return [logits[i, t - len(f):] for i, f in enumerate(feeds)]

    def _nonfinite(self, seqs: list[Sequence], logits: torch.Tensor, step_args, seq_ids, every: bool) -> None:
        """Some logits sum to NaN/inf: find the rows with a non-finite logit (real tokens only), rerun the step to
        name the first layer, then end isolated rows alone ("error") or raise NonFiniteError for the step."""
        finite = torch.isfinite(logits).all(-1)                                  # [B, T or 1]
        if every:
            finite |= ~step_args[3]                                              # padding rows do not count
        bad = [i for i in range(len(seqs)) if not bool(finite[i].all())]
        if not bad:
            return                                                               # a finite sum that overflowed
        layer = self.decoder.first_nonfinite(*step_args, bad, seq_ids)
        where = ("the token embedding" if layer == -1 else f"the output of decoder layer {layer} (layers 0.."
                 f"{self.spec.num_layers - 1})" if layer is not None else "the final norm / lm_head")
        msg = (f"the model produced NaN/inf logits for {len(bad)} of {len(seqs)} sequences in this step; they first "
               f"appear in {where}: the checkpoint's weights there hold NaN/inf values, or float16 overflowed (check "
               f"the checkpoint, or load it with dtype bfloat16 or float32)")
        if all(seqs[i].isolate for i in bad):
            for i in bad:
                seqs[i].finish_reason, seqs[i].error = "error", f"NonFiniteError: {msg}"
            return
        raise NonFiniteError(msg, [seqs[i].seq_id for i in bad], layer)

    @staticmethod
    def sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
        """logits [B, V] -> each sequence's next token (plain greedy rows in one argmax, the others one by one with
        their own rules and generator, so a row's tokens do not depend on the others). None for a sequence that
        gets no token: max_new == 0 (it ends with "length"), or an isolated one whose choice failed ("error")."""
        if all(_plain_greedy(s) for s in seqs):
            return logits.argmax(-1).tolist()
        return [_pick(s, logits[i:i + 1]) for i, s in enumerate(seqs)]

    def accept(self, seq: Sequence, token: int | None) -> bool:
        """Append a generated token; True when the sequence has now ended (eos, stop string, length, context).
        token None (see sample): the sequence has ended without one."""
        if token is None:
            seq.finish_reason = seq.finish_reason or "length"
            return True
        seq.tokens.append(token)
        if seq.processor is not None:
            seq.processor.accept(token)
        if seq.constraint is not None:
            seq.constraint.accept(token)
        if seq.stopper.update(0, token):
            seq.finish_reason = seq.stopper.reason(0)
        elif seq.constraint is not None and seq.constraint.finished:   # the grammar is complete: only eos could follow
            seq.finish_reason = "stop"
        elif len(seq.tokens) - seq.prompt_len >= seq.max_new or len(seq.tokens) >= self.max_context:
            seq.finish_reason = "length"
        return seq.done


    # ---- speculative decoding ------------------------------------------------------------------------
    @staticmethod
    def can_speculate(seq: Sequence) -> bool:
        """Drafts are verified for sequences without per-token processors or logprobs (a grammar is fine: its masks
        follow the draft, runtime/grammar.py allowed_along)."""
        return seq.processor is None and seq.logprobs is None and seq.error is None and seq.max_new > 0

    def room(self, seq: Sequence) -> int:
        """Draft tokens the sequence's KV cache and token limit leave room to verify."""
        left = min(seq.kv.capacity, self.max_context) - seq.kv.length - 1
        return max(0, min(left, seq.max_new - len(seq.generated) - 1))

    @torch.inference_mode()
    def speculate(self, seqs: list[Sequence], drafts: list[list[int]]) -> list[list[int | None]]:
        """One verify step: each sequence feeds its pending token and its draft (can_speculate, at most room()) in
        one forward; returns the tokens each emits: the draft's kept prefix and one more (greedy: exactly what
        greedy decoding would emit; sampled: speculative rejection sampling, the same law as sampling alone). A
        sequence with an empty draft picks its token as sample() would ([None]: see sample). The KV cache keeps the
        fed tokens up to the last kept draft token; the caller accepts the returned tokens one by one (a stop
        in the middle discards the rest)."""
        bases = [len(s.tokens) for s in seqs]
        for s, d in zip(seqs, drafts):
            if d and (not self.can_speculate(s) or len(d) > self.room(s)):
                raise ValueError(f"sequence {s.seq_id} cannot verify a draft of {len(d)} tokens "
                                 f"(room {self.room(s)}, can_speculate {self.can_speculate(s)})")
            s.tokens.extend(d)                                   # fed with the pending token, taken back below
        try:
            rows = self.step(seqs, all_logits=True)              # [1 + k_i, V] each
        finally:
            for s, base in zip(seqs, bases):
                del s.tokens[base:]
        out = []
        for s, d, r in zip(seqs, drafts, rows):
            if not d or s.error is not None:                     # no draft, or its logits failed (NaN/inf)
                out.append([_pick(s, r[-1:])])
                continue
            kept = _verify(s, r, d)
            s.kv.length -= len(d) - (len(kept) - 1)              # forget the rejected drafts' keys and values
            out.append(kept)
        return out


def _verify(s: Sequence, rows: torch.Tensor, draft: list[int]) -> list[int]:
    """rows [k+1, V] raw logits along the draft -> the tokens to emit (grammar masks applied along the draft)."""
    scores = rows.float()
    if s.constraint is not None:
        scores = scores.masked_fill(~s.constraint.allowed_along(draft).to(scores.device), float("-inf"))
    params = s.sampler.params
    if params.greedy:
        return verify_greedy(scores, draft)
    probs = warp_logits(scores, params).softmax(-1)             # [k+1, V]
    return verify_sampled(probs, draft, None, s.sampler.generator(0))


def _plain_greedy(s: Sequence) -> bool:
    return (s.sampler.params.greedy and s.processor is None and s.constraint is None and s.logprobs is None
            and s.max_new > 0 and s.error is None)


def _pick(s: Sequence, raw: torch.Tensor) -> int | None:
    """One sequence's next token from its raw logits [1, V]: processors, grammar mask, greedy or a draw, logprob."""
    if s.max_new == 0 or s.error is not None:       # nothing to pick, or its step failed (NaN/inf logits)
        return None
    try:
        scores = s.processor.process(raw) if s.processor is not None else raw
        if s.constraint is not None:
            scores = scores.float().masked_fill(~s.constraint.allowed().to(scores.device)[None], float("-inf"))
        if not torch.isfinite(scores).any():
            raise ValueError("every token is excluded (allowed_token_ids, logit_bias, min_tokens and the grammar "
                             "leave none)")
        token = int(scores.argmax(-1)[0]) if s.sampler.params.greedy else int(s.sampler(scores)[0])
    except Exception as e:   # noqa: BLE001 -- an isolated sequence fails alone; the others keep their tokens
        if not s.isolate:
            raise
        s.finish_reason, s.error = "error", f"{type(e).__name__}: {e}"
        return None
    if s.logprobs is not None:
        s.logprobs.append(logprob_entry(raw[0], token, s.sampler.params.logprobs))
    return token


def _score_prompt(s: Sequence, start: int, rows: torch.Tensor) -> None:
    """Prompt logprobs from the logits of the prompt ids fed at positions start.. (rows [n, V]): row j scores the
    prompt id at start + j + 1. The first prompt id has no logprob (None), as in vLLM."""
    if start == 0:
        s.prompt_logprobs.append(None)
    k = s.sampler.params.prompt_logprobs
    for j in range(rows.shape[0]):
        pos = start + j + 1
        if pos < s.prompt_len:
            s.prompt_logprobs.append(logprob_entry(rows[j], s.tokens[pos], k))


def left_pad(feeds: list[list[int]], starts: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ids, each continuing a sequence at position starts[i] -> ids [B, T] (left-padded with 0),
    token_mask [B, T] bool and positions [B, T] (padding takes its row's first position)."""
    t = max(len(f) for f in feeds)
    ids = torch.zeros(len(feeds), t, dtype=torch.long)
    mask = torch.zeros(len(feeds), t, dtype=torch.bool)
    for i, f in enumerate(feeds):
        if f:
            ids[i, t - len(f):] = torch.tensor(f, dtype=torch.long)
            mask[i, t - len(f):] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + torch.tensor(starts, dtype=torch.long)[:, None]
    return ids.to(device), mask.to(device), positions.to(device)
