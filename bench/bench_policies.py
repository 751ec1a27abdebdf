"""Expert loads of the cache policies against Belady's minimum, replayed through the engine's own code.

Every replay goes through moe_engine's SlotTable and policy objects (profiling/replay.py), demand
loading, K experts per step at once. Belady is computed at the same per-layer quotas; rows with
quotas tuned from curves also give Belady at uniform quotas, so the two comparisons stay apart.

Data and splits (never tuned on a reporting split):
  GPT-OSS-20B traces (/work/shared/data/routing): dev sequences 100-606 fit everything that is
  fitted (the default policy's shipped coefficients, the replay's ContextScorer, quota curves);
  results on dev sequences 0-99 (the README's convention) and on the whole test split.
  Bundled tiny-moe: routing of held-out stdlib text recorded through the engine in windows of
  --window tokens (one window = one sequence); first half of the windows to fit the scorer and
  quota curves, second half reported. The default policy keeps its GPT-OSS coefficients there.
Caches: per-sequence reset (README) and one continuous run over the reported sequences.

    PYTHONPATH=. python bench/bench_policies.py                  # ~20 min on 2 cores; appends to RESULTS.md
    PYTHONPATH=. python bench/bench_policies.py --fit            # refit the shipped coefficients (dev only)
    PYTHONPATH=. python bench/bench_policies.py --smoke          # seconds: a few sequences, prints only

Both GPT-OSS splits are reported by default (--splits dev test). The run is appended to
bench/RESULTS.md through bench/results.py unless --no-record is given (formerly --no-write, still
accepted).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from moe_engine.experts.policies import make_policy, quotas_from_curves
from moe_engine.experts.policy_default import COEF_SCORES, DefaultPolicy, fit_hazard
from moe_engine.profiling.belady import belady
from moe_engine.profiling.replay import ContextScorer, replay
from moe_engine.profiling.trace import Trace, load_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import add_record_flag, record, wants_record  # noqa: E402

ROUTING = Path("/work/shared/data/routing")
POLICIES = ("lru", "lfu", "default", "default+scores")


def policy_row(trace: Trace, quotas: list[int], reset: bool, scorer, uniform_belady) -> dict:
    """Hit rates and loads of every policy and Belady at `quotas` [L] on `trace`."""
    bel = belady(trace.experts, quotas, trace.seq_offsets, reset)
    row = {"belady_loads": bel.total_loads, "belady_hit_rate": bel.hit_rate, "accesses": int(bel.accesses.sum()),
           "uniform_belady_loads": uniform_belady.total_loads if uniform_belady else bel.total_loads}
    for name in POLICIES:
        policy = make_policy(name.split("+")[0])
        t0 = time.perf_counter()
        r = replay(trace, policy, quotas, reset, scorer if name.endswith("+scores") else None, with_belady=False)
        row[name] = {"loads": r.total_loads, "hit_rate": r.hit_rate, "seconds": time.perf_counter() - t0}
    return row


def miss_curves(tune: Trace) -> np.ndarray:
    """[L, E+1] Belady misses of the tuning split at every capacity (inf below top_k), caches reset per sequence."""
    curves = np.full((tune.num_layers, tune.num_experts + 1), np.inf)
    for cap in range(tune.top_k, tune.num_experts + 1):
        curves[:, cap] = belady(tune.experts, cap, tune.seq_offsets, reset=True).loads
    return curves


def evaluate(name: str, report: Trace, tune: Trace, caps: list[int], scorer, log) -> list[dict]:
    """Rows for one data set: per capacity, reset and continuous at uniform quotas, reset at curve quotas."""
    rows, curves = [], miss_curves(tune)
    for cap in caps:
        uniform = [cap] * report.num_layers
        for reset in (True, False):
            rows.append({"data": name, "cap": f"{cap}/{report.num_experts}", "reset": reset, "quotas": "uniform",
                         **policy_row(report, uniform, reset, scorer, None)})
            log(rows[-1])
        tuned = quotas_from_curves(cap * report.num_layers, curves, report.top_k, report.num_experts)
        uni_bel = belady(report.experts, uniform, report.seq_offsets, True)
        rows.append({"data": name, "cap": f"{cap}/{report.num_experts}", "reset": True, "quotas": str(tuned),
                     **policy_row(report, tuned, True, scorer, uni_bel)})
        log(rows[-1])
    return rows


def gptoss_rows(caps: list[int], log, splits=("dev", "test"), max_seqs: int | None = None) -> list[dict]:
    """Rows on the reported GPT-OSS splits (dev sequences 0-99, the whole test split), each capped at max_seqs."""
    dev = load_trace(ROUTING / "gptoss20b_dev.npz")
    cap = (lambda n: n) if max_seqs is None else (lambda n: min(n, max_seqs))
    tune = dev.sequences(100, 100 + cap(dev.num_sequences - 100))
    t0 = time.perf_counter()
    scorer = ContextScorer.fit(tune)
    print(f"ContextScorer fitted on dev sequences 100-{99 + tune.num_sequences} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    rows, oracle = [], []
    if "dev" in splits:
        report = dev.sequences(0, cap(100))
        rows += evaluate(f"GPT-OSS-20B dev seqs 0-{report.num_sequences - 1}", report, tune, caps, scorer, log)
        oracle = oracle_rows(report, caps, log)
    if "test" in splits:
        test = load_trace(ROUTING / "gptoss20b_test.npz")
        test = test.sequences(0, cap(test.num_sequences))
        rows += evaluate(f"GPT-OSS-20B test (all {test.num_sequences})" if max_seqs is None
                         else f"GPT-OSS-20B test seqs 0-{test.num_sequences - 1}", test, tune, caps, scorer, log)
    return rows, oracle


class NextTokensOracle:
    """Scorer that peeks at the trace: 1 for experts of the layer used in the next `horizon` tokens of the sequence.

    Not realizable; it bounds what any predictor of the next tokens could give the default policy.
    """

    def __init__(self, trace: Trace, horizon: int):
        self.trace, self.horizon, self.row = trace, horizon, 0
        self.seq_end = np.repeat(trace.seq_offsets[1:], np.diff(trace.seq_offsets))     # [T]

    def reset(self) -> None:
        """Sequences are replayed in order: the row counter runs on."""

    def observe(self, layer, experts) -> None:
        """The oracle needs no observations."""

    def scores(self, layer: int) -> np.ndarray:
        out = np.zeros(self.trace.num_experts)
        rows = self.trace.experts[self.row + 1:min(self.row + 1 + self.horizon, self.seq_end[self.row]), layer]
        out[rows.ravel()] = 1.0
        return out

    def end_token(self) -> None:
        self.row += 1


def oracle_rows(report: Trace, caps: list[int], log) -> list[dict]:
    """The default policy with perfect knowledge of the next 1 and 2 tokens (reset per sequence, uniform quotas)."""
    coef = COEF_SCORES.copy()
    coef[-3] = 100.0                                                          # the oracle overrides history
    rows = []
    for cap in caps:
        bel = belady(report.experts, cap, report.seq_offsets, True)
        for horizon in (1, 2):
            r = replay(report, DefaultPolicy(coef_scores=coef), cap, True, NextTokensOracle(report, horizon),
                       with_belady=False)
            rows.append({"cap": f"{cap}/{report.num_experts}", "horizon": horizon, "hit_rate": r.hit_rate,
                         "ratio": r.total_loads / bel.total_loads})
            print(f"oracle next {horizon} tokens {rows[-1]}", flush=True)
    return rows


class Recorder:
    """A routing observer keeping the experts [T, K] and weights of every MoE layer call."""

    def __init__(self):
        self.calls: list[tuple[int, np.ndarray, np.ndarray]] = []

    def begin_step(self, token_ids, seq_ids):
        pass

    def observe(self, layer, router_input, experts, weights):
        self.calls.append((layer, experts.cpu().numpy(), weights.float().cpu().numpy()))


def record_bundled(window: int, windows: int) -> Trace:
    """Routing of held-out text through the bundled model: one sequence per window of `window` tokens."""
    import torch

    import moe_engine
    sys.path.insert(0, str(Path(__file__).parent))
    from train_tiny_moe import corpus_files, encode_files

    torch.set_num_threads(1)                      # the model is tiny: one thread is fastest on a shared 2-core VM
    eng = moe_engine.load(None, dtype="float32", progress=False)
    held = encode_files(eng.tokenizer, corpus_files()[1])
    rec = eng.observers.add(Recorder())
    n = min(windows, len(held) // window)
    experts, probs = [], []
    with torch.no_grad():
        for i in range(n):
            rec.calls.clear()
            eng.logits(held[i * window:(i + 1) * window][None])          # routing per token is batch-independent
            calls = sorted(rec.calls, key=lambda c: c[0])
            experts.append(np.stack([c[1] for c in calls], axis=1))      # [T, L, K]
            probs.append(np.stack([c[2] for c in calls], axis=1))
    eng.observers.remove(rec)
    num_experts = eng.spec.moe.num_experts
    eng.close()
    offsets = np.arange(n + 1, dtype=np.int64) * window
    return Trace(np.concatenate(experts).astype(np.int16), np.concatenate(probs), offsets, num_experts=num_experts)


def bundled_rows(caps: list[int], window: int, windows: int, log) -> list[dict]:
    t0 = time.perf_counter()
    trace = record_bundled(window, windows)
    half = trace.num_sequences // 2
    tune, report = trace.sequences(0, half), trace.sequences(half)
    print(f"bundled model: recorded {trace.num_steps} tokens x {trace.num_layers} layers in "
          f"{time.perf_counter() - t0:.0f} s; tuning {tune.num_steps}, reporting {report.num_steps}", flush=True)
    scorer = ContextScorer.fit(tune)
    return evaluate(f"tiny-moe held-out, 2nd half ({report.num_sequences} x {window} tok)", report, tune, caps,
                    scorer, log)


def cell(row: dict, name: str) -> str:
    r = row[name]
    return f"{r['hit_rate']:.3f} / {r['loads'] / row['belady_loads']:.2f}x"


def table(rows: list[dict]) -> str:
    head = ("| data | slots | cache | quotas | LRU | LFU | default | default + scores | Belady | "
            "default + scores vs Belady at uniform quotas |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        uni = r["default+scores"]["loads"] / r["uniform_belady_loads"]
        uni_cell = f"{uni:.2f}x" if r["quotas"] != "uniform" else "(same)"
        lines.append(f"| {r['data']} | {r['cap']} | {'reset per seq' if r['reset'] else 'continuous'} | "
                     f"{r['quotas']} | " + " | ".join(cell(r, p) for p in POLICIES)
                     + f" | {r['belady_hit_rate']:.3f} | {uni_cell} |")
    return "\n".join(lines)


def oracle_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "", ("Bound on what prediction can give (GPT-OSS reported dev sequences, reset per sequence, "
                      "uniform quotas): the default policy fed by an oracle that knows the experts of the next tokens."),
             "",
             "| slots | oracle knows | hit rate | loads / Belady |", "|---|---|---|---|"]
    lines += [f"| {r['cap']} | next {r['horizon']} token{'s' if r['horizon'] > 1 else ''} | {r['hit_rate']:.3f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


def log_row(row: dict) -> None:
    parts = ", ".join(f"{p} {row[p]['hit_rate']:.4f} ({row[p]['loads'] / row['belady_loads']:.3f}x, "
                      f"{row[p]['seconds']:.0f}s)" for p in POLICIES)
    print(f"{row['data']} {row['cap']} reset={row['reset']} quotas={row['quotas']}: {parts}, "
          f"belady {row['belady_hit_rate']:.4f}", flush=True)


def fit_coefficients() -> None:
    """Print the default policy's coefficients, fitted on dev only (see policy_default.py)."""
    dev = load_trace(ROUTING / "gptoss20b_dev.npz")
    tune = dev.sequences(100)
    no_scores = fit_hazard(tune.experts, tune.seq_offsets, dev.num_experts, sample=0.03)
    scorer = ContextScorer.fit(dev.sequences(300))                        # scores held out from the hazard fit
    part = dev.sequences(100, 300)
    with_scores = fit_hazard(part.experts, part.seq_offsets, dev.num_experts, scores_fn=scorer.predict, sample=0.05)
    print(f"COEF_NO_SCORES = np.array({np.round(no_scores, 4).tolist()})")
    print(f"COEF_SCORES = np.array({np.round(with_scores, 4).tolist()})")


