"""The generation core: token ids in, logits and next tokens out, over per-sequence KV caches.

    Sequence          one sequence: prompt + generated ids, its own KV cache (kv_cache.SeqKV), how it samples
                      and when it stops; `pending` = its ids not yet fed to the model
    core.step(seqs)   one forward in which every sequence feeds its pending ids: a whole prompt (prefill), the
                      one token sampled last (decode), or several (a chunk; speculative decoding's drafted run
                      to verify, with all_logits=True) -> left-padded [B, T] ids and positions, a StepKV over the
                      sequences' caches, the decoder -> logits of each sequence's last token (or of every token)
    core.sample / core.accept   next tokens from logits; the stop checks (eos ids, stop strings, length, context)

Knows nothing of text, scheduling or threads. Engine.generate() / stream() drive it on the caller's thread
(generation.py: all sequences in lockstep, or batching.Batcher's schedule), the server's EngineLoop (loop.py)
drives the same Batcher on its own thread; one core, so a sequence's tokens do not depend on who drives it.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch

from .kv_cache import SeqKV, StepKV
from .sampling import Sampler, SamplingParams
from .stopping import StopChecker


@dataclass(eq=False)
class Sequence:
    seq_id: int
    tokens: list[int]                      # the prompt, then every generated token
    prompt_len: int
    max_new: int                           # tokens it may generate (its KV cache holds prompt + max_new)
    sampler: Sampler
    stopper: StopChecker
    kv: SeqKV | None = None                # allocated when the sequence starts
    finish_reason: str | None = None       # "eos", "stop" or "length" once it has ended

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

    @contextlib.contextmanager
    def observing(self, observer):
        """`observer` sees the routing of every step while the block runs (model.experts.Observers)."""
        self.decoder.observers.add(observer)
        try:
            yield observer
        finally:
            self.decoder.observers.remove(observer)

    def sequence(self, prompt: list[int], max_new: int, params: SamplingParams | None = None, eos=(), stop=None,
                 decode=None) -> Sequence:
        """A new sequence (its KV cache is allocated by start()): it samples with `params` (None: never samples,
        e.g. a logits pass) and stops on the eos ids and stop strings (decode: ids -> text, needed for stop strings)."""
        sampler = None if params is None else Sampler(params, 1, self.device)
        return Sequence(next(self._seq_ids), list(prompt), len(prompt), max_new, sampler,
                        StopChecker(eos, stop, decode, 1))

    def start(self, seq: Sequence) -> None:
        seq.kv = SeqKV.for_spec(self.spec, seq.kv_tokens, self.dtype, self.device)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], all_logits: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Feed every sequence its pending ids in one forward. Returns float32 logits of each sequence's last id
        [B, V], or with all_logits a list of [n_i, V] (one row per id fed)."""
        feeds = [s.pending for s in seqs]
        starts = [s.kv.length for s in seqs]
        ids, mask, positions = left_pad(feeds, starts, self.device)              # [B, T] each
        kv = StepKV([s.kv for s in seqs])
        seq_ids = torch.tensor([s.seq_id for s in seqs])
        logits = self.decoder(ids, positions, kv, mask, last_only=not all_logits, seq_ids=seq_ids)
        kv.commit()
        if not all_logits:
            return logits[:, 0]
        t = ids.shape[1]
        return [logits[i, t - len(f):] for i, f in enumerate(feeds)]

    @staticmethod
    def sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """logits [B, V] -> each sequence's next token (greedy rows in one argmax, sampled rows with their own
        generator, so a row's tokens do not depend on the others)."""
        if all(s.sampler.params.greedy for s in seqs):
            return logits.argmax(-1).tolist()
        return [int(s.sampler(logits[i:i + 1])[0]) for i, s in enumerate(seqs)]

    def accept(self, seq: Sequence, token: int) -> bool:
        """Append a generated token; True when the sequence has now ended (eos, stop string, length, context)."""
        seq.tokens.append(token)
        if seq.stopper.update(0, token):
            seq.finish_reason = seq.stopper.reason(0)
        elif len(seq.tokens) - seq.prompt_len >= seq.max_new or len(seq.tokens) >= self.max_context:
            seq.finish_reason = "length"
        return seq.done


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
