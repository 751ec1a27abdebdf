"""Server throughput: `moe-engine serve` on the bundled model, 1 / 4 / 16 concurrent streaming clients.

    python bench/bench_server.py [--clients 1 4 16] [--requests-per-client 4] [--max-tokens 64] [-- SERVE FLAGS]

Starts the real server (`moe-engine serve`, a subprocess) with the given flags, waits for /health,
then for each concurrency runs that many client threads, each sending streaming /v1/completions
one after another (greedy, `max_tokens` new tokens, prompts from the bundled calibration text).
Reports generated tokens/s over the wall time of each concurrency level (and as a ratio to the
first level's), p50/p99 time to first token and request latency as the clients see them. Appended
to bench/RESULTS.md (bench/results.py) unless --no-record.

    python bench/bench_server.py --clients 1 2 --requests-per-client 1 --max-tokens 8 --no-record   # quick check
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_one(base: str, prompt: str, max_tokens: int) -> dict:
    return stream_completion(base, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def stream_completion(base: str, body: dict, key: str | None = None, stop: threading.Event | None = None) -> dict:
    """One streaming /v1/completions of `body` -> {"ttft", "latency", "tokens"} as the client sees them; ends early
    (closing the stream) once `stop` is set."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    body = {"model": "tiny-moe", "stream": True, "stream_options": {"include_usage": True}, **body}
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=600, headers=headers) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if stop is not None and stop.is_set():
                break
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first or 0.0, "latency": time.perf_counter() - t0, "tokens": tokens}


def level(base: str, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    results, lock = [], threading.Lock()

    def client(c: int) -> None:
        for i in range(per_client):
            r = stream_one(base, prompts[(c * per_client + i) % len(prompts)], max_tokens)
            with lock:
                results.append(r)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    lat = [r["latency"] for r in results]
    return {"clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": float(np.median(ttft)),
            "ttft_p99": float(np.percentile(ttft, 99)), "latency_p50": float(np.median(lat)),
            "latency_p99": float(np.percentile(lat, 99))}


def table(rows: list[dict]) -> str:
    base = rows[0]["tokens_per_s"]
    lines = [f"| concurrent clients | requests | generated tokens | tokens/s | vs {rows[0]['clients']} client(s) | "
             "TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | "
                     f"{r['latency_p50']:.2f} | {r['latency_p99']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    add_record_flag(p)
    p.add_argument("serve_flags", nargs=argparse.REMAINDER, help="after --: flags for moe-engine serve")
    args = p.parse_args(argv)
    flags = [f for f in args.serve_flags if f != "--"]
    port = free_port()
    cmd = [sys.executable, "-m", "moe_engine.cli", "serve", "--port", str(port), "--max-num-seqs", "16", *flags]
    print("$ " + " ".join(cmd), file=sys.stderr)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        from moe_engine.quant.settings import DEFAULT_CALIBRATION
        text = DEFAULT_CALIBRATION.read_text()
        prompts = [text[i: i + 120] for i in range(0, 120 * 64, 120)]
        stream_one(base, prompts[0], 8)                                    # warm-up
        rows = [level(base, prompts, c, args.requests_per_client, args.max_tokens) for c in args.clients]
    finally:
        server.terminate()
        server.wait(60)
    setup = (f"moe-engine serve {' '.join(flags)} (bundled model), {args.requests_per_client} streaming requests "
             f"per client, {args.max_tokens} tokens each, greedy")
    text = table(rows)
    print(setup)
    print(text)
    compare = f"tokens/s / {rows[0]['clients']} client(s)'s: " + ", ".join(
        f"{r['clients']} clients {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x" for r in rows[1:])
    print(compare)
    if wants_record(args):
        record("server throughput by concurrent streaming clients (moe-engine serve, bundled model)", text, compare,
               setup + ".")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
