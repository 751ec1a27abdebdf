"""server/tools.py: tools / tool_choice / response_format / structured_outputs -> constraint, 400s naming the
field, Hermes-style parsing into OpenAI tool_calls, and streamed deltas that always add up to the parse.
Forced calls are sampled from random logits under the compiled mask and their arguments checked with jsonschema.
"""
from __future__ import annotations

import json
import random

import jsonschema
import pytest
from test_grammar import TINY, TINY_VOCAB, sample_under, text_of, whitespace_penalty
from transformers import AutoTokenizer

from moe_engine.runtime.grammar import GrammarCompiler
from moe_engine.server import tools as T
from moe_engine.server.protocol import APIError

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}
SEARCH = {"type": "object", "$defs": {"q": {"type": "string", "maxLength": 6}},
          "properties": {"query": {"$ref": "#/$defs/q"}, "exact": {"type": "boolean"}},
          "required": ["query"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
         {"type": "function", "function": {"name": "now"}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH, "now": {"type": "object", "maxProperties": 0}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY))


@pytest.fixture(scope="module")
def comp(tok):
    return GrammarCompiler(tok, TINY_VOCAB, [tok.eos_token_id])


def api_error(fn, *args, **kw) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kw)
    assert info.value.status == 400 and "\n" not in info.value.message
    return info.value


# ---- request validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "custom", "custom": {"name": "x"}}], None, "tools[0].type"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], None, "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "extra": 1}}], None, "tools[0].function.extra"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, None, "tools"),
    (TOOLS, "sometimes", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "fly"}}, "tool_choice.function.name"),
    (TOOLS, {"type": "function"}, "tool_choice.function"),
    (None, "required", "tool_choice"),
    ([], NAMED, "tool_choice"),
])
def test_bad_tool_requests_are_400_naming_the_field(tools, choice, param):
    assert api_error(T.plan_tools, tools, choice).param == param


def test_plans_per_tool_choice():
    assert T.plan_tools(None, None) is None and T.plan_tools([], "none") is None
    auto = T.plan_tools(TOOLS)
    assert auto.mode == "auto" and auto.constraint is None
    assert auto.template_kwargs() == {"tools": TOOLS}   # OpenAI's shape, as Hermes/Qwen templates read it
    none = T.plan_tools(TOOLS, "none")
    assert none.template_kwargs() == {} and none.constraint is None
    named = T.plan_tools(TOOLS, NAMED)
    assert named.constraint == T.Constraint("json_schema", WEATHER, "tools[0].function.parameters")
    no_args = T.plan_tools(TOOLS, {"type": "function", "function": {"name": "now"}}).constraint.spec
    assert no_args["properties"] == {} and no_args["additionalProperties"] is False
    required = T.plan_tools(TOOLS, "required").constraint
    assert required.kind == "json_schema" and required.spec["type"] == "array" and required.spec["minItems"] == 1
    assert required.spec["$defs"] == SEARCH["$defs"]   # hoisted so that "#/$defs/q" still resolves
    strict = T.plan_tools([{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}], "auto")
    assert strict.constraint.kind == "grammar"


def test_required_schema_refuses_clashing_definitions():
    a = {"type": "function", "function": {"name": "a", "parameters": {"$defs": {"x": {"type": "string"}}}}}
    b = {"type": "function", "function": {"name": "b", "parameters": {"$defs": {"x": {"type": "integer"}}}}}
    assert api_error(T.plan_tools, [a, b], "required").param == "tools[1].function.parameters"


def test_forced_call_and_response_format_conflict():
    out = T.output_constraint(response_format={"type": "json_object"})
    assert api_error(T.plan_tools, TOOLS, "required", output=out).param == "response_format"
    assert T.plan_tools(TOOLS, "auto", output=out).constraint is None   # auto: the format constrains, no call


def test_output_constraints():
    assert T.output_constraint() is None and T.output_constraint({"type": "text"}) is None
    assert T.output_constraint({"type": "json_object"}) == T.Constraint("json_object", None, "response_format")
    c = T.output_constraint({"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}})
    assert (c.kind, c.spec, c.param) == ("json_schema", WEATHER, "response_format.json_schema.schema")
    so = T.output_constraint(structured_outputs={"regex": "a+", "disable_any_whitespace": True})
    assert (so.kind, so.spec, so.param, so.any_whitespace) == ("regex", "a+", "structured_outputs.regex", False)
    assert T.output_constraint(structured_outputs={"choice": ["x"]}).kind == "choice"
    assert T.output_constraint(structured_outputs={"grammar": 'root ::= "x"'}).kind == "grammar"
    assert T.output_constraint(structured_outputs={"json_object": True}).kind == "json_object"
    legacy = T.output_constraint(guided_json=WEATHER, guided_whitespace_pattern=" ?")
    assert (legacy.spec, legacy.param, legacy.whitespace_pattern) == (WEATHER, "guided_json", " ?")
    strict = T.output_constraint(structured_outputs={"json": {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"properties": {"type": "string"}}}}},
        "disable_additional_properties": True}).spec
    assert strict["additionalProperties"] is False and strict["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["a"]["properties"]["properties"]


@pytest.mark.parametrize("kw, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": []}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"json": {}, "backend": "x"}}, "structured_outputs.backend"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"guided_choice": "b"}, "guided_choice"),
    ({"structured_outputs": {"json": "[1]", "disable_additional_properties": True}}, "structured_outputs.json"),
])
def test_bad_output_constraints_are_400_naming_the_field(kw, param):
    assert api_error(T.output_constraint, **kw).param == param


