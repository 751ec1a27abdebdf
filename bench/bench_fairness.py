"""Fairness under load: an ordinary streaming client's tokens/s alone and beside four kinds of neighbour.

    python bench/bench_fairness.py [--requests 6] [--max-tokens 64] [-- SERVE FLAGS]

Starts the real server (`moe-engine serve`, a subprocess, with the given flags), then for each scenario starts
the neighbour (each client sends its own API key, so the server tells them apart), waits until it is busy, and
runs the ordinary client: `--requests` streaming /v1/completions one after another (greedy, `--max-tokens` new
tokens, prompts of the calibration text). Scenarios:

    alone      nobody else
    benign     another ordinary client doing the same, back to back
    flood      a client sending 300-token prompts back to back (max_tokens 1), 4 at a time
    diverse    a routing-diverse client: random-token prompts sampled at temperature 1.5 (its tokens touch
               experts the others do not), 2 streams back to back
    n64        one request with n=64, max_tokens=512

Reported per scenario: the ordinary client's tokens/s (its generated tokens over the wall time of its requests),
TTFT p50/p95, the server's expert loads per generated token over that time (from /metrics), and tokens/s as a
fraction of the benign-neighbour figure (the goal: at least 0.5, within 2x). Appended to bench/RESULTS.md
(bench/results.py) unless --no-record.

    python bench/bench_fairness.py --requests 1 --max-tokens 8 --scenarios alone flood --no-record   # quick check
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import free_port, stream_completion  # noqa: E402
from results import add_record_flag, record, wants_record  # noqa: E402

SCENARIOS = ("alone", "benign", "flood", "diverse", "n64")


def completion(base: str, key: str, body: dict, stop: threading.Event | None = None) -> dict:
    """One streaming /v1/completions -> {"ttft", "latency", "tokens"}; ends early (closing the stream) on `stop`."""
    return stream_completion(base, body, key, stop)


def scrape(base: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Neighbour:
    """A client on threads that repeats its request until stopped (n64: one request)."""

    def __init__(self, base: str, kind: str, prompts: list[list[int]], max_tokens: int, vocab: int):
        self.base, self.kind, self.stop = base, kind, threading.Event()
        self.started, self.threads = threading.Event(), []
        rng = random.Random(0)
        streams = {"benign": 1, "flood": 4, "diverse": 2, "n64": 1}[kind]
        if kind == "benign":
            self.bodies = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0} for p in prompts]
        elif kind == "flood":
            long = [t for p in prompts for t in p]
            self.bodies = [{"prompt": long[i * 37: i * 37 + 300], "max_tokens": 1, "temperature": 0}
                           for i in range(max(1, (len(long) - 300) // 37))]
        elif kind == "diverse":
            self.bodies = [{"prompt": [rng.randrange(3, vocab) for _ in range(64)], "max_tokens": 256,
                            "temperature": 1.5, "top_p": 1.0, "seed": i} for i in range(16)]
        else:
            self.bodies = [{"prompt": prompts[0], "n": 64, "max_tokens": 512, "temperature": 0.8, "seed": 0}]
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in range(streams)]

    def _run(self, stream: int) -> None:
        i = stream
        while not self.stop.is_set():
            body = self.bodies[i % len(self.bodies)]
            self.started.set()
            try:
                completion(self.base, f"neighbour-{self.kind}", body, self.stop)
            except httpx.HTTPError as e:
                print(f"neighbour {self.kind}: {e}", file=sys.stderr)
                time.sleep(0.2)
            i += len(self.threads)
            if self.kind == "n64":
                return

    def __enter__(self) -> Neighbour:
        for t in self.threads:
            t.start()
        self.started.wait(30)
        time.sleep(2.0)                         # let it get busy (queued, prefilling, decoding)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def ordinary(base: str, prompts: list[list[int]], requests: int, max_tokens: int) -> dict:
    before = scrape(base)
    t0 = time.perf_counter()
    runs = [completion(base, "ordinary", {"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                                          "temperature": 0}) for i in range(requests)]
    wall = time.perf_counter() - t0
    time.sleep(1.1)                             # engine stats in /metrics are read at most once a second
    after = scrape(base)
    loads = after.get("moe_engine:expert_loads_total", 0) - before.get("moe_engine:expert_loads_total", 0)
    gen = after.get("moe_engine:generation_tokens_total", 0) - before.get("moe_engine:generation_tokens_total", 0)
    ttft = [r["ttft"] for r in runs]
    return {"tokens_per_s": sum(r["tokens"] for r in runs) / wall, "ttft_p50": float(np.median(ttft)),
            "ttft_p95": float(np.percentile(ttft, 95)), "loads_per_token": loads / gen if gen else 0.0}


def table(rows: dict[str, dict]) -> str:
    benign = rows.get("benign", {}).get("tokens_per_s")
    lines = ["| neighbour | ordinary client tokens/s | vs benign neighbour | TTFT p50 s | TTFT p95 s | "
             "expert loads / generated token (server) |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = f"{r['tokens_per_s'] / benign:.2f}x" if benign else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {ratio} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | "
                     f"{r['loads_per_token']:.2f} |")
    return "\n".join(lines)


def calibration_prompts(n: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    from moe_engine.quant.settings import DEFAULT_CALIBRATION
    from moe_engine.runtime.load import model_dir_or_default
    tok = Tokenizer.from_file(str(model_dir_or_default(None) / "tokenizer.json"))
    ids = tok.encode(DEFAULT_CALIBRATION.read_text()).ids
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        plen = int(rng.integers(16, 97))
        start = int(rng.integers(0, len(ids) - plen))
        out.append(ids[start:start + plen])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6, help="the ordinary client's requests per scenario")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    add_record_flag(p)
    p.add_argument("serve_flags", nargs=argparse.REMAINDER, help="after --: flags for moe-engine serve")
    args = p.parse_args(argv)
    flags = [f for f in args.serve_flags if f != "--"]
    port = free_port()
    cmd = [sys.executable, "-m", "moe_engine.cli", "serve", "--port", str(port), *flags]
    print("$ " + " ".join(cmd), file=sys.stderr)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    prompts = calibration_prompts(32)
    rows = {}
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        completion(base, "warm-up", {"prompt": prompts[0], "max_tokens": 8, "temperature": 0})
        for name in args.scenarios:
            if name == "alone":
                rows[name] = ordinary(base, prompts, args.requests, args.max_tokens)
            else:
                with Neighbour(base, name, prompts[8:], args.max_tokens, 4096):
                    rows[name] = ordinary(base, prompts, args.requests, args.max_tokens)
            print(name, json.dumps(rows[name]), file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(60)
    setup = (f"moe-engine serve {' '.join(flags)} (bundled model); the ordinary client: {args.requests} streaming "
             f"requests of {args.max_tokens} greedy tokens one after another, prompts of 16-96 tokens of the calibration text")
    text = table(rows)
    print(setup)
    print(text)
    benign = rows.get("benign", {}).get("tokens_per_s")
    compare = "ordinary client's tokens/s vs with a benign neighbour (goal >= 0.5x): " + ", ".join(
        f"{k} {r['tokens_per_s'] / benign:.2f}x" for k, r in rows.items() if k not in ("alone", "benign")) \
        if benign else "no benign-neighbour figure to compare with"
    print(compare)
    if wants_record(args):
        record("fairness: an ordinary streaming client beside other clients (moe-engine serve, bundled model)",
               text, compare, setup + ".")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
