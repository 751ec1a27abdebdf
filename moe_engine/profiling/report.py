"""The readable side of `moe-engine profile`: rich tables over the profile dict of profile.py.

Tables: the run and its settings; a summary (hit rate next to Belady's bound, loads, prefetch, bytes per
tier, stalls, latency percentiles, throughput, where a decode step's time goes); per MoE layer (hits,
misses, Belady, prefetch precision / recall, predictor recall per lookahead); prefetches per lookahead;
hit rate vs cache size; local routing consistency per layer with the suggested cache size and a verdict
on whether the model suits offloading; with --speculative-config, the runs without and with drafts side by side. Prints only what the dict holds; computes ratios, nothing else.
"""
from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from .lrc import format_lrc

WIDTH = 120              # columns when printing to a file or a pipe


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    """A rate as a percentage number (the column header says %)."""
    return "-" if x is None else f"{100 * x:.1f}"


def _ms(x) -> str:
    return f"{1000 * x:.2f} ms"


def _mib(n) -> str:
    return f"{n / 2**20:.1f} MiB"


def _table(title: str, *columns: str, left: int = 1) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < left else "right")
    return t


def settings_table(p: dict) -> Table:
    t = _table("run", "setting", "value")
    for key, value in p["profile"]["settings"].items():
        t.add_row(key, "-" if value is None else str(value))
    req = p["profile"]["requests"]
    t.add_row("tokens", f"{sum(req['prompt_tokens'])} prompt, {sum(req['new_tokens'])} generated")
    t.add_row("wall time", f"{p['profile']['wall_seconds']:.2f} s")
    return t


def summary_table(p: dict) -> Table:
    c, pre, io, opt, lat = p["cache"], p["prefetch"], p["io"], p["optimal"], p["latency"]
    tpt = p["profile"]["time_per_token"]
    t = _table("summary", "metric", "value", "note", left=1)
    t.columns[2].justify = "left"
    t.add_row("expert lookups", f"{c['lookups']}", f"{c['hits']} hits + {c['misses']} misses")
    t.add_row("hit rate", _pct(c["hit_rate"]), f"Belady {_pct(opt['belady_hit_rate'])} (demand-only bound; "
              "prefetch hits may beat it)")
    t.add_row("loads", f"{io['loads']}", f"Belady's minimum {opt['belady_loads']}; {c['evictions']} evictions")
    t.add_row("cache", f"{c['capacity_experts']} slots", f"{c['resident_experts']} resident at the end")
    t.add_row("prefetch precision", _pct(pre["precision"]), f"{pre['used']} used / {pre['issued']} issued, "
              f"{pre['wasted']} wasted")
    t.add_row("prefetch recall", _pct(pre["recall"]), "used / (used + demand misses)")
    t.add_row("bytes loaded", _mib(io["bytes_loaded"]), "into the compute tier")
    t.add_row("bytes read from disk", _mib(io["bytes_disk_read"]), "direct IO, including alignment")
    t.add_row("bytes host -> device", _mib(io["bytes_host_to_device"]), "")
    t.add_row("stall", f"{io['stall_seconds']:.3f} s", f"{io.get('stall_decode_seconds', 0.0):.3f} s in decode")
    for name, key in (("TTFT", "ttft"), ("time per output token", "tpot")):
        t.add_row(name, _ms(lat[f"{key}_s"]), "p50 {} / p90 {} / p99 {}".format(
            *(_ms(lat[f"{key}_p{q}_s"]) for q in (50, 90, 99))))
    t.add_row("prefill", f"{lat['prefill_tokens_per_s']:.1f} tok/s", "")
    t.add_row("decode", f"{lat['decode_tokens_per_s']:.1f} tok/s", "one sequence at a time")
    t.add_row("decode step", _ms(tpt["total_s"]), f"compute {_ms(tpt['compute_s'])} + stall {_ms(tpt['stall_s'])}; "
              f"loader busy {_ms(tpt['io_s'])} beside compute")
    return t


