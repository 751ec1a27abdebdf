"""Engine: the public object behind moe_engine.load(). Text <-> ids, generation, streaming, stats.

The decoder and the generation loop work on token ids only; this class adds the tokenizer,
the model's generation defaults (generation_config.json), argument checks, and the
transformers-style conventions of the public API (see ARCHITECTURE.md).
"""
from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator

import torch

from ..errors import ConfigError, MoeEngineError, PromptTooLongError, TokenizerError
from .detokenize import IncrementalText
from .generation import Timings, generate_tokens
from .sampling import Sampler, resolve_sampling
from .stats import build_stats
from .stopping import StopChecker, normalize_eos, normalize_stop

DEFAULT_MAX_NEW_TOKENS = 256


class Engine:
    """A built model: checkpoint, decoder (its experts bound to `experts`), tokenizer, budgets.

    experts: the runtime's view of the expert cache (experts.ExpertCache); observers: the decoder's stack of
    routing observers (add / remove, or `with engine.observing(recorder):`). Build one with moe_engine.load().
    """

    def __init__(self, checkpoint, decoder, experts, tokenizer, device: torch.device, dtype: torch.dtype,
                 gpu_mem: int | None = None, cpu_mem: int | None = None, plan=None, quant: dict | None = None):
        self.checkpoint = checkpoint
        self.spec = decoder.spec
        self.decoder = decoder
        self.experts = experts
        self.observers = decoder.observers
        self.tokenizer = tokenizer
        self.device, self.dtype = device, dtype
        self.gpu_mem, self.cpu_mem = gpu_mem, cpu_mem
        self.plan = plan                      # experts.plan.Placement when a budget is set, else None
        self.generation_config = dict(checkpoint.generation_config)
        self.timings = Timings()
        self._next_seq = 0                    # sequence ids handed to the predictor, unique for this engine
        self.quant = quant                    # how experts are quantized (stats "quant"), None when they are not

    # ---- ids and text ------------------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.spec.max_position_embeddings

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise TokenizerError(f"{what} needs a tokenizer, but {self.checkpoint.model_dir} has no tokenizer files "
                                 f"(tokenizer.json / tokenizer_config.json); pass token ids (a LongTensor) instead")
        return self.tokenizer

    def encode(self, text: str, chat: bool = False) -> list[int]:
        tok = self._need_tokenizer("text input")
        if not isinstance(text, str):
            raise ConfigError(f"prompt must be a str, a list of str or a LongTensor of token ids, got "
                              f"{type(text).__name__}")
        if chat:
            if not getattr(tok, "chat_template", None):
                raise TokenizerError(f"--chat needs a chat template, but the tokenizer in "
                                     f"{self.checkpoint.model_dir} has none (tokenizer_config.json "
                                     f"'chat_template'); drop --chat or add a template")
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._need_tokenizer("text output").decode(ids, skip_special_tokens=True)

    # ---- generation --------------------------------------------------------------------------
    def _eos_value(self, eos_token_id):
        if eos_token_id is not None:
            return eos_token_id
        return self.generation_config.get("eos_token_id", list(self.spec.eos_token_id))

    def _pad_id(self, eos_token_id) -> int:
        """generation_config / config pad id, else the first eos id (as transformers), else 0."""
        for value in (self.generation_config.get("pad_token_id"), self.spec.pad_token_id):
            if isinstance(value, int):
                return value
        eos = self._eos_value(eos_token_id)
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        return int(eos[0]) if eos and eos[0] is not None else 0

    def _prepare(self, rows: list[list[int]], max_new_tokens, eos_token_id, stop, kw, check_kv: bool = True) -> dict:
        """Check every argument before any work; returns what generate_tokens needs."""
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
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} is invalid: use an integer >= 0")
        if check_kv:
            self._check_kv_reserve(rows, max_new_tokens)
        eos = normalize_eos(self._eos_value(eos_token_id))
        params = resolve_sampling(self.generation_config, **kw)
        decode = self.decode if self.tokenizer is not None else None
        return dict(max_new_tokens=[min(max_new_tokens, self.max_context - len(r)) for r in rows],
                    sampler=Sampler(params, len(rows), self.device),
                    stopper=StopChecker(eos, stop, decode, len(rows)), pad_id=self._pad_id(eos_token_id))

    def _check_kv_reserve(self, rows: list[list[int]], max_new_tokens: int) -> None:
        """Under a budget the KV cache may not outgrow its reserve (B x (longest prompt + new tokens))."""
        if self.plan is None:
            return
        need = len(rows) * min(max(len(r) for r in rows) + max_new_tokens, self.max_context)
        if need > self.plan.kv_tokens:
            raise ConfigError(f"this request needs KV cache for {need} tokens ({len(rows)} prompts x up to "
                              f"{need // len(rows)} tokens) but the budget reserves {self.plan.kv_tokens} "
                              f"(max_kv_tokens); use fewer or shorter prompts, fewer max_new_tokens, or load with "
                              f"a larger max_kv_tokens and --gpu-mem")

    def _steps(self, rows, max_new_tokens, eos_token_id, stop, kw) -> Iterator[list[int | None]]:
        """Check the arguments now (not at the first step), then return the step iterator."""
        prep = self._prepare(rows, max_new_tokens, eos_token_id, stop, kw)
        self.timings = Timings()
        self._stopper = prep["stopper"]
        return generate_tokens(self.decoder, rows, device=self.device, timings=self.timings,
                               seq_ids=self._new_seq_ids(len(rows)), **prep)

    def _new_seq_ids(self, n: int) -> torch.Tensor:
        ids = torch.arange(self._next_seq, self._next_seq + n)
        self._next_seq += n
        return ids

    def generate(self, prompt, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, do_sample: bool | None = None,
                 stop=None, eos_token_id=None, seed: int | None = None, streamer=None,
                 attention_mask: torch.Tensor | None = None, chat: bool = False, max_batch: int | None = None,
                 scheduler: str = "expert"):
        """str -> str; list[str] -> list[str] (continuations); LongTensor [B, T] -> prompt + new ids.

        max_batch: run the rows through the continuous-batching loop, at most this many per decode step,
        the scheduler ("expert": rows whose experts overlap share steps; "fifo") choosing which.
        """
        self._check_open()
        kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, do_sample=do_sample, seed=seed)
        rows, kind = self._rows(prompt, attention_mask, chat)
        if streamer is not None and len(rows) != 1:
            raise ConfigError(f"streamer works with a single prompt, got a batch of {len(rows)}")
        if max_batch is not None:
            if streamer is not None:
                raise ConfigError("streamer cannot be combined with max_batch; use the server for streaming batches")
            from .offline import generate_scheduled
            prep = self._prepare(rows, max_new_tokens, eos_token_id, stop, kw, check_kv=False)
            for r in rows:                                   # each row alone must fit the KV reserve
                self._check_kv_reserve([r], max(prep["max_new_tokens"]))
            self.timings, self._stopper = Timings(), prep["stopper"]
            return self._outputs(prompt, kind, generate_scheduled(self, rows, prep, max_batch, scheduler),
                                 eos_token_id)
        new: list[list[int]] = [[] for _ in rows]
        steps = self._steps(rows, max_new_tokens, eos_token_id, stop, kw)
        if streamer is not None:
            streamer.put(torch.tensor([rows[0]]))
        for step in steps:
            for i, tok in enumerate(step):
                if tok is not None:
                    new[i].append(tok)
            if streamer is not None and step[0] is not None:
                streamer.put(torch.tensor([step[0]]))
        if streamer is not None:
            streamer.end()
        return self._outputs(prompt, kind, new, eos_token_id)

    def _rows(self, prompt, attention_mask, chat) -> tuple[list[list[int]], str]:
        if isinstance(prompt, torch.Tensor):
            ids = prompt if prompt.dim() == 2 else prompt[None]
            if ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
                raise ConfigError(f"token-id input must be an integer tensor, got {ids.dtype}")
            mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            if mask.shape != ids.shape:
                raise ConfigError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}")
            return [row[m].tolist() for row, m in zip(ids, mask)], "tensor"
        if isinstance(prompt, str):
            return [self.encode(prompt, chat)], "str"
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.encode(p, chat) for p in prompt], "list"
        raise ConfigError(f"prompt must be a str, a non-empty list of str or a LongTensor of token ids, "
                          f"got {type(prompt).__name__}")

    def _outputs(self, prompt, kind: str, new: list[list[int]], eos_token_id):
        if kind != "tensor":
            texts = [self._stopper.trim(i, self.decode(ids)) for i, ids in enumerate(new)]
            return texts[0] if kind == "str" else texts
        ids = prompt if prompt.dim() == 2 else prompt[None]
        width = max(len(n) for n in new)
        pad = self._pad_id(eos_token_id)
        tail = torch.full((len(new), width), pad, dtype=ids.dtype)
        for i, n in enumerate(new):
            tail[i, : len(n)] = torch.tensor(n, dtype=ids.dtype)
        out = torch.cat([ids.cpu(), tail], dim=1)
        return out if prompt.dim() == 2 else out[0]

    def stream(self, prompt: str, **kw) -> Iterator[str]:
        """Yield text pieces as they are generated (single str prompt); stop strings are never emitted."""
        self._check_open()
        if not isinstance(prompt, str):
            raise ConfigError("stream() takes a single str prompt")
        chat = kw.pop("chat", False)
        rows, _ = self._rows(prompt, None, chat)
        gen_kw = {k: kw.pop(k) for k in ("temperature", "top_p", "top_k", "do_sample", "seed") if k in kw}
        max_new, eos, stop = kw.pop("max_new_tokens", None), kw.pop("eos_token_id", None), kw.pop("stop", None)
        if kw:
            raise ConfigError(f"stream() got unknown arguments: {', '.join(sorted(kw))}")
        text = IncrementalText(self.decode)
        sent = 0
        hold = max((len(s) for s in normalize_stop(stop)), default=1) - 1   # could be a stop string's start
        for step in self._steps(rows, max_new, eos, stop, gen_kw):
            text.push(step[0])
            done = self._stopper.finished(0)
            visible = self._stopper.trim(0, text.text) if done else text.text
            ready = len(visible) if done else len(visible) - hold
            if ready > sent:
                yield visible[sent:ready]
                sent = ready
        final = self._stopper.trim(0, self.decode(text.ids))   # flush held-back and partial text
        if len(final) > sent:
            yield final[sent:]

    # ---- logits, stats -----------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One full forward: LongTensor [B, T] -> float32 [B, T, V]. With a mask, padding may sit on either side."""
        from .kv_cache import KVCache
        self._check_open()
        ids = input_ids.to(self.device)
        b, t = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(self.device).bool()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = KVCache.for_spec(self.spec, b, t, self.dtype, self.device)
        return self.decoder(ids, positions, cache, mask, seq_ids=self._new_seq_ids(b)).cpu()

    @contextlib.contextmanager
    def observing(self, observer):
        """Register a routing observer (model.experts.RoutingObserver) for the duration of the block."""
        self._check_open()
        self.observers.add(observer)
        try:
            yield observer
        finally:
            self.observers.remove(observer)

    def stats(self) -> dict:
        self._check_open()
        host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.device.type == "cuda":
            device_peak = torch.cuda.max_memory_allocated(self.device)
        else:   # allocator accounting of the compute tier: weights, KV reserve, expert slots, IO buffers
            weights = sum(p.numel() * p.element_size() for p in self.decoder.parameters())
            kv = self.plan.kv_bytes if self.plan else 0
            device_peak = weights + kv + self.experts.nbytes()
        out = build_stats(self.timings, self.experts.stats(), self.gpu_mem, device_peak, self.cpu_mem, host_peak)
        out["quant"] = self.quant or {"name": "none"}
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
