"""The server's request fields, each checked for its effect (against the engine's own logits and generate() on a
second engine over the same checkpoint) or for a 400 naming it: logprobs / top_logprobs / prompt_logprobs / echo
(lm-eval's scoring request), penalties, logit_bias, allowed_token_ids, stop_token_ids, ignore_eos, min_tokens,
best_of, truncate_prompt_tokens, include_stop_str_in_output, continuous usage, token ids, chat template options,
/tokenize, /detokenize, /version, /v1/models/{id}, refused and unknown fields, hostile JSON."""
from __future__ import annotations

import httpx
import pytest
import torch

import moe_engine
from moe_engine.server import create_app
from moe_engine.server.protocol import REFUSED
from test_server import KEY, MODEL, LiveServer, openai_client, post, sse_events

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def ref():
    """A second float32 engine on the bundled model: the served one belongs to the server's loop thread."""
    torch.set_num_threads(1)
    eng = moe_engine.load(None, dtype="float32", progress=False)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def live():
    eng = moe_engine.load(None, dtype="float32", progress=False)
    srv = LiveServer(create_app(eng, api_key=KEY, max_num_seqs=8, scheduler="fifo"))
    yield srv
    srv.stop()
    eng.close()


@pytest.fixture(scope="module")
def client(live):
    return openai_client(live.url)


def log_softmax_of(ref, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(ref.logits(torch.tensor([ids]))[0], -1)          # [T, V]


# ---- logprobs ---------------------------------------------------------------------------------------
def test_completion_logprobs_equal_log_softmax_of_the_logits(client, ref):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.9, seed=5, logprobs=3,
                                  extra_body={"return_token_ids": True})
    c = r.choices[0]
    prompt_ids, ids = c.prompt_token_ids, c.token_ids
    lsm = log_softmax_of(ref, prompt_ids + ids)
    assert len(c.logprobs.token_logprobs) == len(ids) == 6
    for t, (tok, lp, top) in enumerate(zip(ids, c.logprobs.token_logprobs, c.logprobs.top_logprobs)):
        row = lsm[len(prompt_ids) + t - 1]
        assert abs(lp - row[tok].item()) < 1e-4
        assert len(top) in (3, 4) and max(top.values()) == pytest.approx(row.max().item(), abs=1e-4)
    assert c.logprobs.text_offset == sorted(c.logprobs.text_offset)


def test_lm_eval_scoring_request(live, ref):
    """lm-eval's local-completions loglikelihood request: echo, logprobs 1, max_tokens 0, prompt as token ids."""
    ids = ref.encode("The quick brown fox jumps over the lazy dog")
    r = post(live, "/v1/completions", json={"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1,
                                            "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["text"] == ref.decode(ids) or c["text"] == ref.tokenizer.decode(ids)
    lps = c["logprobs"]["token_logprobs"]
    assert len(lps) == len(ids) and lps[0] is None and c["logprobs"]["top_logprobs"][0] is None
    lsm = log_softmax_of(ref, ids)
    for pos in range(1, len(ids)):
        assert abs(lps[pos] - lsm[pos - 1, ids[pos]].item()) < 1e-4
    assert r.json()["usage"]["completion_tokens"] == 0 and c["finish_reason"] == "length"


def test_prompt_logprobs_field(live, ref):
    ids = ref.encode(PROMPT)
    body = post(live, "/v1/completions", json={"prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}).json()
    rows = body["choices"][0]["prompt_logprobs"]
    lsm = log_softmax_of(ref, ids)
    assert rows[0] is None and len(rows) == len(ids)
    for pos in range(1, len(ids)):
        assert abs(rows[pos][str(ids[pos])]["logprob"] - lsm[pos - 1, ids[pos]].item()) < 1e-4
        assert len(rows[pos]) in (2, 3)


def test_chat_logprobs_streamed_equal_whole(client, ref):
    messages = [{"role": "user", "content": "A loop"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)       # greedy: the top one
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [(t.token, round(t.logprob, 5)) for t in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


# ---- sampling controls --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.8), dict(presence_penalty=1.5, frequency_penalty=1.0),
                                dict(min_p=0.2, temperature=0.7, seed=3)])
def test_penalties_match_generate(client, ref, kw):
    extra = {k: v for k, v in kw.items() if k in ("repetition_penalty", "min_p")}
    api = {k: v for k, v in kw.items() if k not in extra}
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=api.pop("temperature", 0),
                                  extra_body=extra, **api)
    assert r.choices[0].text == ref.generate(PROMPT, max_new_tokens=10, temperature=kw.get("temperature", 0), **{
        k: v for k, v in kw.items() if k != "temperature"})


def test_logit_bias_allowed_ids_and_stop_token_ids(live, ref):
    forced = ref.encode(" x")[-1]
    body = post(live, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                               "logit_bias": {str(forced): 100}, "return_token_ids": True}).json()
    assert body["choices"][0]["token_ids"] == [forced] * 5
    allowed = ref.encode(" a b c")
    body = post(live, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 1,
                                               "allowed_token_ids": allowed, "return_token_ids": True}).json()
    assert set(body["choices"][0]["token_ids"]) <= set(allowed)
    ids = post(live, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                              "return_token_ids": True}).json()["choices"][0]["token_ids"]
    stop_at = ids[2]
    c = post(live, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                            "stop_token_ids": [stop_at], "return_token_ids": True}).json()["choices"][0]
    assert c["token_ids"] == ids[:ids.index(stop_at) + 1] and c["finish_reason"] == "stop"
    assert c["stop_reason"] == stop_at
    c = post(live, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "min_tokens": 5,
                                            "stop_token_ids": [stop_at], "return_token_ids": True}).json()["choices"][0]
    assert len(c["token_ids"]) >= 5 and stop_at not in c["token_ids"][:4]


