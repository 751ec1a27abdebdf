"""Token rescheduling on GPT-OSS-20B routing traces: expert loads and waits, FIFO vs expert-aware (simulation).

A server with S concurrent decoding sequences (taken from the trace in order; a finished one is
replaced by the next until the trace runs out), a step of at most B tokens, and per MoE layer an
LRU expert cache of `--slots` experts shared by all sequences (never reset). Each step:

    ready = every active sequence, predicted path = --signal  ->  scheduler.select(ready, B, residents)
    -> the picked tokens' TRUE experts, per layer: distinct experts not resident = loads
    -> LRU update (the step's experts become most recent, most-used last) -> each picked sequence advances

Signals (the Candidate.experts the scheduler sees):
  prev    the experts the sequence's previous token used (what an engine knows for free); None
          for a sequence's first token
  prev2   the union of its last two tokens' experts
  oracle  the true experts of the token about to run: an UPPER BOUND no engine has
FIFO sees no paths and runs the oldest-ready first (round-robin, since a sequence's arrival is
restamped each time its next token becomes ready).

Not simulated: prefill (the traces hold decode steps only), time (a step's cost is its loads),
and a step whose distinct experts exceed the slots (counted as loads once each; the cache keeps
the most used of them). Waits: a token's wait is the steps since its sequence's previous token
(first token: since admission, counting the admitting step), 1 = ran every step.

    OMP_NUM_THREADS=1 python bench/bench_scheduling.py --split dev --seqs 150 --tune   # choose max_wait, miss_weight
    OMP_NUM_THREADS=1 python bench/bench_scheduling.py --split test                   # the reported table (~3 min)
    OMP_NUM_THREADS=1 python bench/bench_scheduling.py --split dev --seqs 12 --configs 8x4 --no-record   # quick check

The table (ratio: loads per token / FIFO's) is appended to bench/RESULTS.md (bench/results.py)
unless --no-record; --tune sweeps are printed only.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduling import Candidate, make_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

ROUTING = Path("/work/shared/data/routing")
CONFIGS = ((16, 4), (16, 8), (32, 8))


def load_split(split: str, limit: int | None) -> list[np.ndarray]:
    """Per sequence, its decode tokens' experts [T_i, L, K] (uint8), in trace order."""
    z = np.load(ROUTING / f"gptoss20b_{split}.npz")
    experts, offsets = z["experts"], z["seq_offsets"]
    seqs = [experts[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return seqs[:limit] if limit else seqs


def path_of(rows: np.ndarray) -> list[frozenset]:
    """[L, K] or [n, L, K] expert ids -> per layer the set of ids."""
    rows = rows.reshape(-1, *rows.shape[-2:])
    return [frozenset(layer.ravel().tolist()) for layer in rows.transpose(1, 0, 2)]


def predicted(seq: np.ndarray, pos: int, signal: str) -> list[frozenset] | None:
    if signal == "none":
        return None
    if signal == "oracle":
        return path_of(seq[pos])
    depth = {"prev": 1, "prev2": 2}[signal]
    return path_of(seq[max(0, pos - depth):pos]) if pos else None


class LayerLru:
    """One layer's expert cache: `order` lists residents, least recently used first."""

    def __init__(self, slots: int):
        self.slots, self.order = slots, []

    def step(self, used: np.ndarray) -> int:
        """Experts of one step's tokens (any shape); returns loads, then makes them most recent."""
        ids, counts = np.unique(used, return_counts=True)
        ids = ids[np.lexsort((ids, counts))].tolist()              # most used last = most recent
        loads = len(set(ids) - set(self.order))
        self.order = ([e for e in self.order if e not in ids] + ids)[-self.slots:]
        return loads


@dataclass
class SeqState:
    pos: int
    admitted: int
    last: int          # step of its previous token (admission - 1 before the first)
    arrival: int


def simulate(seqs: list[np.ndarray], concurrency: int, capacity: int, scheduler, signal: str, slots: int,
             restamp: bool = True) -> dict:
    """Run the whole trace through one scheduler; loads per token and wait percentiles.

    restamp=False keeps each sequence's admission stamp as its arrival: FIFO then runs the oldest
    admitted to completion (a static batch of `capacity`), the most a schedule can stick to sequences.
    """
    pending, active = deque(range(len(seqs))), {}
    cache = [LayerLru(slots) for _ in range(seqs[0].shape[1])]
    stamp = itertools.count()
    step = loads = tokens = distinct = 0
    waits, totals = [], []
    while pending or active:
        while pending and len(active) < concurrency:
            active[pending.popleft()] = SeqState(0, step, step - 1, next(stamp))
        ready = [Candidate(sid, st.arrival, predicted(seqs[sid], st.pos, signal)) for sid, st in active.items()]
        resident = [frozenset(layer.order) for layer in cache]
        picked = scheduler.select(ready, capacity, resident)
        rows = np.stack([seqs[sid][active[sid].pos] for sid in picked])          # [b, L, K] true experts
        loads += sum(layer.step(rows[:, i]) for i, layer in enumerate(cache))
        distinct += sum(len(s) for s in path_of(rows))
        for sid in picked:
            st = active[sid]
            waits.append(step - st.last)
            st.last, st.pos = step, st.pos + 1
            st.arrival = next(stamp) if restamp else st.arrival
            if st.pos == len(seqs[sid]):
                totals.append(step - st.admitted + 1)
                del active[sid]
                scheduler.forget(sid)
        tokens += len(picked)
        step += 1
    w, t = np.array(waits), np.array(totals)
    return {"loads": loads, "tokens": tokens, "steps": step, "loads_per_token": loads / tokens,
            "distinct_per_layer_step": distinct / step / len(cache),
            "wait_p50": float(np.percentile(w, 50)), "wait_p99": float(np.percentile(w, 99)), "wait_max": int(w.max()),
            "total_p50": float(np.percentile(t, 50)), "total_p99": float(np.percentile(t, 99))}


def run_config(seqs, s: int, b: int, variants: list[tuple], slots: int, log) -> list[dict]:
    """Variants (label, signal, scheduler options[, restamp]); the first must be the FIFO baseline."""
    rows = []
    for label, signal, kw, *restamp in variants:
        t0 = time.perf_counter()
        sched = make_scheduler("fifo" if signal == "none" else "expert", **kw)
        r = simulate(seqs, s, b, sched, signal, slots, *restamp)
        rows.append({"S": s, "B": b, "scheduler": label, "signal": signal, **kw, **r,
                     "seconds": time.perf_counter() - t0})
        log(rows[-1])
    fifo = rows[0]["loads_per_token"]
    for r in rows:
        r["vs_fifo"] = r["loads_per_token"] / fifo
    return rows


def tune(seqs, configs, slots: int, log) -> list[dict]:
    """Dev sweep: max_wait (as multiples of the round-robin period S/B) x miss_weight for `prev`; `prev2` at one point."""
    rows = []
    for s, b in configs:
        period = -(-s // b)
        grid = [("prev", mult, mw) for mult in (1.5, 2, 4) for mw in (1.0, 2.0, 4.0, 8.0)] + [("prev2", 2, 4.0)]
        variants = [("fifo", "none", {})]
        for signal, mult, mw in grid:
            kw = {"max_wait": int(mult * period) - 1, "miss_weight": mw}
            variants.append((f"expert {signal} w={kw['max_wait']} mw={mw:g}", signal, kw))
        rows += run_config(seqs, s, b, variants, slots, log)
    return rows


def report_variants(s: int, b: int, mult: float, miss_weight: float) -> list[tuple]:
    """FIFO, then expert-aware with each signal at max_wait = mult x round-robin period - 1, and at 2 x mult."""
    period = -(-s // b)
    kw = {"max_wait": int(mult * period) - 1, "miss_weight": miss_weight}
    loose = {"max_wait": int(2 * mult * period) - 1, "miss_weight": miss_weight}
    return [("FIFO (round-robin)", "none", {}), ("expert-aware, prev token", "prev", kw),
            ("expert-aware, prev token", "prev", loose), ("expert-aware, last 2 tokens", "prev2", kw),
            ("expert-aware, ORACLE next token (bound)", "oracle", kw),
            ("FIFO by admission (run to completion; reference)", "none", {}, False)]


def markdown(rows: list[dict]) -> str:
    head = ("| S x B | scheduler | max_wait | loads/token | vs FIFO | distinct experts/layer/step "
            "| wait p50 / p99 / max | steps per seq p50 / p99 |\n|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r['S']} x {r['B']} | {r['scheduler']} | {r.get('max_wait', '-')} | {r['loads_per_token']:.3f} "
        f"| {r['vs_fifo']:.3f}x | {r['distinct_per_layer_step']:.2f} | {r['wait_p50']:g} / {r['wait_p99']:g} / "
        f"{r['wait_max']} | {r['total_p50']:g} / {r['total_p99']:g} |" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", default="test", choices=("dev", "test"))
    ap.add_argument("--seqs", type=int, default=0, help="use the first N sequences of the split (0: all)")
    ap.add_argument("--configs", default=",".join(f"{s}x{b}" for s, b in CONFIGS), help="SxB,... concurrency x step")
    ap.add_argument("--slots", type=int, default=8, help="cached experts per layer (8 of 32 = 25%%)")
    ap.add_argument("--wait-mult", type=float, default=2.0,
                    help="max_wait = wait_mult * ceil(S/B) - 1: worst wait as a multiple of round-robin's")
    ap.add_argument("--miss-weight", type=float, default=2.0, help="tuned on dev (1, 2, 4, 8 tried)")
    ap.add_argument("--tune", action="store_true", help="sweep max_wait x miss_weight x signal (use on dev)")
    ap.add_argument("--json", help="write every row here")
    add_record_flag(ap)
    args = ap.parse_args(argv)
    seqs = load_split(args.split, args.seqs or None)
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    print(f"{args.split}: {len(seqs)} sequences, {sum(len(q) for q in seqs)} tokens, {args.slots} slots/layer",
          flush=True)

    def log(r):
        print(f"  S={r['S']} B={r['B']} {r['scheduler']}: loads/token {r['loads_per_token']:.3f}, "
              f"wait p99 {r['wait_p99']:g}, {r['seconds']:.1f}s", flush=True)

    if args.tune:
        rows = tune(seqs, configs, args.slots, log)
    else:
        rows = [r for s, b in configs
                for r in run_config(seqs, s, b, report_variants(s, b, args.wait_mult, args.miss_weight), args.slots,
                                    log)]
    text = markdown(rows)
    print(text)
    compare = "loads per token / FIFO's: " + "; ".join(
        f"S x B {r['S']} x {r['B']} {r['scheduler']}" + (f" (max_wait {r['max_wait']})" if "max_wait" in r else "")
        + f" {r['vs_fifo']:.3f}x" for r in rows if r["signal"] != "none")
    print(compare)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if wants_record(args) and not args.tune:
        record(f"token rescheduling on GPT-OSS-20B routing traces ({args.split} split), FIFO vs expert-aware "
               f"(simulation)", text, compare,
               f"{len(seqs)} sequences of the {args.split} split, {args.slots} LRU slots per layer shared by all "
               f"sequences; miss_weight {args.miss_weight}, max_wait = {args.wait_mult:g} x ceil(S/B) - 1 (and twice "
               f"that in the second expert-aware row).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
