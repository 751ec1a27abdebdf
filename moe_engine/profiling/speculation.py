"""Speculative decoding in the offloading simulator: a trace's decode replayed as prompt-lookup verify steps.

    trace npz + its tokens (token_ids in the npz, or <stem>_sequences.jsonl.gz beside it: full_text_tokens)
        per sequence, at decode row j (the row that feeds the sequence's newest token):
            Drafter.propose (runtime/drafting.py, the engine's object) -> draft d of m tokens: propose_ngram over
                the prompt and every token so far, m = K (fixed) or the engine's adaptive length (<= K)
            kept = the longest prefix of d equal to the trace's next tokens   (greedy trace: acceptance is exact)
            verify step = rows j .. j+m fed at once: per layer the union of their experts, each expert's count
                = rows that route to it -> the simulator's CacheController.prepare / acquire, as one MoE pass
            the sequence advances kept + 1 rows; the next step starts at row j + kept + 1

This is simulate.Simulator with one method replaced (`_token`: a verify step instead of a row), so loads,
evictions, deferred misses and modelled time come from the same controller and link as `moe-engine simulate`.
What is modelled beyond the simulator's own assumptions:
  - routing of a rejected draft position (rows j+kept+1 .. j+m) is the trace row at that position: the model
    fed the wrong token there, whose routing was never recorded; the true token's routing stands in for it
  - a verify step streams each weight once: the hardware model is bandwidth-bound (weights/s, hardware.py), so an
    expert computed for several rows costs what it costs for one, and so do a layer's dense part and lm_head
    (FLOPs are not modelled: at <= 7 rows a GPU's GEMM stays memory-bound); the per-token overhead is paid once
    per step. A missed expert computed on the host (--host-compute) takes its rows' time.
  - drafting costs no modelled time (prompt lookup is a list search) and loads nothing
  - the adaptive length uses the engine's rule with the step times it would measure: here the modelled ones
  - a sequence's last decode row ends it: drafts never run past the trace's rows
Prompt rows (an engine trace's first prompt_len rows) are replayed one by one as in simulate.py; the GPT-OSS traces
have none (their rows are decode steps only). Only --predictor none: a forecast of a step's rows is not modelled.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..runtime.drafting import Drafter
from ..runtime.speculative import SpeculativeConfig
from .hardware import Hardware
from .shapes import ModelShape
from .sim_report import _print as print_wide
from .simulate import SimResult, Simulator
from .synthetic import BUNDLED_TRACE
from .trace import Trace, TraceError, read_npz, validate

TEXT_SUFFIX = "_sequences.jsonl.gz"
UNKNOWN_BYTES = "\ufffd"      # a token string holding this may stand for several byte tokens: it never matches


@dataclass(frozen=True)
class SequenceText:
    ids: list[int]       # the prompt, then the tokens the decode rows feed (and the last one generated, when known)
    first_row: int       # the sequence's first decode row; rows before it are prompt rows
    pos: int             # index in ids of the token the first decode row feeds
    rows: int            # trace rows of the sequence


# ---- --speculative ngram:K ----------------------------------------------------------------------------
def parse_speculative(text: str) -> SpeculativeConfig | None:
    """'ngram:K' (drafts of up to K tokens, prompt lookup of 4- down to 1-grams) or 'ngram:K:adaptive' (the
    engine's draft length per step, at most K); K = 0: no speculation (None)."""
    method, _, rest = text.partition(":")
    k, _, mode = rest.partition(":")
    if method != "ngram":
        raise ConfigError(f"--speculative {text!r}: a trace can only replay prompt lookup; use ngram:K or "
                          f"ngram:K:adaptive (resident and draft_model need the model itself)")
    if not k.isdigit() or mode not in ("", "adaptive"):
        raise ConfigError(f"--speculative {text!r}: expected ngram:K with K >= 0 draft tokens, e.g. ngram:4, or "
                          f"ngram:4:adaptive for the engine's draft length per step")
    if int(k) == 0:
        return None
    return SpeculativeConfig("ngram", num_speculative_tokens=int(k), adaptive=mode == "adaptive")


def describe(config: SpeculativeConfig | None) -> str:
    if config is None:
        return "none"
    c = config
    return f"ngram:{c.num_speculative_tokens}{':adaptive' if c.adaptive else ''}"


# ---- the trace's tokens ---------------------------------------------------------------------------------
def text_path(trace_path: str | Path) -> Path:
    path = Path(trace_path)
    return path.with_name(path.name.removesuffix(".npz") + TEXT_SUFFIX)


def load_text(trace_path: str | Path, sequences: int | None = None) -> list[SequenceText]:
    """The tokens of the first `sequences` sequences of a trace: from <stem>_sequences.jsonl.gz beside it (token
    strings; rows are decode steps only) or else the npz's token_ids and prompt_len (`moe-engine trace`)."""
    path = Path(trace_path)
    try:
        arrays = read_npz(path)
        validate(arrays, str(path))
    except TraceError as e:
        raise ConfigError(f"--trace {e}") from None
    off = np.asarray(arrays["seq_offsets"], dtype=np.int64)
    rows = np.diff(off)[:sequences]
    if text_path(path).is_file():
        return _from_jsonl(text_path(path), rows)
    if "token_ids" in arrays and "prompt_len" in arrays:
        return _from_token_ids(path, arrays["token_ids"], np.asarray(arrays["prompt_len"]), off, len(rows))
    raise ConfigError(f"--speculative needs the tokens of {path}: token_ids and prompt_len in the npz (traces "
                      f"`moe-engine trace` records carry them) or {text_path(path).name} beside it "
                      f"(one JSON line per sequence with full_text_tokens and prompt_len)")


def _from_jsonl(path: Path, rows: np.ndarray) -> list[SequenceText]:
    vocab: dict[str, int] = {}
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in zip(range(len(rows)), f):
            try:
                rec = json.loads(line)
                tokens, plen = rec["full_text_tokens"], int(rec["prompt_len"])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}: line {i + 1} is not a JSON object with full_text_tokens and "
                                  f"prompt_len ({type(e).__name__}: {e})") from None
            if len(tokens) != plen + int(rows[i]) + 1:
                raise ConfigError(f"{path}: sequence {i} has {len(tokens)} token strings, but prompt_len {plen} + "
                                  f"its {int(rows[i])} trace rows + 1 = {plen + int(rows[i]) + 1}: its rows cannot be "
                                  f"matched to its tokens; simulate the sequences before it (--sequences {i})")
            ids = [-1 - n if UNKNOWN_BYTES in t else vocab.setdefault(t, len(vocab))      # -1 - n: unique
                   for n, t in enumerate(tokens)]
            out.append(SequenceText(ids, 0, plen, int(rows[i])))
    if len(out) < len(rows):
        raise ConfigError(f"{path} has {len(out)} lines but the trace has {len(rows)} sequences; one line per "
                          f"sequence, in the trace's order")
    return out


