"""The server as an operator runs it: a drain bounded by --drain-timeout (SIGTERM to a real `moe-engine serve`),
/metrics behind the API key with vLLM's metric names (checked against the requests sent), read timeouts for
slow clients (raw sockets), the API key from a file or the environment, and the model card."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import moe_engine
from moe_engine.cli import _api_key
from moe_engine.errors import ConfigError
from moe_engine.server import create_app
from moe_engine.server.metrics import VLLM_METRICS
from test_server import LiveServer, openai_client, wait_for

KEY = "ops-key"
MODEL = "tiny"
PROMPTS = ["def fibonacci(n):", "import os\nimport", "class Cache:\n    def", "for i in range("]


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    eng = moe_engine.load(None, dtype="float32", progress=False)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def live(engine):
    srv = LiveServer(create_app(engine, api_key=KEY, served_model_name=MODEL, max_num_seqs=8, read_timeout=1.0))
    yield srv
    srv.stop()


def get(url: str, key: str | None = KEY) -> httpx.Response:
    return httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=30)


def scrape(url: str, key: str | None = KEY) -> dict[str, float]:
    """sample name{labels but model_name and engine} -> value; checks those two labels on the way."""
    r = get(url + "/metrics", key)
    assert r.status_code == 200, r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            labels = dict(s.labels)
            if "model_name" in labels:
                assert (labels.pop("model_name"), labels.pop("engine")) == (MODEL, "0"), s
            text = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            out[f"{s.name}{{{text}}}" if text else s.name] = s.value
    return out


def settled(srv) -> bool:
    c = srv.state.loop.counters()
    return c["running"] == 0 and c["waiting"] == 0 and c["kv_reserved"] == 0


# ---- /metrics: the key, vLLM's names, values that match the requests --------------------------
def test_metrics_need_the_key_health_does_not(live):
    assert get(live.url + "/metrics", None).status_code == 401
    assert get(live.url + "/metrics", "wrong").status_code == 401
    assert get(live.url + "/metrics").status_code == 200
    assert get(live.url + "/health", None).status_code == 200


def test_metrics_open_with_the_flag(engine):
    srv = LiveServer(create_app(engine, api_key=KEY, served_model_name=MODEL, metrics_without_key=True))
    try:
        assert "moe_engine:num_requests_running" in get(srv.url + "/metrics", None).text
        assert get(srv.url + "/v1/models", None).status_code == 401                  # the API itself keeps its key
    finally:
        srv.stop()


def test_metrics_count_the_requests_sent(live):
    client = openai_client(live.url, KEY)
    before = scrape(live.url)
    names = {k.split("{")[0] for k in before}
    for name in VLLM_METRICS:          # every vLLM metric is there, with its own samples, before any request
        assert {f"moe_engine:{name}", f"moe_engine:{name}_total", f"moe_engine:{name}_count"} & names, name
    choices = []                       # (prompt tokens, completion tokens) per engine request
    for prompt, max_tokens, n in ((PROMPTS[0], 5, 1), (PROMPTS[1], 9, 2), (PROMPTS[2], 1, 1)):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, n=n, temperature=0)
        assert [c.finish_reason for c in r.choices] == ["length"] * n
        choices += [(r.usage.prompt_tokens, max_tokens)] * n
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    choices.append((chunks[-1].usage.prompt_tokens, 7))
    wait_for(lambda: settled(live), 10)
    after = scrape(live.url)
    d = {k: after[k] - before.get(k, 0) for k in after}
    prompt, gen, n = sum(p for p, _ in choices), sum(g for _, g in choices), len(choices)
    assert d["moe_engine:prompt_tokens_total"] == prompt and d["moe_engine:generation_tokens_total"] == gen
    assert d["moe_engine:request_success_total{finished_reason=length}"] == n
    assert d["moe_engine:iteration_tokens_total_sum"] == prompt + gen
    assert d["moe_engine:request_prompt_tokens_sum"] == prompt and d["moe_engine:request_prompt_tokens_count"] == n
    assert d["moe_engine:request_generation_tokens_sum"] == gen
    assert d["moe_engine:inter_token_latency_seconds_count"] == gen - n        # one gap per token after the first
    assert d["moe_engine:time_per_output_token_seconds_count"] == gen - n
    assert d["moe_engine:request_time_per_output_token_seconds_count"] == sum(g > 1 for _, g in choices)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds"):
        assert d[f"moe_engine:{name}_count"] == n, name
    s = {k: d[f"moe_engine:{k}_sum"] for k in ("e2e_request_latency_seconds", "request_queue_time_seconds",
                                               "request_prefill_time_seconds", "request_decode_time_seconds",
                                               "request_inference_time_seconds", "time_to_first_token_seconds")}
    assert s["request_prefill_time_seconds"] > 0 and s["request_decode_time_seconds"] > 0
    assert s["e2e_request_latency_seconds"] == pytest.approx(s["request_queue_time_seconds"] +
                                                             s["request_inference_time_seconds"])
    assert s["request_inference_time_seconds"] == pytest.approx(s["request_prefill_time_seconds"] +
                                                                s["request_decode_time_seconds"])
    assert s["time_to_first_token_seconds"] == pytest.approx(s["request_queue_time_seconds"] +
                                                             s["request_prefill_time_seconds"])
    assert after["moe_engine:num_requests_running"] == 0 and after["moe_engine:kv_cache_usage_perc"] == 0


def test_kv_cache_usage_and_running_during_a_stream(live):
    max_tokens, kv_tokens = 600, live.state.loop.kv_tokens
    with httpx.stream("POST", live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"prompt": PROMPTS[0], "max_tokens": max_tokens, "stream": True}) as r:
        lines = r.iter_lines()
        next(ln for ln in lines if ln.startswith("data: "))
        m = scrape(live.url)
        prompt = len(live.state.engine.encode(PROMPTS[0]))
        assert m["moe_engine:num_requests_running"] == 1
        assert m["moe_engine:kv_cache_usage_perc"] == pytest.approx((prompt + max_tokens) / kv_tokens)
        assert m["moe_engine:gpu_cache_usage_perc"] == m["moe_engine:kv_cache_usage_perc"]
        assert m["moe_engine:kv_cache_reserved_tokens"] == prompt + max_tokens
    wait_for(lambda: settled(live), 10)                            # the client left: cancelled, reserve freed


# the names vLLM's Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) and the newer
# vLLM names read
DASHBOARD = ["vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
             "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             "vllm:time_per_output_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
             "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds_bucket",
             "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:request_prompt_tokens_bucket",
             "vllm:request_generation_tokens_bucket", "vllm:request_success_total",
             "vllm:request_queue_time_seconds_sum", "vllm:request_prefill_time_seconds_sum",
             "vllm:request_decode_time_seconds_sum", "vllm:iteration_tokens_total_bucket"]


def test_metrics_prefix_vllm_gives_vllms_names(engine):
    srv = LiveServer(create_app(engine, served_model_name=MODEL, metrics_prefix="vllm"))
    try:
        httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3}, timeout=60)
        names = {k.split("{")[0] for k in scrape(srv.url, None)}
        assert not [n for n in DASHBOARD if n not in names]
        ours = [n for n in names if n.startswith("moe_engine:")]      # vLLM's names appear once, as vllm:
        assert ours and all(n.startswith(("moe_engine:expert_", "moe_engine:kv_cache_")) for n in ours), ours
        assert "moe_engine:expert_cache_hits_total" in names            # the engine's own stay under moe_engine:
    finally:
        srv.stop()


def test_bad_metrics_prefix():
    with pytest.raises(ConfigError, match="--metrics-prefix"):
        create_app(engine_factory=lambda: None, metrics_prefix="vllm_")


# ---- slow clients: raw sockets ------------------------------------------------------------------
class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))
        if record.exc_info:
            self.lines.append("Traceback")


@pytest.fixture
def server_log():
    """Every record of the server's and uvicorn's loggers, tracebacks flagged."""
    handler, loggers = Lines(), [logging.getLogger(n) for n in ("moe_engine", "uvicorn")]   # uvicorn.error's too
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield handler.lines
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """What the server sent until it closed the connection, and when it closed (seconds from now)."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit)
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def slow_head(port: int, stop: threading.Event) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))

    def trickle():
        for b in b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n":
            if stop.wait(0.1):
                return
            try:
                sock.send(bytes([b]))
            except OSError:
                return
    threading.Thread(target=trickle, daemon=True).start()
    return sock


