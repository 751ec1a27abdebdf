"""Request bodies of the OpenAI-compatible routes, their validation, and vLLM's error envelope.

    raw JSON --parse_body--> CompletionRequest / ChatCompletionRequest (types strict: "5" is not 5)
                          -> APIError(status, message, param) on any bad field, named by its path

Every field of OpenAI's completions / chat schema and of vLLM's documented extras is either a model field
here (implemented by serving.py / app.py) or in REFUSED (accepted only at its "off" value, else a 400
naming it and why). A field nobody knows is a 400 too, unless the server runs with --allow-unknown-fields
(then it is dropped and logged). This module knows nothing of engines or HTTP frameworks: it turns bytes
into checked requests and errors into `{"error": {"message", "type", "param", "code"}}` bodies.
"""
from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("moe_engine.server")

MAX_N = 64                     # choices per request (best_of too)
MAX_STOP = 16                  # stop strings per request
MAX_LOGPROBS = 20              # top logprobs per token (vLLM's default --max-logprobs)
SEED_RANGE = (-(2**63), 2**64 - 1)

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}

# fields of OpenAI's and vLLM's APIs this server does not implement: (values accepted as "off", why / what instead)
_NO_STORE = "this server stores nothing"
REFUSED = {
    "suffix": ((None, ""), "insertion (fill-in-the-middle) is not supported; put all text in the prompt"),
    "use_beam_search": ((None, False), "beam search is not supported; use n / best_of with sampling"),
    "length_penalty": ((None, 1, 1.0), "length_penalty only applies to beam search, which is not supported"),
    "bad_words": ((None, []), "bad_words is not supported; use logit_bias to forbid token ids"),
    "spaces_between_special_tokens": ((None, True), "special tokens are always joined as the tokenizer decodes"),
    "priority": ((None, 0), "request priorities are not supported"),
    "prompt_embeds": ((None,), "prompt embeddings are not supported; send text or token ids"),
    "chat_template": ((None,), "per-request chat templates are not accepted; start the server with "
                               "--chat-template FILE"),
    "documents": ((None,), "documents are not supported; put them in the messages"),
    "mm_processor_kwargs": ((None,), "this server serves text-only models"),
    "audio": ((None,), "this server serves text-only models"),
    "modalities": ((None, ["text"]), "this server generates text only"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "functions": ((None, []), "functions is deprecated: use tools"),
    "function_call": ((None,), "function_call is deprecated: use tool_choice"),
    "verbosity": ((None,), "verbosity is not supported"),
    "store": ((None, False), _NO_STORE),
    "metadata": ((None, {}), _NO_STORE + " (metadata goes with store)"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "prompt_cache_key": ((None,), "there is no prompt cache to key"),
    "cache_salt": ((None,), "there is no prompt cache to salt"),
    "kv_transfer_params": ((None,), "KV transfer (disaggregated prefill) is not supported"),
    "vllm_xargs": ((None, {}), "vllm_xargs is not supported"),
    "logits_processors": ((None, []), "custom logits processors are not supported; use logit_bias / "
                                      "allowed_token_ids"),
    "guided_decoding_backend": ((None, "auto", "llguidance", "guidance"), "there is one structured-output "
                                                                        "backend, llguidance"),
}

FRIENDLY = {"prompt": "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
            "stop": "stop must be a string or a list of strings",
            "content": "content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts"}


class APIError(Exception):
    """An error a client should see: HTTP status, a message that says what to change, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """vLLM's error envelope."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


# ---- request models ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False     # usage (running counts) in every chunk


_Penalty = Field(None, ge=-2, le=2, allow_inf_nan=False)


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)   # -1 and 0 disable top-k
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = _Penalty
    frequency_penalty: float | None = _Penalty
    repetition_penalty: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    skip_special_tokens: bool = True
    add_special_tokens: bool | None = None
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    request_id: str | None = Field(None, min_length=1, max_length=256)
    # structured output (server/tools.py parses them): one of these at most
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                  # an end-user identifier: no effect on the output

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", "stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)     # 0 with echo: score the prompt only (lm-eval's request)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def top_logprobs_k(self) -> int | None:
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None      # an assistant's earlier calls (rendered by the chat template)
    tool_call_id: str | None = None           # a tool message's answer to that call

    def for_template(self) -> dict:
        out = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False                       # vLLM: prepend the last message when it is the assistant's
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Strict):
    """vLLM's /tokenize with a prompt."""
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False
    truncate_prompt_tokens: None = None


class TokenizeChatRequest(_Strict):
    """vLLM's /tokenize with messages (rendered by the chat template as /v1/chat/completions would)."""
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    return_token_strs: bool = False
    truncate_prompt_tokens: None = None
    echo: bool = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---- parsing -----------------------------------------------------------------------------------
def parse_body(raw: bytes, model_cls: type[_Common], allow_unknown: bool = False) -> _Common:
    """Bytes -> a validated request, or APIError(400) naming the bad field. allow_unknown: top-level fields no
    schema knows are dropped (and logged) instead of refused."""
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _reject_refused(data)
    unknown = sorted(set(data) - set(model_cls.model_fields))
    if unknown and allow_unknown:
        log.info("dropping unknown request fields: %s", ", ".join(unknown))
        data = {k: v for k, v in data.items() if k not in unknown}
    elif unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}: this server does not know it; remove it (or start the "
                       f"server with --allow-unknown-fields to drop unknown fields)", unknown[0])
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise _field_error(e.errors()[0]) from None


def parse_json(raw: bytes):
    """Bytes -> a JSON value: 400 for invalid JSON, nesting deeper than the parser's recursion limit, or text that
    is not valid Unicode (a lone surrogate escape such as \\ud800)."""
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise APIError(400, "the request body nests too deeply; flatten it") from None
    except UnicodeEncodeError as e:
        raise APIError(400, f"the request body holds text that is not valid Unicode ({e.reason} at "
                       f"{e.object[e.start:e.end]!r}, e.g. a lone surrogate escape); send UTF-8 text") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    return data


def _reject_refused(data: dict) -> None:
    for name, (off, why) in REFUSED.items():
        if name in data and data[name] not in off:
            raise APIError(400, f"{name}={_short(data[name])} is not supported by this server: {why}; remove the "
                           f"field", name)


def _field_error(err: dict) -> APIError:
    """One pydantic error -> APIError: param is the field's path ("messages[0].role"), the message says why."""
    path, union = "", False
    for part in err["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]") or "[" in part:
            union = True
        else:
            path += f".{part}" if path else part
    leaf = path.rsplit(".", 1)[-1].split("[")[0]
    if err["type"] == "missing":
        return APIError(400, f"{path} is required", path)
    if union and leaf in FRIENDLY:
        return APIError(400, f"{FRIENDLY[leaf]}; got {_short(err.get('input'))}", path)
    return APIError(400, f"{path}: {err['msg']} (got {_short(err.get('input'))})", path)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "DetokenizeRequest", "Message",
           "TokenizeChatRequest", "TokenizeRequest", "error_body", "parse_body", "parse_json"]