def _from_token_ids(path: Path, token_ids: np.ndarray, prompt_len: np.ndarray, off: np.ndarray,
                    count: int) -> list[SequenceText]:
    out = []
    for s in range(count):
        ids = [int(t) for t in token_ids[off[s]:off[s + 1]]]
        plen = int(prompt_len[s]) if s < len(prompt_len) else -1
        if not 0 < plen <= len(ids):
            raise ConfigError(f"{path}: sequence {s} has prompt_len {plen} but {len(ids)} rows; record the trace "
                              f"again with `moe-engine trace`")
        out.append(SequenceText(ids, plen, plen, len(ids)))
    return out


def check_rows(text: list[SequenceText], trace: Trace, source: str) -> None:
    rows = np.diff(trace.seq_offsets)
    if len(text) != trace.num_sequences or any(t.rows != r for t, r in zip(text, rows)):
        raise ConfigError(f"--speculative: {source} do not match the trace's rows ({len(text)} sequences of tokens, "
                          f"{trace.num_sequences} in the trace, or rows per sequence differ)")


# ---- the replay ------------------------------------------------------------------------------------------
@dataclass
class _TraceSeq:                      # what Drafter reads of a sequence
    seq_id: int
    tokens: list[int]
    room_left: int


class _TraceCore:                     # what Drafter asks of the generation core
    @staticmethod
    def can_speculate(seq: _TraceSeq) -> bool:
        return True

    @staticmethod
    def room(seq: _TraceSeq) -> int:
        return seq.room_left