def test_ignore_eos_runs_to_length(live, ref):
    eos = ref.eos_ids(None)
    eos = eos if isinstance(eos, list) else [eos]
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logit_bias": {str(eos[0]): 100}}
    assert post(live, "/v1/completions", json=body).json()["choices"][0]["finish_reason"] == "stop"
    c = post(live, "/v1/completions", json={**body, "ignore_eos": True}).json()["choices"][0]
    assert c["finish_reason"] == "length"


def test_best_of_returns_the_best_candidates(live):
    base = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.2, "seed": 11}
    cands = post(live, "/v1/completions", json={**base, "n": 4, "logprobs": 0}).json()["choices"]
    means = [sum(c["logprobs"]["token_logprobs"]) / 6 for c in cands]
    best = post(live, "/v1/completions", json={**base, "n": 2, "best_of": 4}).json()
    want = [cands[i]["text"] for i in sorted(range(4), key=lambda i: -means[i])[:2]]
    assert [c["text"] for c in best["choices"]] == want and best["choices"][0]["logprobs"] is None
    assert best["usage"]["completion_tokens"] == 24
    r = post(live, "/v1/completions", json={**base, "n": 3, "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_echo_truncation_stop_string_and_usage(live, ref):
    c = post(live, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True}).json()
    assert c["choices"][0]["text"].startswith(PROMPT)
    assert c["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    long = "one two three four five six seven eight nine ten"
    r = post(live, "/v1/completions", json={"prompt": long, "max_tokens": 2, "truncate_prompt_tokens": 3}).json()
    assert r["usage"]["prompt_tokens"] == 3
    text = post(live, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0}).json()
    stop = text["choices"][0]["text"][3:6]
    for keep in (False, True):
        out = post(live, "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [stop],
                                                  "include_stop_str_in_output": keep}).json()["choices"][0]
        assert out["text"].endswith(stop) == keep and out["stop_reason"] == stop


