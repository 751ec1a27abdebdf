"""Continuous batching: sequences join and leave the running batch between steps.

    submit(request) -> waiting queue --admit (seats, KV reserve)--> prefill alone -> first token
                                                                        |
          running sequences --scheduler picks <= max_batch (scheduling/)--> one decode step together
                                                                        |
                      per-sequence sampler + stop check -> Event(text delta, finish) -> on_event callback

One thread (the loop) owns the engine; other threads only submit, cancel and read counters.
Each sequence has its own KV cache (`SeqKV`, sized prompt + max_tokens at admission and counted
against the KV reserve); a step runs the chosen sequences together (`StepKV`): decode steps
through the CPU decode ops attend over each sequence's own cache in place, other steps gather the
caches right-aligned into one batch. Either way a row's attention sees exactly its own tokens and
the outputs of a sequence do not depend on which others share its steps. The scheduler sees each
sequence's predicted experts (those its previous token used, recorded by `PathRecorder`) and the
cache's residents.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .detokenize import IncrementalText
from .sampling import Sampler, SamplingParams
from .stopping import StopChecker


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


class SeqKV:
    """One sequence's KV cache: per layer k [Hkv, capacity, Dk], v [Hkv, capacity, Dv]; `length` slots filled."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device,
                 v_head_dim: int | None = None):
        self.k = [torch.empty(kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(kv_heads, capacity, v_head_dim or head_dim, dtype=dtype, device=device)
                  for _ in range(num_layers)]
        self.length = 0

    @classmethod
    def for_spec(cls, spec, capacity: int, dtype, device) -> "SeqKV":
        """Shaped by `spec.kv_dims` (MLA caches its compressed latent, not per-head keys and values)."""
        heads, k_dim, v_dim = spec.kv_dims
        return cls(spec.num_layers, heads, k_dim, capacity, dtype, device, v_head_dim=v_dim)


class StepKV:
    """The decoder's KV cache for one step over several sequences, right-aligned so new tokens share slots.

    Row i's cached tokens sit at slots [S - len_i, S) and its new tokens at [S, S + T) (left-padded
    when rows bring different numbers, as in a batched prefill); slot distance equals position
    distance, so sliding windows still hold. New keys/values are also
    written into each sequence's own SeqKV; `commit()` advances their lengths after the forward.

    update() gathers every row's cache into one [B, Hkv, S, D] tensor per layer and step (B x S slots
    copied). A decode step (one new token per row) can skip that: `rows()` writes the new token into
    each SeqKV and hands back views of each sequence's own cache, for attention that takes a ragged
    batch (the decode ops' attend_rows).
    """

    def __init__(self, seqs: list[SeqKV]):
        self.seqs = seqs
        self.start = max(s.length for s in seqs)
        self.valid = None
        self.t = 0

    def begin(self, token_mask: torch.Tensor) -> int:
        """token_mask [B, T]: real new tokens, left-padded (a row's real tokens are its last n_i)."""
        b, t = token_mask.shape
        valid = torch.zeros(b, self.start + t, dtype=torch.bool, device=token_mask.device)
        for i, s in enumerate(self.seqs):
            valid[i, self.start - s.length: self.start] = True
        valid[:, self.start:] = token_mask
        self.valid, self.t = valid, t
        self.new = token_mask.sum(1).tolist()                             # [B] real new tokens per row
        return self.start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, t, _ = k.shape
        out_k = k.new_zeros(b, h, self.start + t, k.shape[3])
        out_v = v.new_zeros(b, h, self.start + t, v.shape[3])
        for i, s in enumerate(self.seqs):
            n = s.length
            out_k[i, :, self.start - n: self.start] = s.k[layer][:, :n]
            out_v[i, :, self.start - n: self.start] = s.v[layer][:, :n]
            m = self.new[i]
            s.k[layer][:, n: n + m] = k[i, :, t - m:]
            s.v[layer][:, n: n + m] = v[i, :, t - m:]
        out_k[:, :, self.start:] = k
        out_v[:, :, self.start:] = v
        return out_k, out_v

    @property
    def ragged(self) -> bool:
        """This step brings exactly one new token per row, so rows() may replace update()."""
        return self.t == 1 and all(m == 1 for m in self.new)

    def rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """k, v [B, Hkv, 1, D] of a ragged step (see `ragged`), mask [B, 1, 1, start + 1] over the right-aligned
        slots -> per row i: its cache's k, v [Hkv, n_i + 1, D] with the new token written at n_i, and its mask [n_i + 1]."""
        ks, vs, ms = [], [], []
        for i, s in enumerate(self.seqs):
            n = s.length
            s.k[layer][:, n] = k[i, :, 0]
            s.v[layer][:, n] = v[i, :, 0]
            ks.append(s.k[layer][:, :n + 1])
            vs.append(s.v[layer][:, :n + 1])
            ms.append(mask[i, 0, 0, self.start - n:self.start + 1])
        return ks, vs, ms

    def commit(self) -> None:
        for s, m in zip(self.seqs, self.new):
            s.length += m


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


@dataclass(eq=False)
class _Seq:
    req: Request
    seq_id: int
    arrival: int
    kv: SeqKV | None = None
    sampler: Sampler | None = None
    stopper: StopChecker | None = None
    text: IncrementalText | None = None
    hold: int = 0
    sent: int = 0
    produced: int = 0
    last_token: int | None = None
    pending: list[int] = field(default_factory=list)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None

    @property
    def kv_tokens(self) -> int:
        return len(self.req.prompt_ids) + self.req.max_tokens
