"""Engine: the public object behind moe_engine.load(). Text <-> ids, generation, streaming, logits, stats.

The generation core (core.py) works on token ids only; this class adds the tokenizer (prompts.py), the
model's generation defaults (generation_config.json), argument checks, and the transformers-style
conventions of the public API (see docs/architecture.md). Every call keeps its state to itself (its
sequences, samplers, stop checkers, text streams) and returns its results; the engine only remembers
the last call's timings for stats().
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from ..config import check_choice, check_int
from ..errors import ConfigError, MoeEngineError, PromptTooLongError
from .core import GenerationCore, Sequence
from .drafting import Drafter
from .generation import Timings, lockstep, scheduled, speculative_lockstep
from .prompts import TextCodec, prompt_rows, tensor_output
from .sampling import resolve_sampling
from .speculative import SpeculativeConfig, choose
from .stats import SpeculationCount, build_stats
from .stopping import normalize_eos
from .textstream import TextStream

DEFAULT_MAX_NEW_TOKENS = 256
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "do_sample", "seed", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "logit_bias", "allowed_token_ids", "min_new_tokens")


class Engine:
    """A built model: checkpoint, decoder (its experts bound to `experts`), tokenizer, budgets.

    experts: the runtime's view of the expert cache (experts.ExpertCache); observers: the decoder's stack of
    routing observers (add / remove, or `with engine.observing(recorder):`); core: the token-id generation
    core. Build one with moe_engine.load().
    """

    def __init__(self, checkpoint, decoder, experts, tokenizer, device: torch.device, dtype: torch.dtype,
                 gpu_mem: int | None = None, cpu_mem: int | None = None, plan=None, quant: dict | None = None,
                 speculative: SpeculativeConfig | None = None):
        self.checkpoint, self.decoder, self.spec = checkpoint, decoder, decoder.spec
        self.experts = experts
        self.observers = decoder.observers
        self.tokenizer = tokenizer
        self.text = TextCodec(tokenizer, checkpoint.model_dir)
        self.core = GenerationCore(decoder, device, dtype)
        self.core.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self.gpu_mem, self.cpu_mem = gpu_mem, cpu_mem
        self.plan = plan                      # experts.plan.Placement when a budget is set, else None
        self.generation_config = dict(checkpoint.generation_config)
        self.timings = Timings()              # the last generate / stream call's (stats "latency")
        self.quant = quant                    # how experts are quantized (stats "quant"), None when they are not
        self.speculative_config = speculative  # load(speculative_config=...): generate/stream's and the server's
        self.speculation: dict | None = None  # the last speculative call's drafts and acceptance (or the server's)

    @property
    def max_context(self) -> int:
        return self.spec.max_position_embeddings

    def encode(self, text: str, chat: bool = False) -> list[int]:
        return self.text.encode(text, chat)

    def decode(self, ids: list[int]) -> str:
        return self.text.decode(ids)

    def eos_ids(self, eos_token_id):
        """The end-of-sequence ids in force: the argument, else generation_config.json's, else config.json's."""
        if eos_token_id is not None:
            return eos_token_id
        return self.generation_config.get("eos_token_id", list(self.spec.eos_token_id))

    # ---- generation --------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, do_sample: bool | None = None,
                 stop=None, eos_token_id=None, seed: int | None = None, streamer=None,
                 attention_mask: torch.Tensor | None = None, chat: bool = False, max_batch: int | None = None,
                 scheduler: str = "expert", min_p: float | None = None, repetition_penalty: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 logit_bias: dict | None = None, allowed_token_ids: list[int] | None = None,
                 min_new_tokens: int | None = None, speculative_config=None):
        """str -> str; list[str] -> list[str] (continuations); LongTensor [B, T] -> prompt + new ids.

        Sampling controls (transformers' names where it has them): temperature, top_k, top_p, min_p,
        repetition_penalty (prompt and generated ids), min_new_tokens (eos and stop strings ignored before), and
        OpenAI's presence_penalty / frequency_penalty (generated ids), logit_bias ({token id: bias}) and
        allowed_token_ids; see runtime/logits_process.py for their order.

        speculative_config: vLLM's --speculative-config as a dict or JSON ({"method": "ngram" | "resident",
        "num_speculative_tokens": K, ...}; runtime/speculative.py): drafts verified K + 1 tokens per step. Greedy
        tokens are exactly those without it; sampled tokens follow the same law (not the same draws for a seed).
        None (default): load()'s speculative_config; False: none for this call. Rows with per-token processors
        (penalties, logit_bias, allowed_token_ids, min_new_tokens) are decoded without drafts.

        The rows prefill together and decode together, one token each per step. max_batch: at most this many
        rows per decode step instead, the scheduler ("expert": rows whose experts overlap share steps; "fifo")
        choosing which, and rows admitted as the KV reserve allows (the server's schedule); tokens are the same.
        """
        self._check_open()
        kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, do_sample=do_sample, seed=seed, min_p=min_p,
                  repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, logit_bias=logit_bias, allowed_token_ids=allowed_token_ids,
                  min_new_tokens=min_new_tokens)
        rows, kind = prompt_rows(self.text, prompt, attention_mask, chat)
        if streamer is not None and (len(rows) != 1 or max_batch is not None):
            raise ConfigError(f"streamer works with a single prompt and no max_batch, got {len(rows)} prompts"
                              f"{' and max_batch' if max_batch is not None else ''}; use the server to stream batches")
        if max_batch is not None:
            check_int(max_batch, "max_batch")
            check_choice(scheduler, "scheduler", ("expert", "fifo"))
        seqs = self._sequences(rows, max_new_tokens, eos_token_id, stop, kw, alone=max_batch is not None)
        timings = Timings()
        spec = choose(speculative_config, self.speculative_config)
        drafter = Drafter(self.core, self.experts, spec) if spec is not None else None
        count = SpeculationCount(self.experts, drafter)
        if max_batch is not None:
            batcher = scheduled(self.core, self.experts, seqs, max_batch, scheduler,
                                self.plan and self.plan.kv_tokens, timings, drafter)
            count.rows, count.tokens = batcher.decode_rows, batcher.decode_tokens
        else:
            steps = speculative_lockstep(self.core, drafter, seqs, timings) if drafter is not None else \
                ([[] if t is None else [t] for t in step] for step in lockstep(self.core, seqs, timings))
            if streamer is not None:
                streamer.put(torch.tensor([rows[0]]))
            for step in count.steps(steps):             # each sequence's new tokens of the step
                if streamer is not None and step[0]:
                    streamer.put(torch.tensor(step[0]))
            if streamer is not None:
                streamer.end()
        self.timings = timings
        if drafter is not None:
            self.speculation = count.report(sum(len(s.generated) for s in seqs))
        if kind == "tensor":
            return tensor_output(prompt, [s.generated for s in seqs], self._pad_id(eos_token_id))
        texts = [s.stopper.trim(0, self.decode(s.generated)) for s in seqs]
        return texts[0] if kind == "str" else texts

    def stream(self, prompt: str, **kw) -> Iterator[str]:
        """Yield text pieces as they are generated (single str prompt); stop strings are never emitted."""
        self._check_open()
        if not isinstance(prompt, str):
            raise ConfigError("stream() takes a single str prompt")
        rows = [self.encode(prompt, kw.pop("chat", False))]
        gen_kw = {k: kw.pop(k) for k in SAMPLING_KEYS if k in kw}
        max_new, eos, stop = kw.pop("max_new_tokens", None), kw.pop("eos_token_id", None), kw.pop("stop", None)
        spec = choose(kw.pop("speculative_config", None), self.speculative_config)
        if kw:
            raise ConfigError(f"stream() got unknown arguments: {', '.join(sorted(kw))}")
        seq = self._sequences(rows, max_new, eos, stop, gen_kw)[0]
        text, timings = TextStream(self.decode, seq.stopper), Timings()
        drafter = Drafter(self.core, self.experts, spec) if spec is not None else None
        count = SpeculationCount(self.experts, drafter)
        steps = speculative_lockstep(self.core, drafter, [seq], timings) if drafter is not None else \
            ([[] if t is None else [t] for t in step] for step in lockstep(self.core, [seq], timings))
        try:
            for step in count.steps(steps):
                new = step[0]
                for i, token in enumerate(new):
                    piece = text.push(token, seq.done and i == len(new) - 1)
                    if piece:
                        yield piece
        finally:
            self.timings = timings
            if drafter is not None:
                self.speculation = count.report(len(seq.generated))

    def _sequences(self, rows: list[list[int]], max_new_tokens, eos_token_id, stop, kw: dict,
                   alone: bool = False) -> list[Sequence]:
        """Every argument checked before any work, then one Sequence per row (row i samples with seed + i).
        alone: each row must fit the KV reserve by itself (the schedule admits rows as they fit), not all together."""
        for i, r in enumerate(rows):
            if not r:
                raise ConfigError(f"prompt {i} is empty: give at least one token")
            if len(r) >= self.max_context:
                raise PromptTooLongError(f"prompt {i} has {len(r)} tokens but the model's context is "
                                         f"{self.max_context} (max_position_embeddings in config.json); "
                                         f"shorten the prompt")
            if max(r) >= self.spec.vocab_size or min(r) < 0:
                raise ConfigError(f"prompt {i} has token id {max(r)} outside the vocabulary 0..{self.spec.vocab_size - 1}")
        if max_new_tokens is None:
            max_new_tokens = self.generation_config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        check_int(max_new_tokens, "max_new_tokens", minimum=0)
        new = [min(max_new_tokens, self.max_context - len(r)) for r in rows]
        kv = [len(r) + n for r, n in zip(rows, new)]                           # each sequence's KV cache
        for need in (kv if alone else [sum(kv)]):
            self._check_kv_reserve(1 if alone else len(rows), need)
        eos = normalize_eos(self.eos_ids(eos_token_id))
        kw = dict(kw)
        kw["min_tokens"] = kw.pop("min_new_tokens", None)
        params = resolve_sampling(self.generation_config, **kw)
        return [self.core.sequence(r, n, params if params.seed is None else dataclasses.replace(params, seed=params.seed + i),
                                   eos, stop, self.text.decoder) for i, (r, n) in enumerate(zip(rows, new))]

    def _check_kv_reserve(self, prompts: int, need: int) -> None:
        """Under a budget the sequences' KV caches (prompt + new tokens each) may not outgrow the reserve."""
        if self.plan is not None and need > self.plan.kv_tokens:
            raise ConfigError(f"this request needs KV cache for {need} tokens ({prompts} prompts and the tokens "
                              f"they may generate) but the budget reserves {self.plan.kv_tokens} (max_kv_tokens); "
                              f"use fewer or shorter prompts, fewer max_new_tokens, or load with a larger "
                              f"max_kv_tokens and --gpu-mem")

    def _pad_id(self, eos_token_id) -> int:
        """generation_config / config pad id, else the first eos id (as transformers), else 0."""
        for value in (self.generation_config.get("pad_token_id"), self.spec.pad_token_id):
            if isinstance(value, int):
                return value
        eos = self.eos_ids(eos_token_id)
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        return int(eos[0]) if eos and eos[0] is not None else 0

    # ---- logits, observers, stats ------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One full forward: LongTensor [B, T] -> float32 [B, T, V]. With a mask, padding may sit on either side
        (each row's real tokens are one sequence; positions the mask hides hold zeros)."""
        self._check_open()
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        out = torch.zeros(*input_ids.shape, self.spec.vocab_size)
        rows = [(i, row[m].tolist()) for i, (row, m) in enumerate(zip(input_ids.cpu(), mask.cpu())) if m.any()]
        if not rows:
            return out
        seqs = [self.core.sequence(r, 0) for _, r in rows]
        for s in seqs:
            self.core.start(s)
        for (i, _), logits in zip(rows, self.core.step(seqs, all_logits=True)):
            out[i, mask[i].cpu()] = logits.cpu()
        return out

    @contextlib.contextmanager
    def observing(self, observer):
        """Register a routing observer (model.experts.RoutingObserver) for the duration of the block."""
        self._check_open()
        with self.core.observing(observer):
            yield observer

    def stats(self) -> dict:
        self._check_open()
        if self.device.type == "cuda":
            device_peak = torch.cuda.max_memory_allocated(self.device)
        else:   # allocator accounting of the compute tier: weights (quantized dense ones are buffers), KV reserve,
            # expert slots, IO buffers
            weights = sum(t.numel() * t.element_size() for t in (*self.decoder.parameters(), *self.decoder.buffers()))
            kv = self.plan.kv_bytes if self.plan else 0
            device_peak = weights + kv + self.experts.nbytes()
        out = build_stats(self.timings, self.experts.stats(), self.gpu_mem, device_peak, self.cpu_mem)
        out["quant"] = self.quant or {"name": "none"}
        if self.speculation is not None:
            out["speculation"] = dict(self.speculation)
        return out

    def close(self) -> None:
        """Release weights, loader threads and file handles; later calls raise MoeEngineError. Idempotent."""
        if self.experts is not None:
            self.experts.close()
        self.checkpoint.close()
        self.experts = None
        self.decoder = None

    def _check_open(self) -> None:
        if self.decoder is None:
            raise MoeEngineError(f"this Engine ({self.checkpoint.model_dir}) is closed; "
                                 f"call moe_engine.load() again to use the model")