def test_continuous_usage_and_stream_options_need_stream(live):
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPT, "max_tokens": 5, "stream": True,
                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
        events = sse_events(r)[:-1]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert all(e["usage"] is not None for e in events) and counts == sorted(counts) and counts[-1] == 5
    r = post(live, "/v1/completions", json={"prompt": PROMPT, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_chat_template_options(live, ref):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    r = post(live, "/tokenize", json={"messages": msgs, "add_generation_prompt": False,
                                      "continue_final_message": True}).json()
    text = ref.tokenizer.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert r["tokens"] == ref.tokenizer(text, add_special_tokens=False)["input_ids"]
    c = post(live, "/v1/chat/completions", json={"messages": msgs, "add_generation_prompt": False, "echo": True,
                                                 "continue_final_message": True, "max_tokens": 3}).json()
    assert c["choices"][0]["message"]["content"].startswith("Hello")
    for body, param in (({"add_generation_prompt": True, "continue_final_message": True}, "continue_final_message"),
                        ({"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
                        ({"reasoning_effort": "low"}, "reasoning_effort")):
        r = post(live, "/v1/chat/completions", json={"messages": msgs, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---- routes -----------------------------------------------------------------------------------------------
def test_tokenize_detokenize_version_and_model_routes(live, ref):
    r = post(live, "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert r["tokens"] == ref.encode(PROMPT) and r["count"] == len(r["tokens"]) and len(r["token_strs"]) == r["count"]
    assert post(live, "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == \
        ref.tokenizer.decode(r["tokens"])
    assert post(live, "/detokenize", json={"tokens": [10**7]}).json()["error"]["param"] == "tokens"
    assert httpx.get(live.url + "/version").json() == {"version": moe_engine.__version__}
    auth = {"Authorization": f"Bearer {KEY}"}
    card = httpx.get(f"{live.url}/v1/models/{MODEL}", headers=auth).json()
    assert card["id"] == MODEL and card["root"] == MODEL
    assert httpx.get(f"{live.url}/v1/models/other", headers=auth).status_code == 404


# ---- refused, unknown and hostile ---------------------------------------------------------------------
REFUSED_VALUES = {"suffix": "x", "use_beam_search": True, "length_penalty": 2.0, "bad_words": ["a"],
                  "spaces_between_special_tokens": False, "priority": 1, "prompt_embeds": "AAAA",
                  "chat_template": "{{ x }}", "documents": [{"a": "b"}], "mm_processor_kwargs": {},
                  "audio": {"voice": "x"}, "modalities": ["audio"], "prediction": {"type": "content"},
                  "web_search_options": {}, "functions": [{"name": "f"}], "function_call": "auto",
                  "verbosity": "low", "store": True, "metadata": {"a": "b"}, "service_tier": "flex",
                  "prompt_cache_key": "k", "cache_salt": "s", "kv_transfer_params": {}, "vllm_xargs": {"a": 1},
                  "logits_processors": ["x"], "guided_decoding_backend": "xgrammar"}


def test_every_refused_field_is_named():
    assert set(REFUSED_VALUES) == set(REFUSED)


@pytest.mark.parametrize("name", sorted(REFUSED_VALUES))
def test_refused_fields_get_a_400_naming_them(live, name):
    r = post(live, "/v1/completions", json={"prompt": "x", name: REFUSED_VALUES[name]})
    assert r.status_code == 400 and r.json()["error"]["param"] == name and name in r.json()["error"]["message"]


def test_unknown_fields_are_refused_unless_allowed(live, ref):
    r = post(live, "/v1/completions", json={"prompt": "x", "max_tokens": 1, "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    assert "--allow-unknown-fields" in r.json()["error"]["message"]
    relaxed = LiveServer(create_app(ref, allow_unknown_fields=True))
    try:
        r = httpx.post(relaxed.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1, "frobnicate": 1})
        assert r.status_code == 200, r.text
    finally:
        relaxed.stop()


@pytest.mark.parametrize("raw, words", [(b"[" * 100000 + b"]" * 100000, "nests too deeply"),
                                        (b'{"prompt": "\\ud800"}', "not valid Unicode")])
def test_hostile_json_is_a_400(live, raw, words):
    r = post(live, "/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and words in r.json()["error"]["message"]


@pytest.mark.parametrize("body, param", [({"temperature": 1e-50}, "temperature"), ({"top_logprobs": 2}, "top_logprobs"),
                                         ({"logit_bias": {"99999999": 1}}, "logit_bias"),
                                         ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                                         ({"allowed_token_ids": [5], "stop_token_ids": [5], "min_tokens": 2},
                                          "allowed_token_ids")])
def test_bad_values_are_named(live, body, param):
    route = "/v1/chat/completions" if param == "top_logprobs" else "/v1/completions"
    base = {"messages": [{"role": "user", "content": "x"}]} if param == "top_logprobs" else {"prompt": "x"}
    r = post(live, route, json={**base, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_one_failing_choice_does_not_fail_its_step_neighbours(ref):
    """A choice whose token cannot be picked (here a constraint that raises) ends alone with "error"; the other
    requests prefilled and decoded in the same steps finish with their usual tokens."""
    import threading

    from moe_engine.runtime.loop import EngineLoop, Request
    from moe_engine.runtime.sampling import SamplingParams

    class Broken:
        def allowed(self):
            raise RuntimeError("broken constraint")

        def accept(self, token):
            raise AssertionError("never reached")

    prompts = [ref.encode(p) for p in ("import os", "def f(x):", "class A:")]
    want = [ref.generate(torch.tensor([p]), max_new_tokens=5, eos_token_id=[])[0, len(p):].tolist() for p in prompts]
    loop = EngineLoop(ref, max_num_seqs=4, scheduler="fifo")
    done, events = threading.Semaphore(0), {}

    def on_event(ev):
        events.setdefault(ev.request_id, []).append(ev)
        if ev.finish_reason:
            done.release()
    reqs = [Request(p, 5, SamplingParams(), on_event, eos_token_ids=set()) for p in prompts]
    reqs.insert(1, Request(prompts[1], 5, SamplingParams(), on_event, eos_token_ids=set(), constraint=Broken()))
    for r in reqs:
        loop.submit(r)
    loop.start()
    try:
        for _ in reqs:
            assert done.acquire(timeout=30)
    finally:
        loop.shutdown()
    bad = events[reqs[1].request_id][-1]
    assert bad.finish_reason == "error" and "broken constraint" in bad.error
    good = [r for i, r in enumerate(reqs) if i != 1]
    assert [[t for ev in events[r.request_id] for t in ev.token_ids] for r in good] == want


# ---- structured output and tools ------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 10},
                                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                 "required": ["city", "days"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def no_blanks(ref):
    """logit_bias pushing every whitespace-only token down: the tiny model would pad JSON with blanks until
    max_tokens (the grammar allows flexible whitespace, as vLLM's does)."""
    vocab = ref.tokenizer.get_vocab()
    return {str(i): -100 for i in vocab.values() if not ref.tokenizer.decode([i]).strip()}


def test_json_schema_answers_validate(client, no_blanks):
    import json

    import jsonschema
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a person"}], max_tokens=80, temperature=1.0,
            seed=seed, logit_bias=no_blanks,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.completions.create(model=MODEL, prompt="x =", max_tokens=20, temperature=1.0, seed=2,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert r.choices[0].text in ("yes", "no", "maybe") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="x =", max_tokens=20, temperature=1.0, seed=2,
                                  extra_body={"guided_regex": "[a-c]{3}-[0-9]{2}"})
    import re
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", r.choices[0].text)


def test_forced_tool_calls_parse_and_stream(client, no_blanks):
    import json

    import jsonschema
    args = dict(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}], max_tokens=80,
                temperature=1.0, seed=4, logit_bias=no_blanks, tools=WEATHER)
    schema = WEATHER[0]["function"]["parameters"]
    named = client.chat.completions.create(**args, tool_choice={"type": "function",
                                                                "function": {"name": "get_weather"}})
    call = named.choices[0].message.tool_calls[0]
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), schema)
    required = client.chat.completions.create(**args, tool_choice="required", parallel_tool_calls=False)
    calls = required.choices[0].message.tool_calls
    assert len(calls) == 1 and required.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)
    chunks = list(client.chat.completions.create(**args, tool_choice="required", parallel_tool_calls=False,
                                                 stream=True))
    deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments or "" for d in deltas) == calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
    ({"tools": WEATHER}, "tool_choice"),                          # auto: the tiny template does not render tools
    ({"tools": WEATHER, "tool_choice": "required", "parallel_tool_calls": True, "guided_regex": "a"}, "guided_regex"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": WEATHER},
     "tool_choice.function.name"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
])
def test_structured_output_errors_name_the_field(live, body, param):
    r = post(live, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