def layer_table(p: dict) -> Table:
    lay = p["profile"]["layers"]
    pred = p.get("prediction") or {}
    k = p["profile"]["lrc"]["top_k"]
    recall_keys = [key for key in (pred.get("per_layer_recall") or {}) if key.startswith(f"k{k}_")
                   and any(v is not None for v in pred["per_layer_recall"][key])]
    t = _table("per MoE layer (rates in %; pf: prefetches)", "layer", "lookups", "hits", "misses", "hit",
               "Belady", "pf", "pf used", "pf prec", "pf recall", *[f"pred@{k} d{key.split('_d')[1]}" for key in recall_keys])
    for i, m in enumerate(lay["moe_layers"]):
        rec = [_num(pred["per_layer_recall"][key][i]) for key in recall_keys]
        t.add_row(str(m), str(lay["lookups"][i]), str(lay["hits"][i]), str(lay["misses"][i]), _num(lay["hit_rate"][i]),
                  _num(lay["belady_hit_rate"][i]), str(lay["prefetch_issued"][i]), str(lay["prefetch_used"][i]),
                  _num(lay["prefetch_precision"][i]), _num(lay["prefetch_recall"][i]), *rec)
    c, pre = p["cache"], p["prefetch"]
    t.add_row("all", str(c["lookups"]), str(c["hits"]), str(c["misses"]), _num(c["hit_rate"]),
              _num(p["optimal"]["belady_hit_rate"]), str(pre["issued"]), str(pre["used"]), _num(pre["precision"]),
              _num(pre["recall"]), *[_num(pred["recall"].get(key)) for key in recall_keys], style="bold")
    return t


def lookahead_table(p: dict) -> Table | None:
    by = p["prefetch"].get("by_lookahead") or {}
    if not by:
        return None
    t = _table("prefetches per lookahead", "lookahead", "issued", "used", "precision")
    for d, row in sorted(by.items(), key=lambda kv: int(kv[0])):
        t.add_row(d, str(row["issued"]), str(row["used"]), _pct(row["precision"]))
    return t


def sweep_table(p: dict) -> Table:
    sw = p["profile"]["cache_sweep"]
    t = _table("hit rate vs experts per layer (replay of the recorded routing)",
               "experts / layer", f"{sw['policy']} policy", "Belady", f"{sw['policy']} loads", "Belady loads")
    for i, c in enumerate(sw["cache_experts_per_layer"]):
        t.add_row(str(c), _pct(sw["policy_hit_rate"][i]), _pct(sw["belady_hit_rate"][i]),
                  str(sw["policy_loads"][i]), str(sw["belady_loads"][i]))
    live = sw["live"]
    t.add_row(f"this run's slots ({live['mean_cache_experts_per_layer']:.1f})", _pct(live["replay_policy_hit_rate"]),
              _pct(live["replay_belady_hit_rate"]), "", "", style="bold")
    t.caption = (f"measured in this run: {_pct(live['hit_rate'])} (with prefetching, and one lookup per expert "
                 f"per prefill step rather than per token)")
    t.caption_justify = "left"
    return t


def lrc_tables(p: dict) -> list[Table]:
    lrc = p["profile"]["lrc"]
    rows = format_lrc(lrc)
    avg = _table("local routing consistency (moe-lrc), layer averages", *rows[0])
    for r in rows[1:]:
        avg.add_row(*r)
    ms = [m for m, e in lrc["segments"].items() if e["srp_per_layer"] is not None]
    m_ref = str(lrc["suggestion"]["m_ref"]) if lrc["suggestion"]["m_ref"] is not None else None
    sizes = lrc["cache_sizes"]
    per = _table("moe-lrc per MoE layer", "layer", *[f"SRP({m})" for m in ms],
                 *([f"SCH({m_ref}, c={c})" for c in sizes] if m_ref else []))
    for i, m in enumerate(p["profile"]["layers"]["moe_layers"]):
        srp = [f"{lrc['segments'][s]['srp_per_layer'][i]:.3f}" for s in ms]
        sch = [f"{lrc['segments'][m_ref]['sch_per_layer'][str(c)][i]:.3f}" for c in sizes] if m_ref else []
        per.add_row(str(m), *srp, *sch)
    return [avg, per]


def lrc_gaps(p: dict) -> str | None:
    """A note naming the segment lengths no sequence reached, and how to cover them."""
    lrc = p["profile"]["lrc"]
    empty = [m for m, e in lrc["segments"].items() if not e["num_segments"]]
    if not empty:
        return None
    longest = max((n + t - 1 for n, t in zip(p["profile"]["requests"]["prompt_tokens"],
                                               p["profile"]["requests"]["new_tokens"])), default=0)
    return (f"moe-lrc: no sequence reached m = {', '.join(empty)} tokens (longest: {longest}); raise "
            f"--max-new-tokens or use longer prompts to measure them.")


