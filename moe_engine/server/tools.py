"""OpenAI tools, response_format and vLLM's structured_outputs: request fields -> output constraint -> parsed
message / streamed deltas. Engine-agnostic: it returns what to compile and parses text; it never samples.

    response_format / structured_outputs / guided_*  --output_constraint()-->  Constraint | None
    tools + tool_choice  --plan_tools()-->  ToolPlan: template_kwargs() (tools=[...] for apply_chat_template)
                                                      constraint (None, or what to enforce)
    Constraint.compile(GrammarCompiler) -> runtime/grammar.py Grammar   (a bad spec: APIError 400 naming the field)
    generated text  --ToolPlan.stream(): feed(piece) -> [delta], finish(reason) -> ([delta], reason)-->  chunks
                    --ToolPlan.parse(text, reason)-->  ParsedMessage: content, tool_calls, finish_reason

tool_choice: "none" - tools are left out of the prompt and nothing is parsed. "auto" (the default with tools) -
the model writes calls in its chat template's format, which must be Hermes/Qwen-style
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the only format parsed here); nothing is enforced,
except when a tool is `strict`: then each call's name and arguments are (a grammar of free text in which every
`<tool_call>` opens a call that must match a tool's schema). "required" - the output must be a JSON array of
{"name", "arguments"} objects, one of the tools each (vLLM's schema). A named function - the output is that
tool's arguments object. Calls come back as OpenAI `tool_calls` (ids "call_...", arguments a JSON string as
the model wrote it) with finish_reason "tool_calls"; streamed, each call's first delta carries its index, id,
type and name, then argument fragments follow. Text that may be the start of `<tool_call>` is held back.
"""
from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import llguidance   # the grammar library runtime/grammar.py compiles with (strict tools' Lark grammar)
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from moe_engine.errors import ConfigError

from .protocol import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")
_NAME = r"^[A-Za-z0-9_-]{1,64}$"


# ---- request models ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None       # a JSON schema; None: no arguments
    strict: bool | None = None                     # true: arguments are enforced with tool_choice "auto" too


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ResponseFormatText(_Strict):
    type: Literal["text"]