def test_slow_heads_are_closed_after_the_read_timeout(live, server_log):
    stop = threading.Event()
    socks = [slow_head(live.port, stop) for _ in range(20)]
    try:
        results = [read_until_closed(s, 10) for s in socks]
    finally:
        stop.set()
        for s in socks:
            s.close()
    for data, waited in results:
        assert data.startswith(b"HTTP/1.1 408") and waited < 1.0 + 2.0, (data, waited)
    closed = [ln for ln in server_log if "request head" in ln and "--read-timeout" in ln]
    assert len(closed) == 20 and not [ln for ln in server_log if "Traceback" in ln]
    idle = socket.create_connection(("127.0.0.1", live.port))           # sent nothing: closed without a word
    assert read_until_closed(idle, 10)[0] == b""
    idle.close()


def body_that_never_ends(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: 1000\r\n\r\n{\"prompt\": \"x")
    return sock


def test_unfinished_bodies_get_408_and_one_log_line_each(live, server_log):
    socks = [body_that_never_ends(live.port) for _ in range(10)]
    results = [read_until_closed(s, 10) for s in socks]
    for s in socks:
        s.close()
    for data, waited in results:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), data
        assert "did not arrive within 1s" in json.loads(body)["error"]["message"]
        assert waited < 1.0 + 2.0
    dropped = [ln for ln in server_log if "dropped the body of POST /v1/completions" in ln]
    assert len(dropped) == 10 and all("13 of 1000 bytes after 1s (--read-timeout)" in ln for ln in dropped), dropped
    assert len(server_log) == 10 and not [ln for ln in server_log if "Traceback" in ln], server_log