class SpeculativeSimulator(Simulator):
    """The simulator with each decode step a verify step (config None: one row per step, the plain decode)."""

    def __init__(self, trace: Trace, text: list[SequenceText], shape: ModelShape, hw: Hardware, quotas: list[int],
                 config: SpeculativeConfig | None, policy: str = "default", reset: bool = True,
                 events: list | None = None):
        super().__init__(trace, shape, hw, quotas, policy, None, reset, events=events)
        check_rows(text, trace, "the tokens given")
        self.text, self.config = text, config

    def run(self) -> SimResult:
        self.drafter = None if self.config is None else Drafter(_TraceCore(), None, self.config)
        self.steps, self._resume, self._plain = 0, 0, None
        res = super().run()
        d = self.drafter
        drafted, kept = (d.drafted, d.kept) if d else (0, 0)
        res.extra.update({"speculative": describe(self.config), "decode_steps": self.steps, "drafted": drafted,
                          "accepted": kept, "acceptance": kept / drafted if drafted else None,
                          "tokens_per_step": res.decode_tokens / max(1, self.steps),
                          "loads_per_generated_token": res.extra["decode_loads"] / max(1, res.decode_tokens)})
        return res

    def _prompt_mask(self) -> np.ndarray:
        mask = np.zeros(self.trace.num_steps, dtype=bool)
        for a, t in zip(self.trace.seq_offsets[:-1], self.text):
            mask[int(a):int(a) + t.first_row] = True
        return mask

    def _token(self, row: int, seq: int) -> None:
        t = self.text[seq]
        j = row - int(self.trace.seq_offsets[seq]) - t.first_row          # decode row of the sequence
        if j < 0:
            super()._token(row, seq)
            return
        if row < self._resume:                                              # emitted by an earlier verify step
            return
        self.steps += 1
        if self.drafter is None:
            super()._token(row, seq)
            return
        context = _TraceSeq(seq, t.ids[:t.pos + j + 1], t.rows - t.first_row - 1 - j)
        draft = self.drafter.propose([context])[0]
        truth = t.ids[t.pos + j + 1:t.pos + j + 1 + len(draft)]
        kept = next((i for i, (a, b) in enumerate(zip(draft, truth)) if a != b), len(draft))
        t0 = self.now
        self._verify(range(row, row + len(draft) + 1))
        self._feedback(context, len(draft), kept, self.now - t0)
        self._resume = row + kept + 1

    def _verify(self, rows: range) -> None:
        """One forward over `rows` (a verify step): each layer's distinct experts computed once, as the MoE block
        dispatches them (sorted ids, tokens per expert)."""
        for layer in range(self.trace.num_layers):
            self._advance(self.dense_s)
            tokens = Counter(self.trace.experts[rows.start:rows.stop, layer].ravel().tolist())
            need = sorted(tokens)
            self.transport.sync()
            for e, on_host in self.ctl.prepare(layer, need, [tokens[e] for e in need], {}):
                self.ctl.acquire(layer, e)
                self._advance(self.hw.host_expert_s(self.shape.expert_bytes, tokens[e]) if on_host
                              else self.expert_s)
        self._advance(self.head_s)

    def _feedback(self, seq: _TraceSeq, drafted: int, kept: int, seconds: float) -> None:
        """What the engine's speculative lockstep tells its Drafter after a step (runtime/drafting.py)."""
        if drafted == 0:
            self._plain = seconds if self._plain is None else 0.8 * self._plain + 0.2 * seconds
        else:
            self.drafter.timed(drafted + 1, 1, seconds, self._plain)
        self.drafter.steps += 1
        self.drafter.update(seq, drafted, kept)


# ---- sweeps and the CLI ----------------------------------------------------------------------------------
SUMMARY = ("loads", "decode_loads", "hit_rate", "stall_seconds", "tokens_per_s", "decode_tokens", "decode_seconds",
           "decode_steps", "drafted", "accepted", "acceptance", "tokens_per_step", "loads_per_generated_token")


