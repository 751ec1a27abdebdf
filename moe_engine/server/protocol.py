"""Request bodies of the OpenAI-compatible routes, their validation, and vLLM's error envelope.

    raw JSON --parse_body--> CompletionRequest / ChatCompletionRequest (types strict: "5" is not 5)
                          -> APIError(status, message, param) on any bad field, named by its path

This module knows nothing of engines or HTTP frameworks: it turns bytes into checked requests
and errors into `{"error": {"message", "type", "param", "code"}}` bodies.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 64                     # choices per request
MAX_STOP = 16                  # stop strings per request
SEED_RANGE = (-(2**63), 2**64 - 1)

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 413: "RequestTooLargeError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}

# fields of OpenAI's API this server does not implement: accepted only at their "off" values
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
               "response_format": (None, {"type": "text"})}

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
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False     # accepted, not implemented (usage comes in the last chunk)


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)   # -1 and 0 disable top-k
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

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


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- parsing -----------------------------------------------------------------------------------
def parse_body(raw: bytes, model_cls: type[_Common]) -> _Common:
    """Bytes -> a validated request, or APIError(400) naming the bad field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _reject_unsupported(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise _field_error(e.errors()[0]) from None


def _reject_unsupported(data: dict) -> None:
    for name, off in UNSUPPORTED.items():
        if name in data and data[name] not in off:
            raise APIError(400, f"{name}={data[name]!r} is not supported by this server; remove the field", name)


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


__all__ = ["APIError", "ChatCompletionRequest", "CompletionRequest", "Message", "error_body", "parse_body"]
