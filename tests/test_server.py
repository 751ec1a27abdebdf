"""The OpenAI-compatible server on the bundled model, through the official `openai` client and raw HTTP:
completions and chat (streamed and not), stop strings, seeds, usage, 32 concurrent streams, client
disconnects, hostile requests, /health while loading, /metrics, and SIGTERM draining of `moe-engine serve`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import moe_engine
from moe_engine.cli import main
from moe_engine.errors import ConfigError
from moe_engine.server import build_server, create_app

KEY = "test-key"
MODEL = "tiny-moe"
PROMPTS = ["def fibonacci(n):", "import os\nimport", "class Cache:\n    def", "for i in range(",
           "# Sort a list", "x = [1, 2, 3]\nprint(", "def main():\n    args =", "while True:\n    line ="]


class LiveServer:
    """The app under uvicorn (with the server's own protocol and timeouts) on a free port, in a background thread
    (the server tests' one fixture server: test_server_api, test_server_ops, test_speculative_serving import it)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = app.state.server
        self.server = build_server(app, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 20)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def openai_client(url: str, key: str | None = KEY) -> openai.OpenAI:
    """The OpenAI SDK pointed at a test server (no retries: a failure shows at once)."""
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def wait_for(cond, timeout: float, every: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture(scope="module")
def engine():
    """float32: in bfloat16 a batched decode step's logits differ from a lone one's by a rounding step, which
    can flip a greedy near-tie; in float32 the text of a request does not depend on its batch."""
    torch.set_num_threads(1)
    eng = moe_engine.load(None, dtype="float32", progress=False)
    eng.reference = {p: eng.generate(p, max_new_tokens=12) for p in PROMPTS[:2]}   # before a loop owns it
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def live(engine):
    app = create_app(engine, api_key=KEY, max_num_seqs=12, max_batch=6, scheduler="expert")
    srv = LiveServer(app)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai_client(live.url)


def post(live, path: str, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    kw.setdefault("timeout", 60)
    return httpx.post(live.url + path, headers={**headers, **kw.pop("headers", {})}, **kw)


def sse_events(response: httpx.Response) -> list:
    """The data lines of an SSE body; [DONE] kept as the string."""
    lines = [ln for ln in response.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    return [ln[6:] if ln == "data: [DONE]" else json.loads(ln[6:]) for ln in lines]


def settled(live) -> bool:
    c = live.state.loop.counters()
    return c["running"] == 0 and c["waiting"] == 0 and c["kv_reserved"] == 0


# ---- completions and chat through the openai client -------------------------------------------
def test_completion_matches_the_library(client, engine):
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
        assert r.choices[0].text == engine.reference[prompt]
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(engine.encode(prompt)), 12)
        assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streamed_completion_equals_the_whole_one(client, live, engine):
    prompt = PROMPTS[0]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == engine.reference[prompt]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": prompt, "max_tokens": 4, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert all(e.get("usage") is None for e in events[:-1])             # no usage chunk unless asked


def test_chat_streamed_and_not(client, engine):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    want_ids = engine.tokenizer(engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
    assert r.usage.prompt_tokens == len(want_ids) and r.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.prompt_tokens == len(want_ids)


def test_stop_strings_cut_the_text(client, engine):
    full = engine.reference[PROMPTS[1]]
    stop = full[6:9]
    assert stop.strip() and full.index(stop) == 6
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop, "@@"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full[:6], "stop")
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:6]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducibility_and_n(client):
    def sample(**kw):
        return client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=1.0, **kw)
    a, b, c = sample(seed=7), sample(seed=7), sample(seed=8)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text
    fan = sample(seed=7, n=2)
    assert [ch.index for ch in fan.choices] == [0, 1]
    assert [ch.text for ch in fan.choices] == [a.choices[0].text, c.choices[0].text]      # choice j: seed + j
    assert fan.usage.prompt_tokens == a.usage.prompt_tokens and fan.usage.completion_tokens == 20


def test_prompt_forms(client, engine):
    ids = engine.encode(PROMPTS[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == engine.reference[PROMPTS[0]]
    both = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=12, n=2, temperature=0)
    texts = [c.text for c in sorted(both.choices, key=lambda c: c.index)]
    assert texts == [engine.reference[PROMPTS[0]]] * 2 + [engine.reference[PROMPTS[1]]] * 2
    assert both.usage.prompt_tokens == len(ids) + len(engine.encode(PROMPTS[1]))


# ---- concurrency and disconnects --------------------------------------------------------------
def test_32_concurrent_streams_each_complete_once_as_alone(client, live):
    prompts = [f"{p}{i}" for i in range(4) for p in PROMPTS]                                # 32 distinct
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts]
    results: dict[int, list] = {}
    start = threading.Barrier(len(prompts))
    before = live.state.loop.counters()

    def stream(i: int) -> None:
        start.wait()
        with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": prompts[i], "max_tokens": 8, "stream": True,
                                "stream_options": {"include_usage": True}}, timeout=120) as r:
            assert r.status_code == 200, r.read()
            results[i] = sse_events(r)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(len(prompts)))                                    # none lost
    ids = set()
    for i, events in results.items():
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = [e for e in events[:-1] if e["choices"]]
        ids.add(chunks[0]["id"])
        assert all(c["id"] == chunks[0]["id"] for c in events[:-1])
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == alone[i], prompts[i]
        assert events[-2]["usage"]["completion_tokens"] == 8
    assert len(ids) == len(prompts)                                                        # none duplicated
    wait_for(lambda: settled(live), 5)
    after = live.state.loop.counters()
    assert after["decode_tokens"] - before["decode_tokens"] == 32 * 7       # the first token comes from prefill
    assert after["steps"] - before["steps"] < 32 * 7 / 3                    # decode steps were shared