def simulate_speculative(trace: Trace, text: list[SequenceText], shape: ModelShape, hw: Hardware, cache_sizes: list,
                         config: SpeculativeConfig | None, policy: str = "default", reset: bool = True,
                         baseline: bool = True) -> dict:
    """Per cache size (experts per layer, or a list per MoE layer) the decode with `config`'s speculation and,
    when `baseline`, without it, from the same simulator: loads per generated token, acceptance, tokens per
    step, modelled tokens/s, and the ratios."""
    trace = Trace(trace.experts, trace.probs, trace.seq_offsets, trace.token_ids, trace.extra,
                  max(int(trace.num_experts), shape.num_experts))
    results = []
    for size in cache_sizes:
        quotas = [int(size)] * trace.num_layers if np.isscalar(size) else [int(q) for q in size]
        runs = {"speculative": config, **({"plain": None} if baseline else {})}
        out = {name: _summary(SpeculativeSimulator(trace, text, shape, hw, quotas, c, policy, reset).run())
               for name, c in runs.items()}
        row = {"cache_experts": quotas[0] if min(quotas) == max(quotas) else round(sum(quotas) / len(quotas), 2),
               "quotas": quotas, **out}
        if baseline:
            spec, plain = out["speculative"], out["plain"]
            row["loads_ratio"] = plain["loads_per_generated_token"] / max(spec["loads_per_generated_token"], 1e-12)
            row["speedup"] = spec["tokens_per_s"] / plain["tokens_per_s"] if plain["tokens_per_s"] else None
        results.append(row)
    return {"speculative": describe(config), "hardware": hw.name, "model": shape.name, "policy": policy,
            "reset_per_sequence": reset, "sequences": trace.num_sequences,
            "decode_rows": int(sum(t.rows - t.first_row for t in text)), "results": results}


def _summary(res: SimResult) -> dict:
    d = res.to_dict()
    return {k: d[k] for k in SUMMARY}


def speculative_inputs(spec: str, trace_path: str | None, bundled: bool, predictor: str | None,
                       trace: Trace) -> tuple[SpeculativeConfig | None, list[SequenceText]]:
    """`moe-engine simulate --speculative`: the config and the trace's tokens, checked before anything runs."""
    config = parse_speculative(spec)
    if predictor not in (None, "none"):
        raise ConfigError(f"--speculative replays demand loading only; drop --predictor {predictor} (a forecast of "
                          f"a verify step's rows is not modelled)")
    if trace_path is None and not bundled:
        raise ConfigError("--speculative needs a trace that carries its tokens: give --trace FILE.npz (recorded "
                          "with `moe-engine trace`, or with a _sequences.jsonl.gz of token strings beside it)")
    text = load_text(trace_path or BUNDLED_TRACE, trace.num_sequences)
    check_rows(text, trace, f"the tokens of {trace_path or BUNDLED_TRACE}")
    return config, text


def render_speculative(report: dict, console=None) -> None:
    """Print the with / without speculation table with rich (default: to stdout)."""
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    t = Table(title=f"speculative decoding ({report['speculative']}) vs plain decode: {report['model']} on "
                    f"{report['hardware']}, {report['decode_rows']} decode tokens", title_justify="left")
    for c in ("C/layer", "acceptance", "tokens/step", "decode loads/token plain", "with speculation", "fewer loads",
              "decode tok/s plain", "with speculation"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in report["results"]:
        s, p = r["speculative"], r.get("plain")
        acc = "-" if s["acceptance"] is None else f"{s['acceptance']:.3f}"
        t.add_row(str(r["cache_experts"]), acc, f"{s['tokens_per_step']:.2f}",
                  "-" if p is None else f"{p['loads_per_generated_token']:.2f}", f"{s['loads_per_generated_token']:.2f}",
                  f"{r['loads_ratio']:.2f}x" if p else "-", "-" if p is None else f"{p['tokens_per_s']:.2f}",
                  f"{s['tokens_per_s']:.2f}")
    print_wide(console, t)