NOTES = """Replays run the engine's own SlotTable + policy objects, demand loading, a step's K experts kept
together. Cells: hit rate / loads as a multiple of Belady's loads at the same quotas (policy / Belady).
"default + scores": the default policy fed by profiling.replay.ContextScorer (ridge regressions from
routing history, fitted on the tuning split) as a stand-in predictor. Tuning splits: GPT-OSS dev
sequences 100-606 (policy coefficients, scorer, quota curves); tiny-moe first half of the recorded
windows. Quota rows list per-layer slots chosen by `quotas_from_curves` on Belady miss curves of the
tuning split (same total as uniform); their last column compares with Belady at uniform quotas."""


def comparison(rows: list[dict]) -> str:
    """Loads / Belady's loads per policy, at uniform quotas with per-sequence reset, for each data set and size."""
    parts = []
    for r in rows:
        if r["reset"] and r["quotas"] == "uniform":
            ratios = ", ".join(f"{p} {r[p]['loads'] / r['belady_loads']:.2f}x" for p in POLICIES)
            parts.append(f"{r['data']} at {r['cap']}: {ratios}")
    return "loads / Belady's loads (reset per sequence, uniform quotas): " + "; ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit", action="store_true", help="refit and print the default policy's coefficients")
    p.add_argument("--caps", type=int, nargs="+", default=[8, 16], help="GPT-OSS slots per layer (of 32)")
    p.add_argument("--bundled-caps", type=int, nargs="+", default=[4, 8], help="tiny-moe slots per layer (of 16)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--windows", type=int, default=400)
    p.add_argument("--splits", nargs="+", default=["dev", "test"], choices=["dev", "test"],
                   help="GPT-OSS splits to report: dev sequences 0-99 and/or the whole test split")
    p.add_argument("--max-seqs", type=int, default=None,
                   help="cap every GPT-OSS split (tuning and reported) at N sequences (quick checks)")
    p.add_argument("--skip-gptoss", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long check of the whole pipeline (3 sequences, one size each); never records")
    add_record_flag(p)
    p.add_argument("--no-write", dest="no_record", action="store_true", help=argparse.SUPPRESS)   # old name
    args = p.parse_args(argv)
    if args.fit:
        fit_coefficients()
        return 0
    if args.smoke:
        args.caps, args.bundled_caps, args.window, args.windows = args.caps[:1], args.bundled_caps[:1], 64, 6
        args.max_seqs = args.max_seqs or 3
    t0 = time.perf_counter()
    rows, oracle = ([], []) if args.skip_gptoss else gptoss_rows(args.caps, log_row, args.splits, args.max_seqs)
    rows += bundled_rows(args.bundled_caps, args.window, args.windows, log_row)
    text = table(rows) + oracle_table(oracle)
    print(text)
    print(comparison(rows))
    if wants_record(args):
        record("expert-cache policies vs Belady on routing traces (issue 8: LRU, LFU, default, Belady)", text,
               comparison(rows), NOTES + f"\n\nWall time {(time.perf_counter() - t0) / 60:.0f} min.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