def _abort_count(live) -> float:
    body = httpx.get(live.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for fam in text_string_to_metric_families(body):
        if fam.name == "moe_engine:request_success":
            return sum(s.value for s in fam.samples if s.labels.get("finished_reason") == "abort"
                       and s.name.endswith("_total"))
    return 0.0


def test_disconnect_mid_stream_frees_the_sequence(live):
    aborts, before = _abort_count(live), live.state.loop.counters()["decode_tokens"]
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPTS[3], "max_tokens": 900, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(g.startswith("data: ") or not g for g in got)
        assert live.state.loop.counters()["running"] == 1
    wait_for(lambda: settled(live), 10)
    assert live.state.loop.counters()["decode_tokens"] - before < 800                   # stopped early
    assert _abort_count(live) == aborts + 1


def test_disconnect_while_waiting_for_a_whole_response(live):
    aborts = _abort_count(live)
    with pytest.raises(httpx.ReadTimeout):
        post(live, "/v1/completions", json={"prompt": PROMPTS[4], "max_tokens": 900},
             timeout=httpx.Timeout(60, read=0.3))
    wait_for(lambda: settled(live), 10)
    assert _abort_count(live) == aborts + 1


def test_a_failed_step_ends_its_request_with_an_error(live, client, monkeypatch):
    def broken(batch):
        raise RuntimeError("expert read failed (injected)")
    monkeypatch.setattr(live.state.loop.batcher, "decode", broken)
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPTS[0], "max_tokens": 5, "stream": True}) as r:
        events = sse_events(r)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "injected" in events[-2]["error"]["message"] and events[-2]["error"]["code"] == 500
    r = post(live, "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 5})
    assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
    monkeypatch.undo()
    wait_for(lambda: settled(live), 5)
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3).usage.completion_tokens == 3


def test_cancel_of_a_request_being_admitted_ends_it_once():
    """A cancel that arrives as its request is admitted: one abort event, no tokens after it."""
    from moe_engine.runtime.loop import EngineLoop, Request
    from moe_engine.runtime.sampling import SamplingParams
    eng = moe_engine.load(None, dtype="float32", progress=False)
    loop = EngineLoop(eng, max_num_seqs=2, scheduler="fifo")
    events, done = [], threading.Event()
    req = Request(eng.encode(PROMPTS[0]), 5, SamplingParams(), lambda e: (events.append(e), done.set()))
    loop.submit(req)
    loop.cancel(req.request_id)                     # both seen by the loop's first iteration
    loop.start()
    done.wait(10)
    time.sleep(0.2)
    loop.shutdown()
    eng.close()
    assert [(e.finish_reason, e.token_ids) for e in events] == [("abort", [])]
    assert loop.counters()["kv_reserved"] == 0