def test_constraint_compile_errors_name_the_field(comp):
    c = T.output_constraint(structured_outputs={"json": {"type": "strin"}})
    err = api_error(c.compile, comp)
    assert err.param == "structured_outputs.json" and "strin" in err.message
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]
    assert api_error(T.plan_tools(bad_tool, "required").constraint.compile, comp).param == "tools"


# ---- parsing ------------------------------------------------------------------------------------------
def call(name, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


AUTO_TEXTS = [
    "Just text, no calls.",
    "  Let me look.\n" + call("get_weather", '{"city": "Oslo", "unit": "celsius"}') + "\n",
    call("search", '{"query": "a}\\"{b", "exact": true}') + "\n" + call("now", "{}"),
    'Hi <tool_call>{"name": "fly", "arguments": {}}</tool_call> bye',                     # unknown tool: text
    '<tool_call>{"arguments": {"query": "x"}, "name": "search"}</tool_call>',             # key order
    '<tool_call>{"name": "search", "parameters": {"query": "y"}}</tool_call>',            # "parameters"
    '<tool_call>{"name": "now", "arguments": "{\\"a\\": 1}"}</tool_call>',                # arguments as a string
    '<tool_call>{"name": "now"}',                                                         # no arguments, no close
    "a < b, and <tool_ca",                                                                # a tag's start at the end
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro',                  # cut off mid-call
]


def test_auto_parse():
    plan = T.plan_tools(TOOLS)
    m = plan.parse(AUTO_TEXTS[1]).message()
    assert m["content"] == "Let me look." and len(m["tool_calls"]) == 1
    c = m["tool_calls"][0]
    assert c["id"].startswith("call_") and c["type"] == "function"
    assert c["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}
    two = plan.parse(AUTO_TEXTS[2])
    assert two.content is None and two.finish_reason == "tool_calls"
    assert [json.loads(c["function"]["arguments"]) for c in two.tool_calls] == [{"query": 'a}"{b', "exact": True}, {}]
    assert plan.parse(AUTO_TEXTS[3]).message() == {"role": "assistant", "content": AUTO_TEXTS[3]}
    assert plan.parse(AUTO_TEXTS[3]).finish_reason == "stop"
    for text, name, args in ((AUTO_TEXTS[4], "search", {"query": "x"}), (AUTO_TEXTS[5], "search", {"query": "y"}),
                             (AUTO_TEXTS[6], "now", {"a": 1}), (AUTO_TEXTS[7], "now", {})):
        (c,) = plan.parse(text).tool_calls
        assert (c["function"]["name"], json.loads(c["function"]["arguments"])) == (name, args), text
    assert plan.parse(AUTO_TEXTS[8]).content == AUTO_TEXTS[8]
    cut = plan.parse(AUTO_TEXTS[9], "length")
    assert cut.finish_reason == "length" and cut.tool_calls[0]["function"]["arguments"] == '{"city": "Ro'


def test_required_and_named_parse():
    req = T.plan_tools(TOOLS, "required").parse(
        '[{"name": "search", "arguments": {"query": "q"}}, {"name": "now", "arguments": {}}]')
    assert [c["function"]["name"] for c in req.tool_calls] == ["search", "now"] and req.content is None
    named = T.plan_tools(TOOLS, NAMED).parse(' {"city": "X", "unit": "celsius"}\n')
    assert named.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "X", "unit": "celsius"}'}
    assert named.finish_reason == "tool_calls" and named.content is None
    none = T.plan_tools(TOOLS, "none").parse(" <tool_call>{} ")
    assert none.content == " <tool_call>{} " and none.tool_calls == []


def collect(plan, text: str, rng: random.Random, reason: str = "stop"):
    """Stream `text` in random pieces; the deltas, checked for OpenAI's order, folded into (content, calls)."""
    s, deltas = plan.stream(), []
    i = 0
    while i < len(text):
        n = rng.randint(1, 7)
        deltas += s.feed(text[i:i + n])
        i += n
    tail, reason = s.finish(reason)
    content, calls = "", []
    for d in deltas + tail:
        assert set(d) in ({"content"}, {"tool_calls"})
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if tc["index"] == len(calls):   # a new call: its first delta has the id, type and name
                assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["name"]
                calls.append({"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]})
            else:
                assert tc["index"] == len(calls) - 1 and set(tc) == {"index", "function"}
                assert set(tc["function"]) == {"arguments"}
                calls[-1]["arguments"] += tc["function"]["arguments"]
    return content, calls, reason


@pytest.mark.parametrize("choice, texts", [
    ("auto", AUTO_TEXTS),
    ("required", ['[{"name": "search", "arguments": {"query": "[]{}"}}, {"name": "now", "arguments": {}}]',
                  '[{"name": "get_weather", "arguments": {"city": "a']),
    (NAMED, ['{"city": "x", "unit": "celsius"}', ' \n{"city": "x"', ""]),
    ("none", ["plain <tool_call> text"]),
])
def test_streamed_deltas_add_up_to_the_parse(choice, texts):
    plan, rng = T.plan_tools(TOOLS, choice), random.Random(0)
    for text in texts:
        for reason in ("stop", "length"):
            whole = plan.parse(text, reason)
            for _ in range(5):
                content, calls, got = collect(plan, text, rng, reason)
                assert (content or (None if plan.mode != "none" else "")) == whole.content, text
                assert calls == [c["function"] for c in whole.tool_calls], text
                assert got == whole.finish_reason


def test_stream_holds_back_a_possible_tag():
    s = T.plan_tools(TOOLS).stream()
    assert s.feed("Hello <tool") == [{"content": "Hello"}]
    assert s.feed("_call>") == []
    out = s.feed('{"name": "now", "arguments": {')
    assert out[0]["tool_calls"][0]["function"] == {"name": "now", "arguments": ""}
    assert out[1]["tool_calls"][0]["function"] == {"arguments": "{"}
    assert s.feed("}}</tool_call> <t") == [{"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}]
    assert s.feed("ab") == [{"content": "  <tab"}]   # "Hello"'s held space, then text that is no tag
    assert s.feed(" <tool_c") == [] and s.finish("stop") == ([{"content": " <tool_c"}], "tool_calls")


def test_messages_for_template_and_template_probe(tok):
    msgs = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    out = T.messages_for_template(msgs)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and out[1] == msgs[1]
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'   # the request is not changed
    assert not T.chat_template_renders_tools(tok)   # the bundled model's template has no tools
    hermes = ("{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert T.chat_template_renders_tools(tok, hermes)


# ---- sampled under the mask ---------------------------------------------------------------------------------
def test_forced_named_call_sampled_under_the_mask_validates(comp, tok):
    plan = T.plan_tools(TOOLS, NAMED)
    grammar = plan.constraint.compile(comp)
    bias = whitespace_penalty(tok, comp.vocab_size)
    for seed in range(10):
        text = text_of(tok, sample_under(grammar.new(), seed, bias=bias), {2})
        (c,) = plan.parse(text).tool_calls
        assert c["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(c["function"]["arguments"]), WEATHER)


def test_required_calls_sampled_under_the_mask_validate(comp, tok):
    plan = T.plan_tools(TOOLS, "required")
    grammar = plan.constraint.compile(comp)
    bias = whitespace_penalty(tok, comp.vocab_size)
    names = set()
    for seed in range(6):
        text = text_of(tok, sample_under(grammar.new(), seed, bias=bias, max_steps=1500), {2})
        msg = plan.parse(text)
        assert msg.tool_calls and msg.finish_reason == "tool_calls" and msg.content is None
        assert len(msg.tool_calls) == len(json.loads(text))
        for c in msg.tool_calls:
            names.add(c["function"]["name"])
            jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[c["function"]["name"]])
    assert len(names) >= 2


def test_strict_tools_under_auto_enforce_arguments(comp, tok):
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS[:2]] + TOOLS[2:]
    plan = T.plan_tools(strict)
    grammar = plan.constraint.compile(comp)

    def follows(text: str) -> bool:
        c = grammar.new()
        for t in tok.encode(text, add_special_tokens=False):
            if not c.allowed()[t]:
                return False
            c.accept(t)
        return c.can_end

    good = "Sure. " + call("get_weather", '{"city": "Oslo", "unit": "celsius"}') + "\n" + call("now", '{"x": 1}')
    assert follows(good) and follows("No call needed.")
    assert not follows(call("get_weather", '{"city": "Oslo", "unit": "kelvin"}'))   # enum enforced
    assert not follows(call("fly", "{}"))                                            # unknown tool
    assert [c["function"]["name"] for c in plan.parse(good).tool_calls] == ["get_weather", "now"]