def test_a_client_leaving_mid_body_logs_one_line(live, server_log):
    sock = body_that_never_ends(live.port)
    time.sleep(0.2)
    sock.close()
    wait_for(lambda: server_log, 5)
    time.sleep(0.2)
    assert len(server_log) == 1 and "the client left after 13 of 1000 bytes" in server_log[0], server_log
    r = httpx.post(live.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"prompt": PROMPTS[0], "max_tokens": 2})
    assert r.status_code == 200


def test_a_body_after_an_early_answer_does_not_hold_the_connection(live):
    sock = socket.create_connection(("127.0.0.1", live.port))          # no key: 401 before the body is read
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{")
    data, waited = read_until_closed(sock, 10)
    sock.close()
    assert data.startswith(b"HTTP/1.1 401") and waited < 1.0 + 2.0


# ---- the model card, the API key's sources ------------------------------------------------------
def test_models_card_names_no_path(live, engine):
    r = get(live.url + "/v1/models")
    card = r.json()["data"][0]
    assert card["id"] == card["root"] == MODEL
    assert str(engine.checkpoint.model_dir) not in r.text and engine.checkpoint.model_dir.name not in r.text


def key_args(**kw) -> Namespace:
    return Namespace(**{"api_key": None, "api_key_file": None, **kw})


def test_api_key_sources_and_precedence(tmp_path):
    f = tmp_path / "key"
    f.write_text("from-file\n")
    env = {"MOE_ENGINE_API_KEY": "ours", "VLLM_API_KEY": "vllms"}
    assert _api_key(key_args(api_key="flag"), env) == "flag"
    assert _api_key(key_args(api_key_file=str(f)), env) == "from-file"
    assert _api_key(key_args(), env) == "ours"
    assert _api_key(key_args(), {"VLLM_API_KEY": "vllms"}) == "vllms"
    assert _api_key(key_args(), {"VLLM_API_KEY": ""}) is None
    assert _api_key(key_args(), {}) is None
    with pytest.raises(ConfigError, match="both given"):
        _api_key(key_args(api_key="a", api_key_file=str(f)), {})
    with pytest.raises(ConfigError, match="no such file"):
        _api_key(key_args(api_key_file=str(tmp_path / "none")), {})
    f.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        _api_key(key_args(api_key_file=str(f)), {})
    with pytest.raises(ConfigError, match="is empty"):
        _api_key(key_args(), {"MOE_ENGINE_API_KEY": " spaced "})


# ---- SIGTERM: the drain deadline bounds the exit; running streams end with abort and [DONE] ------
DRAIN = 3.0
EXIT_MARGIN = 2.5            # the drain's last second, uvicorn's shutdown and the interpreter's exit


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_drain_deadline_bounds_the_exit_and_aborts_streams(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    proc = subprocess.Popen([sys.executable, "-m", "moe_engine.cli", "serve", "--port", str(port), "--no-progress",
                             "--served-model-name", MODEL, "--drain-timeout", str(DRAIN), "--dtype", "float32"],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "VLLM_API_KEY": KEY},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or _health(url) == 200, 120, every=0.1)
        assert proc.poll() is None, proc.stdout.read()
        assert KEY not in " ".join(proc.args)                        # the key came from the environment
        assert httpx.get(url + "/v1/models").status_code == 401
        raw: list[str] = []
        chunks: list = []
        whole: list[httpx.Response] = []
        long = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 1000}
        threads = [threading.Thread(target=_raw_stream, args=(url, {**long, "stream": True}, raw)),
                   threading.Thread(target=_openai_stream, args=(url, long, chunks)),
                   threading.Thread(target=lambda: whole.append(httpx.post(url + "/v1/completions", json=long,
                                                                           headers=headers, timeout=60)))]
        for t in threads:
            t.start()
        wait_for(lambda: len(raw) >= 3 and len(chunks) >= 3, 30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(DRAIN + 30)
        took = time.monotonic() - t0
        for t in threads:
            t.join(10)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and took < DRAIN + EXIT_MARGIN, (took, output)
    assert raw[-1] == "data: [DONE]", raw[-3:]                       # ended, not cut
    assert json.loads(raw[-2][6:])["choices"][0]["finish_reason"] == "abort"
    assert chunks[-1].choices[0].finish_reason == "abort", chunks[-1:]
    assert whole[0].status_code == 503 and "shutting down" in whole[0].json()["error"]["message"]
    assert "finish_reason abort" in output and "Traceback" not in output, output


def _health(url: str) -> int | None:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.TransportError:
        return None


def _raw_stream(url: str, body: dict, lines: list[str]) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)


def _openai_stream(url: str, body: dict, chunks: list) -> None:
    """The openai client's view: it consumes [DONE] itself and raises if the connection is cut."""
    client = openai_client(url, KEY)
    for chunk in client.completions.create(stream=True, **body):
        chunks.append(chunk)