# ---- hostile and malformed requests -----------------------------------------------------------
BAD = [  # (route, request kwargs, status, param or None, words the message must contain)
    ("/v1/completions", dict(content=b"{not json"), 400, None, "not valid JSON"),
    ("/v1/completions", dict(content=b"[1, 2]"), 400, None, "JSON object"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": 10**12}), 400, "max_tokens", "1024"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": -3}), 400, "max_tokens", "greater than or equal to 0"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": "5"}), 400, "max_tokens", "integer"),
    ("/v1/completions", dict(json={"prompt": "x", "max_tokens": 2.5}), 400, "max_tokens", "integer"),
    ("/v1/completions", dict(json={"prompt": "x", "temperature": -1}), 400, "temperature", "greater than or equal to 0"),
    ("/v1/completions", dict(json={"prompt": "x", "top_p": 0}), 400, "top_p", "greater than 0"),
    ("/v1/completions", dict(json={"prompt": "x", "top_k": -5}), 400, "top_k", "greater than or equal to -1"),
    ("/v1/completions", dict(json={"prompt": "x", "n": 0}), 400, "n", "greater than or equal to 1"),
    ("/v1/completions", dict(json={"prompt": "x", "n": 10**6}), 400, "n", "less than or equal to 64"),
    ("/v1/completions", dict(json={"prompt": "x", "stop": 5}), 400, "stop", "string"),
    ("/v1/completions", dict(json={"prompt": "x", "stop": [""]}), 400, "stop", "empty"),
    ("/v1/completions", dict(json={"prompt": "x", "seed": "1"}), 400, "seed", "integer"),
    ("/v1/completions", dict(json={"prompt": "x", "stream": "yes"}), 400, "stream", "boolean"),
    ("/v1/completions", dict(json={"prompt": "x", "logprobs": 30}), 400, "logprobs", "less than or equal to 20"),
    ("/v1/completions", dict(json={"max_tokens": 3}), 400, "prompt", "required"),
    ("/v1/completions", dict(json={"prompt": []}), 400, "prompt", "empty"),
    ("/v1/completions", dict(json={"prompt": [5, -1]}), 400, "prompt", "vocabulary"),
    ("/v1/completions", dict(json={"prompt": [5, 10**9]}), 400, "prompt", "vocabulary"),
    ("/v1/completions", dict(json={"prompt": "word " * 2000}), 400, "prompt", "1024"),
    ("/v1/completions", dict(json={"prompt": "x", "model": "gpt-4"}), 404, "model", "gpt-4"),
    ("/v1/chat/completions", dict(json={"messages": []}), 400, "messages", "at least 1"),
    ("/v1/chat/completions", dict(json={"messages": [{"role": "robot", "content": "hi"}]}), 400,
     "messages[0].role", "user"),
    ("/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": 7}]}), 400,
     "messages[0].content", "string"),
    ("/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "hi"}],
                                        "max_completion_tokens": 5000}), 400, "max_tokens", "1024"),
    ("/v1/completions", dict(content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}'), 413, None, "at most"),
]


