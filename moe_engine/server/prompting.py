"""Request prompts to token ids: completions' prompts, chat messages through the chat template, /tokenize.

    completions: str | [str] | ids | [ids] -> rows of ids (+ the texts echo shows)
    chat:        messages (+ add_generation_prompt, continue_final_message, chat_template_kwargs,
                 reasoning_effort, tools from the caller) -> template text -> ids (+ the text chat's echo shows)
    both:        a text too long for the context is refused by its length before it is tokenized;
                 truncate_prompt_tokens keeps the last k ids; every row is checked against vocabulary and context

Runs on a worker thread (tokenizing is CPU work); knows nothing of HTTP beyond raising APIError.
"""
from __future__ import annotations

import dataclasses
import threading

from ..runtime.grammar import GrammarCompiler
from ..runtime.stopping import normalize_eos
from . import tools as tooling
from .protocol import APIError

# arguments of apply_chat_template the server sets itself: a request may not pass them in chat_template_kwargs
_RESERVED = {"conversation", "messages", "tools", "documents", "chat_template", "tokenize", "add_generation_prompt",
             "continue_final_message", "return_dict", "return_tensors", "truncation", "padding", "max_length"}


class Prompter:
    """One engine's prompt building: its tokenizer, chat template, context limit and vocabulary."""

    def __init__(self, engine, limit: int, chat_template: str | None):
        self.engine, self.limit, self.tok = engine, limit, engine.tokenizer
        self.vocab = engine.spec.vocab_size
        self.template = chat_template or (getattr(self.tok, "chat_template", None) if self.tok else None)
        self._longest = self._compiler = self._renders_tools = None
        self._lock = threading.Lock()

    def need_tokenizer(self, what: str):
        if self.tok is None:
            raise APIError(400, f"{what} needs a tokenizer, but the model has none; send token ids as the prompt")
        return self.tok

    # ---- completions ---------------------------------------------------------------------------
    def completion(self, body) -> tuple[list[list[int]], list[str]]:
        """Rows of ids and the text of each prompt (what echo shows)."""
        p = body.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            tok = self.need_tokenizer("a text prompt")
            texts = [p] if isinstance(p, str) else p
            special = body.add_special_tokens if body.add_special_tokens is not None else True
            rows = []
            for i, text in enumerate(texts):
                self.check_length(text, "prompt" if len(texts) == 1 else f"prompt[{i}]", body)
                rows.append(tok(text, add_special_tokens=special)["input_ids"])
        else:
            rows = [p] if not p or isinstance(p[0], int) else p
            texts = None
        if not rows:
            raise APIError(400, "prompt is an empty list: give at least one prompt", "prompt")
        rows = [self.truncate(r, body) for r in rows]
        for i, ids in enumerate(rows):
            self.check(ids, "prompt" if len(rows) == 1 else f"prompt[{i}]")
        if texts is None or body.truncate_prompt_tokens is not None:
            texts = [self.decode(r) for r in rows] if self.tok is not None else [""] * len(rows)
        return rows, texts

    # ---- chat ----------------------------------------------------------------------------------
    def chat(self, body, plan: tooling.ToolPlan | None = None) -> tuple[list[int], str]:
        """The ids of the rendered conversation and the text chat's echo shows (the last message when it is the
        assistant's, vLLM's rule)."""
        tok = self.need_tokenizer("chat")
        if not self.template:
            raise APIError(400, "this model has no chat template (tokenizer_config.json 'chat_template'); start the "
                           "server with --chat-template FILE or use /v1/completions")
        messages = tooling.messages_for_template([m.for_template() for m in body.messages])
        if body.add_generation_prompt and body.continue_final_message:
            raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true; set "
                           "add_generation_prompt: false to continue the final message", "continue_final_message")
        if body.continue_final_message and messages[-1]["role"] != "assistant":
            raise APIError(400, "continue_final_message needs the last message to be the assistant's",
                           "continue_final_message")
        kwargs = self._template_kwargs(body)
        if plan is not None:
            kwargs.update(plan.template_kwargs())
        for m in body.messages:
            self.check_length(m.text(), "messages", body)
        try:
            text = tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                           add_generation_prompt=body.add_generation_prompt,
                                           continue_final_message=body.continue_final_message, **kwargs)
        except Exception as e:   # noqa: BLE001 -- a template may raise on any message it rejects
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        special = body.add_special_tokens if body.add_special_tokens is not None else False
        ids = self.truncate(tok(text, add_special_tokens=special)["input_ids"], body)
        self.check(ids, "messages")
        echo = messages[-1]["content"] if body.echo and messages[-1]["role"] == "assistant" else ""
        return ids, echo

    def _template_kwargs(self, body) -> dict:
        """chat_template_kwargs and reasoning_effort, each refused unless the template reads it."""
        kwargs = dict(body.chat_template_kwargs or {})
        reserved = sorted(set(kwargs) & _RESERVED)
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {reserved[0]!r}: the server sets it (use the "
                           f"request field instead)", "chat_template_kwargs")
        if body.reasoning_effort is not None:
            kwargs["reasoning_effort"] = body.reasoning_effort
        for key in kwargs:
            if key not in self.template:
                field = "reasoning_effort" if key == "reasoning_effort" and body.reasoning_effort else \
                    "chat_template_kwargs"
                raise APIError(400, f"{key!r} is not used by this model's chat template, so it would have no "
                               f"effect; remove it", field)
        return kwargs

    # ---- structured output and tools -----------------------------------------------------------
    def structure(self, body, chat: bool):
        """(tool plan or None, a factory of per-choice TokenConstraints or None) for the request's
        response_format / structured_outputs / guided_* and, in chat, tools + tool_choice + parallel_tool_calls."""
        guided = {k: getattr(body, k) for k in tooling.LEGACY_GUIDED if getattr(body, k) is not None}
        output = tooling.output_constraint(response_format=body.response_format,
                                           structured_outputs=body.structured_outputs, **guided)
        plan = tooling.plan_tools(body.tools, body.tool_choice, output=output) if chat else None
        if chat and body.parallel_tool_calls is not None:
            plan = self._parallel(plan, body.parallel_tool_calls)
        if plan is not None and plan.mode == "auto" and not self.renders_tools():
            raise APIError(400, "tool_choice \"auto\" needs a chat template that puts the tools in the prompt, and "
                           "this model's does not; use tool_choice \"required\" or a named function, or start the "
                           "server with a --chat-template that renders tools", "tool_choice")
        constraint = plan.constraint if plan is not None and plan.constraint is not None else output
        if constraint is None:
            return plan, None
        return plan, constraint.compile(self.compiler()).new

    def _parallel(self, plan, parallel: bool):
        if plan is None or plan.mode == "none":
            raise APIError(400, "parallel_tool_calls has no effect without tools (and a tool_choice other than "
                           "\"none\"); remove it", "parallel_tool_calls")
        if parallel or plan.mode == "named":
            return plan
        if plan.mode == "required":
            spec = {**plan.constraint.spec, "maxItems": 1}
            return dataclasses.replace(plan, constraint=dataclasses.replace(plan.constraint, spec=spec))
        raise APIError(400, "parallel_tool_calls: false can only be enforced with tool_choice \"required\" or a "
                       "named function; under \"auto\" the model's template decides", "parallel_tool_calls")

    def compiler(self) -> GrammarCompiler:
        """The engine's grammar compiler, made on first use (it reads the whole vocabulary)."""
        with self._lock:
            if self._compiler is None:
                tok = self.need_tokenizer("structured output")
                self._compiler = GrammarCompiler(tok, self.vocab, self.engine_eos())
            return self._compiler

    def engine_eos(self) -> list[int]:
        """The model's end-of-sequence ids (generation_config.json's, else config.json's)."""
        return sorted(normalize_eos(self.engine.eos_ids(None)))

    def renders_tools(self) -> bool:
        if self._renders_tools is None:
            self._renders_tools = bool(self.tok is not None and self.template
                                       and tooling.chat_template_renders_tools(self.tok, self.template))
        return self._renders_tools

    # ---- shared checks -------------------------------------------------------------------------
    def check_length(self, text: str, what: str, body=None) -> None:
        """Refuse a text that cannot fit the context before tokenizing it: no token covers more characters than
        the longest token of the vocabulary. (truncate_prompt_tokens keeps a long text: it is cut after.)"""
        if body is not None and body.truncate_prompt_tokens is not None:
            return
        if len(text) > self.limit * self.longest_token():
            raise APIError(400, f"This model's maximum context length is {self.limit} tokens. However, your {what} "
                           f"has {len(text)} characters, more than {self.limit} tokens can hold; shorten it", what)

    def longest_token(self) -> int:
        if self._longest is None:
            self._longest = max((len(t) for t in self.tok.get_vocab()), default=1) if self.tok else 1
        return max(1, self._longest)

    def truncate(self, ids: list[int], body) -> list[int]:
        k = body.truncate_prompt_tokens
        if k is None:
            return ids
        if k == 0:
            raise APIError(400, "truncate_prompt_tokens=0 would leave no prompt: use k >= 1 (keep the last k "
                           "tokens) or -1 (as many as the context allows)", "truncate_prompt_tokens")
        keep = self.limit - 1 if k == -1 else k
        return ids[-keep:] if len(ids) > keep else ids

    def check(self, ids: list[int], what: str) -> None:
        if not ids:
            raise APIError(400, f"{what} is empty: give at least one token", what)
        if min(ids) < 0 or max(ids) >= self.vocab:
            raise APIError(400, f"{what} has token id {min(ids) if min(ids) < 0 else max(ids)} outside the "
                           f"vocabulary 0..{self.vocab - 1}", what)
        if len(ids) >= self.limit:
            raise APIError(400, f"This model's maximum context length is {self.limit} tokens. However, your {what} "
                           f"has {len(ids)} tokens; shorten it", what)

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.need_tokenizer("text output").decode(ids, skip_special_tokens=skip_special)


__all__ = ["Prompter"]