def verdict(p: dict) -> str:
    """One paragraph: does the model's routing suit offloading, and what cache size the lrc metrics suggest."""
    lrc = p["profile"]["lrc"]
    c, k, n = lrc["suggested_cache_experts"], lrc["top_k"], lrc["num_experts"]
    if c is None:
        return ("Suits offloading: unknown; no sequence was long enough for a full segment. Profile longer "
                "prompts or more --max-new-tokens.")
    ref = lrc["suggestion"]
    if c <= 2 * k:
        fit = "well: a cache of about 2x the active experts serves most of the routing"
    elif c <= n // 2:
        fit = "moderately: routing is local, but a cache needs more than 2x the active experts"
    else:
        fit = "poorly: routing has little locality, offloading will mostly stream experts"
    live = p["profile"]["cache_sweep"]["live"]["mean_cache_experts_per_layer"]
    return (f"Suits offloading {fit}. Suggested cache: {c} of {n} experts per layer ({c / k:.1f}x the {k} active; "
            f"SCH({ref['m_ref']}, {c}) = {ref['sch_at_suggested']:.3f} >= {ref['target']}); this run's cache held "
            f"{live:.1f} per layer.")


def speculation_table(p: dict) -> Table | None:
    """Without vs with speculative decoding (profile.speculation), when the profile ran both."""
    spec = p["profile"].get("speculation")
    if spec is None:
        return None
    c = spec["config"]
    t = _table(f"speculative decoding ({c['method']}, up to {c['num_speculative_tokens']} drafted tokens per step)",
               "metric", "without", "with")
    off, on = spec["without"], spec["with"]

    def num(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)
    t.add_row("generated tokens", str(off["generated_tokens"]), str(on["generated_tokens"]))
    t.add_row("decode steps (per sequence)", str(off["decode_steps"]), str(on["decode_steps"]))
    t.add_row("tokens per verify step", num(off["tokens_per_step"]), num(on["tokens_per_step"]))
    t.add_row("drafted / accepted tokens", "-", f"{on['drafted']} / {on['accepted']}")
    t.add_row("acceptance rate", "-", _pct(on["acceptance"]))
    t.add_row("expert loads", str(off["expert_loads"]), str(on["expert_loads"]))
    t.add_row("loads per generated token", num(off["loads_per_token"], "{:.3f}"), num(on["loads_per_token"], "{:.3f}"))
    t.add_row("decode tokens/s", num(off["decode_tokens_per_s"], "{:.1f}"), num(on["decode_tokens_per_s"], "{:.1f}"))
    return t


def ranks_table(p: dict) -> Table | None:
    """Each rank's cache and IO, and the time in collectives, for an expert-parallel engine (--expert-parallel)."""
    ep = p.get("expert_parallel")
    if ep is None:
        return None
    per_step = ep["comm_seconds_per_step"]
    t = _table(f"expert parallelism ({ep['world_size']} ranks, experts {ep['placement']}; collectives "
               f"{_ms(per_step)} per forward step, {ep['comm_seconds']:.2f} s in all)",
               "rank", "device", "hits", "misses", "hit rate", "loads", "disk read", "stall s")
    for r in ep["ranks"]:
        c, io = r["cache"], r["io"]
        t.add_row(str(r["rank"]), r["device"], str(c["hits"]), str(c["misses"]), _pct(c["hit_rate"]),
                  str(io["loads"]), _mib(io["bytes_disk_read"]), f"{io['stall_seconds']:.3f}")
    return t


def print_report(p: dict, console: Console | None = None) -> None:
    """Print every table of the profile `p` (the dict run_profile returns) to `console` (default: stdout)."""
    if console is None:
        console = Console()
        if not console.is_terminal:          # a pipe or file: wide enough for the per-layer table
            console.width = max(console.width, WIDTH)
    tables = [settings_table(p), summary_table(p), layer_table(p), lookahead_table(p), sweep_table(p),
              *lrc_tables(p), speculation_table(p), ranks_table(p)]
    for t in tables:
        if t is not None:
            console.print(t)
            console.print()
    for line in (lrc_gaps(p), verdict(p)):
        if line:
            console.print(line)