@pytest.mark.parametrize("route,kw,status,param,words", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_the_error_envelope(live, route, kw, status, param, words):
    r = post(live, route, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param and words in err["message"], err


def test_keys_routes_and_methods(live):
    for key, words in ((None, "missing"), ("wrong", "wrong")):
        r = post(live, "/v1/completions", key=key, json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 401 and words in r.json()["error"]["message"]
        assert httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    r = httpx.get(live.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = httpx.get(live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    models = httpx.get(live.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 1024


def test_server_keeps_serving_after_abuse(client, live, engine):
    for kw in (dict(content=b"\xff\xfe"), dict(json={"prompt": "x", "n": "many"}), dict(content=b"{}" * 10)):
        assert post(live, "/v1/completions", **kw).status_code == 400
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == engine.reference[PROMPTS[0]]
    assert settled(live)


# ---- metrics ----------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """sample name{labels but the server's model_name and engine} -> value."""
    body = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model_name", "engine"))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


REQUEST_METRICS = ["moe_engine:num_requests_running", "moe_engine:num_requests_waiting",
                   "moe_engine:prompt_tokens_total", "moe_engine:generation_tokens_total",
                   "moe_engine:time_to_first_token_seconds_count", "moe_engine:time_per_output_token_seconds_count",
                   "moe_engine:e2e_request_latency_seconds_count"]
ENGINE_METRICS = ["moe_engine:expert_cache_hits_total{tier=compute}", "moe_engine:expert_cache_lookups_total{tier=compute}",
                  "moe_engine:expert_loads_total", "moe_engine:expert_bytes_moved_total{transfer=disk_read}",
                  "moe_engine:expert_bytes_moved_total{transfer=host_to_device}", "moe_engine:expert_stall_seconds_total",
                  "moe_engine:expert_prefetch_issued_total", "moe_engine:expert_prefetch_used_total",
                  "moe_engine:expert_cache_capacity_experts", "moe_engine:expert_cache_resident_experts"]


def test_metrics_count_one_request(client, live):
    before = scrape(live.url)
    assert not [m for m in REQUEST_METRICS + ENGINE_METRICS if m not in before]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=7, temperature=0)
    after = scrape(live.url)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["moe_engine:prompt_tokens_total"] == r.usage.prompt_tokens
    assert delta["moe_engine:generation_tokens_total"] == 7
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert delta[f"moe_engine:{name}_count"] == 1
    assert delta["moe_engine:time_per_output_token_seconds_count"] == 6                  # one per token after the first
    assert delta["moe_engine:request_success_total{finished_reason=length}"] == 1
    assert after["moe_engine:num_requests_running"] == 0
    assert after["moe_engine:expert_cache_capacity_experts"] == 96                          # all resident
    lookups = "moe_engine:expert_cache_lookups_total{tier=compute}"                       # engine stats: re-read
    wait_for(lambda: scrape(live.url)[lookups] > before[lookups], 5, every=0.2)          # at most every second


# ---- loading, a budgeted engine, the CLI ------------------------------------------------------
def minimum_budget() -> int:
    with pytest.raises(ConfigError) as err:
        moe_engine.load(None, dtype="float32", gpu_mem=1, progress=False)
    return int(str(err.value).split("(")[-1].split(" bytes")[0])


@pytest.fixture
def loading():
    """An app whose model (under a tight --gpu-mem) loads only when the test sets the gate."""
    gate = threading.Event()

    def factory():
        gate.wait(30)
        return moe_engine.load(None, dtype="float32", gpu_mem=minimum_budget(), progress=False)

    app = create_app(engine_factory=factory, max_num_seqs=4, max_waiting=2)
    with TestClient(app) as c:
        c.gate = gate
        yield c
    assert app.state.server.engine.decoder is None                                        # closed on shutdown


def ready(c: TestClient) -> TestClient:
    c.gate.set()
    wait_for(lambda: c.get("/health").status_code == 200, 30, every=0.05)
    return c


def test_health_503_while_loading_then_200(loading):
    r = loading.get("/health")
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    r = loading.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    assert "moe_engine:num_requests_running" in loading.get("/metrics").text
    ready(loading)
    r = loading.post("/v1/completions", json={"prompt": PROMPTS[6], "max_tokens": 6})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6


def test_engine_metrics_of_a_budgeted_engine(loading):
    c = ready(loading)
    assert c.post("/v1/completions", json={"prompt": PROMPTS[6], "max_tokens": 6}).status_code == 200
    m = scrape_client(c)
    assert m["moe_engine:expert_cache_capacity_experts"] < 96
    assert m["moe_engine:expert_loads_total"] > 0 and m["moe_engine:expert_bytes_moved_total{transfer=disk_read}"] > 0
    assert m["moe_engine:expert_cache_hits_total{tier=compute}"] < m["moe_engine:expert_cache_lookups_total{tier=compute}"]


def test_full_queue_gets_503_and_frees_what_it_queued(loading):
    c = ready(loading)
    r = c.post("/v1/completions", json={"prompt": PROMPTS[6], "max_tokens": 50, "n": 40})     # 4 run + 2 wait
    assert r.status_code == 503 and "busy" in r.json()["error"]["message"]
    loop = c.app.state.server.loop
    wait_for(lambda: loop.counters()["running"] == loop.counters()["kv_reserved"] == 0, 10)
    assert c.post("/v1/completions", json={"prompt": PROMPTS[6], "max_tokens": 3}).status_code == 200


def scrape_client(c: TestClient) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(c.get("/metrics").text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_serve_flag_errors(capsys, tmp_path):
    assert main(["serve", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs=0" in capsys.readouterr().err
    assert main(["serve", "--chat-template", str(tmp_path / "none.jinja")]) == 2
    assert "--chat-template" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_serve_drains_on_sigterm(tmp_path, engine):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moe_engine.cli", "serve", "--port", str(port), "--no-progress",
                             "--chat-template", str(template), "--served-model-name", "tiny"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _health(url) == 200, 60, every=0.1)
        chat = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                                "messages": [{"role": "user", "content": "hello"}]})
        assert chat.json()["usage"]["prompt_tokens"] == len(engine.tokenizer("hello", add_special_tokens=False)
                                                            ["input_ids"])
        lines: list[str] = []
        reader = threading.Thread(target=_read_stream, args=(url, lines))
        reader.start()
        wait_for(lambda: len(lines) >= 4, 30)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _health(url) == 503, 10)
        late = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        reader.join(60)
        assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]      # finished, not cut
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Application shutdown complete" in proc.stdout.read()


def _health(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.TransportError:
        return None


def _read_stream(url: str, lines: list[str]) -> None:
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"prompt": "def f(x):", "max_tokens": 300, "stream": True}) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