class ResponseFormatJsonObject(_Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None    # the schema is enforced either way


class ResponseFormatJsonSchema(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` (which replaced guided_json / guided_regex / ... in vLLM 0.12)."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_fallback: bool = False                 # there is one backend: nothing ever falls back


# vLLM < 0.12's top-level fields -> structured_outputs' names
LEGACY_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar", "guided_whitespace_pattern": "whitespace_pattern"}
_KIND = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def parse_field(value, model, param: str):
    """A raw JSON value -> `model` (a pydantic type), or APIError(400) naming the bad path under `param`."""
    try:
        return TypeAdapter(model).validate_python(value)
    except ValidationError as e:
        err = max(e.errors(), key=lambda x: len(x["loc"]))   # in a union, the branch that got furthest
        path = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]
                               if not (isinstance(p, str) and ("[" in p or p[:1].isupper())))
        raise APIError(400, f"{path}: {err['msg']}", path) from None


def parse_tool_choice(value) -> str | NamedToolChoice:
    """tool_choice, raw or parsed: "none" | "auto" | "required" | a NamedToolChoice."""
    if isinstance(value, NamedToolChoice) or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict):
        return parse_field(value, NamedToolChoice, "tool_choice")
    raise APIError(400, f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                   f'{{"name": ...}}}}; got {json.dumps(value)[:60]}', "tool_choice")


_FORMATS = {"text": ResponseFormatText, "json_object": ResponseFormatJsonObject,
            "json_schema": ResponseFormatJsonSchema}


def parse_response_format(value):
    """response_format, raw or parsed -> one of the three ResponseFormat models."""
    if isinstance(value, tuple(_FORMATS.values())):
        return value
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in _FORMATS:
        raise APIError(400, f'response_format.type must be "text", "json_object" or "json_schema"; got '
                       f'{json.dumps(kind)}', "response_format.type")
    return parse_field(value, _FORMATS[kind], "response_format")


# ---- output constraints --------------------------------------------------------------------------
@dataclass(frozen=True)
class Constraint:
    """What to enforce: a runtime/grammar.py kind, its spec, the request field it came from, whitespace."""
    kind: str
    spec: Any
    param: str
    any_whitespace: bool = True
    whitespace_pattern: str | None = None

    def compile(self, compiler):
        try:
            return compiler.compile(self.kind, self.spec, any_whitespace=self.any_whitespace,
                                    whitespace_pattern=self.whitespace_pattern)
        except ConfigError as e:
            raise APIError(400, f"{self.param}: {e}", self.param) from None


def output_constraint(response_format=None, structured_outputs=None, **guided) -> Constraint | None:
    """response_format, structured_outputs and the legacy guided_* fields (raw or parsed) -> one Constraint."""
    sources: list[Constraint] = []
    if response_format is not None:
        rf = parse_response_format(response_format)
        if isinstance(rf, ResponseFormatJsonObject):
            sources.append(Constraint("json_object", None, "response_format"))
        elif isinstance(rf, ResponseFormatJsonSchema):
            sources.append(Constraint("json_schema", rf.json_schema.schema_, "response_format.json_schema.schema"))
    unknown = sorted(set(guided) - set(LEGACY_GUIDED))
    if unknown:
        raise TypeError(f"output_constraint() got unexpected fields {unknown}")
    legacy = {LEGACY_GUIDED[k]: parse_field(v, StructuredOutputs.model_fields[_attr(LEGACY_GUIDED[k])].annotation, k)
              for k, v in guided.items() if v is not None}
    if structured_outputs is not None:
        so = parse_field(structured_outputs, StructuredOutputs, "structured_outputs")
        sources += _structured(so, "structured_outputs", [])
    if legacy:
        sources += _structured(StructuredOutputs.model_validate(legacy), "guided_*", sorted(guided))
    if len(sources) > 1:
        raise APIError(400, f"{sources[0].param} and {sources[1].param} both constrain the output; give one",
                       sources[1].param)
    return sources[0] if sources else None


def _structured(so: StructuredOutputs, param: str, legacy_names: list[str]) -> list[Constraint]:
    def where(name: str) -> str:
        if param != "guided_*":
            return f"{param}.{name}"
        return next((k for k in legacy_names if LEGACY_GUIDED.get(k) == name), f"guided_{name}")

    if so.structural_tag is not None:
        raise APIError(400, "structural_tag is not supported; use tools with tool_choice, or json / regex / grammar",
                       where("structural_tag"))
    set_ = [n for n in ("json", "regex", "choice", "grammar") if getattr(so, _attr(n)) is not None]
    set_ += ["json_object"] if so.json_object else []
    if len(set_) > 1:
        raise APIError(400, f"{where(set_[0])} and {where(set_[1])} both constrain the output; give one",
                       where(set_[1]))
    ws = {"any_whitespace": not so.disable_any_whitespace, "whitespace_pattern": so.whitespace_pattern}
    if not set_:
        for name in ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern"):
            if getattr(so, name) not in (None, False):
                raise APIError(400, f"{where(name)} has no effect without json, regex, choice, grammar or "
                               f"json_object; remove it", where(name))
        return []
    kind = set_[0]
    spec = None if kind == "json_object" else getattr(so, _attr(kind))
    if kind == "json" and so.disable_additional_properties:
        spec = no_additional_properties(json.loads(spec) if isinstance(spec, str) else spec, where("json"))
    return [Constraint(_KIND.get(kind, kind), spec, where(kind), **ws)]


def _attr(name: str) -> str:
    return "json_" if name == "json" else name


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties",
               "propertyNames", "unevaluatedItems", "unevaluatedProperties")


def no_additional_properties(schema, param: str = "schema"):
    """A copy of a JSON schema in which every object schema that does not say otherwise forbids extra keys
    (vLLM's disable_additional_properties)."""
    if not isinstance(schema, dict):
        raise APIError(400, f"{param}: a JSON schema must be an object", param)
    out = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if (node.get("type") == "object" or "properties" in node) and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key in _SCHEMA_MAPS:
            for sub in (node.get(key) or {}).values() if isinstance(node.get(key), dict) else ():
                walk(sub)
        for key in _SCHEMA_LISTS:
            for sub in node.get(key) or () if isinstance(node.get(key), list) else ():
                walk(sub)
        for key in _SCHEMA_ONE:
            walk(node.get(key))
    walk(out)
    return out


# ---- tools -------------------------------------------------------------------------------------------
def plan_tools(tools=None, tool_choice=None, *, output: Constraint | None = None) -> ToolPlan | None:
    """tools and tool_choice (raw JSON or parsed) -> a ToolPlan, or None when the request has no tools.
    `output` is response_format's / structured_outputs' constraint: it may not meet a forced tool call."""
    defs = parse_field(tools, list[ToolDefinition], "tools") if tools is not None else []
    choice = parse_tool_choice(tool_choice) if tool_choice is not None else None
    if not defs:
        if choice not in (None, "none"):
            raise APIError(400, 'tool_choice needs tools: give tools, or leave tool_choice out', "tool_choice")
        return None
    names = [t.function.name for t in defs]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice:
        raise APIError(400, f"tools: two tools are named {twice!r}; tool names must be unique", "tools")
    mode = "named" if isinstance(choice, NamedToolChoice) else (choice or "auto")
    named = choice.function.name if mode == "named" else None
    if named is not None and named not in names:
        raise APIError(400, f"tool_choice names {named!r}, which is not among the tools ({', '.join(names)})",
                       "tool_choice.function.name")
    if mode == "named":
        i = names.index(named)
        constraint = Constraint("json_schema", _parameters(defs[i]), f"tools[{i}].function.parameters")
    elif mode == "required":
        constraint = Constraint("json_schema", required_schema(defs), "tools")
    elif mode == "auto" and any(t.function.strict for t in defs):
        constraint = Constraint("grammar", strict_calls_grammar(defs), "tools")
    else:
        constraint = None
    if constraint is not None and output is not None:
        raise APIError(400, f"{output.param} and tool_choice {mode!r} (or strict tools) both constrain the output; "
                       f"give one", output.param)
    return ToolPlan(mode, tuple(defs), named, constraint)


def _parameters(tool: ToolDefinition) -> dict:
    params = tool.function.parameters
    return params if params is not None else {"type": "object", "properties": {}, "additionalProperties": False}


def required_schema(tools) -> dict:
    """tool_choice "required": a non-empty JSON array of {"name": one tool's, "arguments": its schema}; each
    tool's $defs / definitions are moved to the root so that its "#/$defs/..." references still resolve."""
    roots: dict[str, dict] = {}
    calls = []
    for i, t in enumerate(tools):
        params = dict(_parameters(t))
        for key in ("$defs", "definitions"):
            for name, sub in (params.pop(key, None) or {}).items():
                if roots.setdefault(key, {}).setdefault(name, sub) != sub:
                    raise APIError(400, f"tools[{i}].function.parameters: {key}/{name} differs from another tool's "
                                   f"{key}/{name}; with tool_choice \"required\" shared definitions must agree",
                                   f"tools[{i}].function.parameters")
        calls.append({"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                       "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False})
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **roots}


def strict_calls_grammar(tools) -> str:
    """tool_choice "auto" with strict tools: free text in which each `<tool_call>` must go on as
    `\\n{"name": "<a tool>", "arguments": <its schema>}\\n</tool_call>` (llguidance lazy-trigger Lark)."""
    tags = [llguidance.StructTag(trigger=OPEN, begin=f'{OPEN}\n{{"name": {json.dumps(t.function.name)}, '
                                 f'"arguments": ', grammar=_parameters(t) if t.function.strict else {"type": "object"},
                                 end=f"}}\n{CLOSE}") for t in tools]
    return llguidance.StructTag.to_grammar(tags, assume_special=False)


@dataclass(frozen=True)
class ParsedMessage:
    content: str | None
    tool_calls: list[dict]
    finish_reason: str

    def message(self) -> dict:
        """OpenAI's assistant message."""
        msg = {"role": "assistant", "content": self.content}
        return {**msg, "tool_calls": self.tool_calls} if self.tool_calls else msg


@dataclass(frozen=True)
class ToolPlan:
    mode: str                              # "none" | "auto" | "required" | "named"
    tools: tuple[ToolDefinition, ...]
    named: str | None
    constraint: Constraint | None          # None: nothing to enforce

    def template_kwargs(self) -> dict:
        """Keyword arguments for tokenizer.apply_chat_template: the tools, except with tool_choice "none"."""
        if self.mode == "none":
            return {}
        return {"tools": [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools]}

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.mode, tuple(t.function.name for t in self.tools), self.named)

    def parse(self, text: str, finish_reason: str = "stop") -> ParsedMessage:
        """The whole generated text -> content and tool_calls (the stream's result, so both always agree)."""
        s = self.stream()
        s.feed(text)
        _, reason = s.finish(finish_reason)
        return s.result(reason)


def messages_for_template(messages: list[dict]) -> list[dict]:
    """Assistant tool_calls with arguments as JSON strings (OpenAI's shape) -> arguments as objects, which is
    what Hermes/Qwen chat templates render; other messages unchanged."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            m = {**m, "tool_calls": [_decoded_call(c) for c in m["tool_calls"]]}
        out.append(m)
    return out


def _decoded_call(call: dict) -> dict:
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            pass   # the template renders the string as it is
    return {**call, "function": fn}


def chat_template_renders_tools(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the chat template puts `tools` into the prompt (a template that ignores them would make
    tool_choice "auto" a request the model never sees)."""
    probe = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "probe_tool_x", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=chat_template, tools=[tool], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that rejects tools does not render them
        return False
    return "probe_tool_x" in text


# ---- parsing generated text ------------------------------------------------------------------------
class _CallScanner:
    """One `{"name": ..., "arguments": {...}}` object, char by char: its name, and its arguments' raw text
    (or a JSON string's value) as fragments to take()."""

    def __init__(self):
        self.depth, self.in_str, self.esc = 0, False, False
        self.expect_key, self.key, self.buf = True, None, ""
        self.name: str | None = None
        self.args = 0                       # 0: not seen, 1: streaming, 2: complete
        self.pending: list[str] = []
        self.done = self.bad = False

    def feed(self, ch: str) -> None:
        if self.in_str:
            self._string(ch)
        elif self.depth >= 2:
            self._nested(ch)
        elif self.depth == 0:
            self.depth, self.bad = (1, False) if ch == "{" else (0, not ch.isspace())
        elif ch == '"':
            self.in_str, self.buf = True, ch
        elif ch == ":":
            self.expect_key = False
        elif ch == ",":
            self.expect_key, self.key = True, None
        elif ch == "}":
            self.depth, self.done = 0, True
        elif ch in "{[":
            self.depth = 2
            if self.key in ARGUMENT_KEYS:
                self.bad = ch == "[" or self.args != 0
                self.args = 1
                self.pending.append(ch)
        elif not ch.isspace() and self.key in ARGUMENT_KEYS:
            self.bad = True                  # arguments must be an object (or a JSON string of one)

    def _string(self, ch: str) -> None:
        if self.depth >= 2 and self.args == 1:
            self.pending.append(ch)
        elif self.depth == 1:
            self.buf += ch
        if self.esc:
            self.esc = False
        elif ch == "\\":
            self.esc = True
        elif ch == '"':
            self.in_str = False
            if self.depth == 1:
                self._top_string()

    def _top_string(self) -> None:
        try:
            value = json.loads(self.buf)
        except json.JSONDecodeError:
            self.bad = True
            return
        if self.expect_key:
            self.key = value
        elif self.key == "name":
            self.name = value
        elif self.key in ARGUMENT_KEYS and self.args == 0:
            self.pending.append(value)
            self.args = 2

    def _nested(self, ch: str) -> None:
        if self.args == 1:
            self.pending.append(ch)
        if ch == '"':
            self.in_str = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 1 and self.args == 1:
                self.args = 2

    def take(self) -> str:
        out = "".join(self.pending)
        self.pending.clear()
        return out


def _partial(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStream:
    """Generated text pieces -> OpenAI chat delta dicts ({"content": ...} or {"tool_calls": [...]})."""

    def __init__(self, mode: str, names: tuple[str, ...], named: str | None = None):
        self.mode, self.names, self.named = mode, names, named
        self.calls: list[dict] = []
        self.content: list[str] = []
        self._started, self._ws, self._held = False, "", ""
        self._state, self._scan, self._open, self._block = "text", None, False, ""

    def feed(self, text: str) -> list[dict]:
        out: list[dict] = []
        if self.mode == "none":
            if text:
                self.content.append(text)
                out.append({"content": text})
        elif self.mode == "named":
            self._named(text, out)
        elif self.mode == "required":
            for ch in text:
                self._required(ch, out)
        else:
            self._auto(text, out)
        return out

    def finish(self, finish_reason: str) -> tuple[list[dict], str]:
        """Flush what was held back; the finish_reason to report ("tool_calls" when calls were made)."""
        out: list[dict] = []
        if self.mode == "auto" and self._state == "text":
            self._text(self._held, out)
        elif self.mode == "auto" and self._state == "call" and not self._open:
            self._text(self._block, out)
        elif self.mode == "named" and not self.calls:
            self._header(self.named, out)
        self._held, self._state = "", "text"
        return out, ("tool_calls" if self.calls and finish_reason == "stop" else finish_reason)

    def result(self, finish_reason: str) -> ParsedMessage:
        content = "".join(self.content)
        return ParsedMessage(content if content or self.mode == "none" else None,
                             [copy.deepcopy(c) for c in self.calls], finish_reason)

    # ---- per mode ---------------------------------------------------------------------------------
    def _named(self, text: str, out: list) -> None:
        if not self.calls:
            self._header(self.named, out)
        text = self._ws + (text if self._started else text.lstrip())
        body = text.rstrip()
        self._ws = text[len(body):]
        if body:
            self._started = True
            self._args(body, out)

    def _required(self, ch: str, out: list) -> None:
        if self._scan is None or self._scan.done or self._scan.bad:
            if ch != "{":
                return   # the array's brackets, commas and whitespace
            self._scan, self._open = _CallScanner(), False
        self._scan.feed(ch)
        self._pump(out)

    def _auto(self, text: str, out: list) -> None:
        buf, self._held, i = self._held + text, "", 0
        while i < len(buf):
            if self._state == "text":
                j = buf.find(OPEN, i)
                if j < 0:
                    keep = _partial(buf[i:], OPEN)
                    self._text(buf[i:len(buf) - keep], out)
                    self._held = buf[len(buf) - keep:]
                    return
                self._text(buf[i:j], out)
                i = j + len(OPEN)
                self._state, self._scan, self._open, self._block = "call", _CallScanner(), False, OPEN
            elif self._state == "call":
                self._block += buf[i]
                self._scan.feed(buf[i])
                i += 1
                self._pump(out)
                if self._scan.bad:
                    if not self._open:
                        self._text(self._block, out)   # not a call after all: it is text
                    self._state = "text"
                elif self._scan.done:
                    self._state = "after"
            else:   # after a call: whitespace, then the closing tag (a missing one is tolerated)
                rest = buf[i:].lstrip()
                i = len(buf) - len(rest)
                if rest.startswith(CLOSE):
                    i += len(CLOSE)
                    self._state = "text"
                elif rest and CLOSE.startswith(rest):
                    self._held = rest
                    return
                elif rest:
                    self._state = "text"

    # ---- emitting ---------------------------------------------------------------------------------
    def _pump(self, out: list) -> None:
        s = self._scan
        if not self._open and (s.name is not None or s.done):
            if s.name in self.names:
                self._header(s.name, out)
                self._open = True
            else:
                s.bad = True
                return
        if self._open:
            frag = s.take()
            if s.done and s.args == 0:
                frag = "{}"
            if frag:
                self._args(frag, out)

    def _text(self, text: str, out: list) -> None:
        """Content, with whitespace at its very start and end dropped (held until more text shows)."""
        text = self._ws + (text if self._started else text.lstrip())
        body = text.rstrip()
        self._ws = text[len(body):] if self._started or body else ""
        if body:
            self._started = True
            self.content.append(body)
            if out and "content" in out[-1]:
                out[-1] = {"content": out[-1]["content"] + body}
            else:
                out.append({"content": body})

    def _header(self, name: str, out: list) -> None:
        call = {"id": "call_" + secrets.token_hex(12), "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        out.append({"tool_calls": [{"index": len(self.calls) - 1, **copy.deepcopy(call)}]})

    def _args(self, frag: str, out: list) -> None:
        index = len(self.calls) - 1
        self.calls[-1]["function"]["arguments"] += frag
        last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
        if last is not None and last["index"] == index and "id" not in last:   # the header stays name-only
            last["function"]["arguments"] += frag
        else:
            out.append({"tool_calls": [{"index": index, "function": {"arguments": frag}}]})
