"""`moe-engine simulate` glue: parse a cache-size sweep, pick the model shape and hardware, print tables.

Flag parsing stays in cli.py; this module turns the parsed values into the simulator's inputs and
its JSON into rich tables. Errors name the flag and value that caused them.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint.hub import is_hub_id
from ..config import format_size, parse_rate, parse_size
from ..errors import ConfigError
from ..runtime.load import model_dir_or_default
from .hardware import Hardware, preset
from .lrc import format_lrc
from .shapes import ModelShape, expert_bytes_shape, shape_from_config, shape_preset
from .synthetic import BUNDLED_TRACE, describe_fold, describe_synthetic, fold_trace, needs_fold, synthetic_trace
from .trace import Trace, TraceError, load_trace


WIDE = 1000                  # columns to measure a table's natural width in


def parse_cache_sizes(text: str | None, top_k: int, num_experts: int, suggested: int | None) -> list[int]:
    """'8', '4,8,16' or a range 'A-B' (every size) / 'A-B:S' (step S) -> sizes; None: k, 2k, ... E and the suggestion."""
    if text is None:
        sizes, c = {num_experts}, top_k
        while c < num_experts:
            sizes.add(c)
            c *= 2
        return sorted(sizes | ({suggested} if suggested else set()))
    out: list[int] = []
    try:
        for part in text.split(","):
            rng, _, step = part.partition(":")
            lo, dash, hi = rng.partition("-")
            out += list(range(int(lo), int(hi) + 1, int(step or 1))) if dash else [int(lo)]
    except ValueError:
        raise ConfigError(f"--cache-experts {text!r}: expected experts per layer like 8, 4,8,16, 4-32 or "
                          f"4-32:4") from None
    bad = [c for c in out if not top_k <= c <= num_experts]
    if bad or not out:
        raise ConfigError(f"--cache-experts {text!r}: every size must be between top_k={top_k} and the "
                          f"{num_experts} experts per layer (got {bad or 'nothing'})")
    return sorted(set(out))


def read_trace(path: str) -> Trace:
    try:
        return load_trace(path)
    except TraceError as e:
        raise ConfigError(f"--trace {e}") from None


def pick_shape(trace: Trace | None, model_dir: str | None, model_shape: str | None, expert_bytes: int | None,
               quant_bits: float | None, revision: str | None = None,
               progress: bool = True) -> tuple[ModelShape, Path | None]:
    """The model shape of MODEL_DIR (a directory or hub id: its config.json is enough), --model-shape or
    --expert-bytes (which takes layers, top-k and experts from the trace); none of them: the bundled model.
    Returns it with the model's directory (where `--predictor path` finds its weights), if there is one."""
    given = [n for n, v in (("MODEL_DIR", model_dir), ("--model-shape", model_shape),
                            ("--expert-bytes", expert_bytes)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of MODEL_DIR (its config.json is enough), --model-shape or --expert-bytes to "
                          f"size the experts, not {' and '.join(given)}")
    dir_ = None
    if model_shape is not None:
        shape = shape_preset(model_shape)
    elif expert_bytes is not None:
        if trace is None:
            raise ConfigError("--expert-bytes needs --trace: the trace gives the MoE layers, top-k and experts")
        shape = expert_bytes_shape(int(expert_bytes), trace.top_k, trace.num_layers, int(trace.num_experts))
    else:
        dir_ = model_dir_or_default(model_dir, revision, progress, config_only=True)
        if not dir_.is_dir():
            raise ConfigError(f"MODEL_DIR {model_dir} is not a directory; give a directory with a config.json")
        shape = shape_from_config(dir_, model_dir if model_dir is not None and is_hub_id(model_dir) else None)
    return (shape if quant_bits is None else shape.with_expert_bits(quant_bits)), dir_


def pick_trace(trace: Trace | None, path: str | None, shape: ModelShape, bundled: bool) -> tuple[Trace, str]:
    """The --trace read from `path` (`trace`), folded onto `shape` when it is another model's; without one the
    bundled model's own trace, or a synthetic one. Returns the trace and a line saying where its routing is from."""
    if trace is not None:
        if not needs_fold(trace, shape.num_layers, shape.num_experts, shape.top_k):
            return trace, f"trace: {path}"
        return (fold_trace(trace, shape.num_layers, shape.num_experts, shape.top_k),
                describe_fold(trace, shape.name, shape.num_layers, shape.num_experts, shape.top_k))
    if bundled:
        trace = load_trace(BUNDLED_TRACE)
        return trace, (f"no --trace: the bundled model's own routing ({BUNDLED_TRACE.name}: {trace.num_sequences} "
                       f"prompts, {trace.num_steps} tokens)")
    trace = synthetic_trace(shape.num_layers, shape.num_experts, shape.top_k)
    return trace, "warning: " + describe_synthetic(shape.name, trace)


def plan_sizes(shape: ModelShape, gpu_mem: str, max_kv_tokens: int | None, device: str) -> list:
    """--gpu-mem -> the experts per MoE layer of the engine's own placement plan (one sweep entry)."""
    if gpu_mem.strip().lower() == "auto":
        raise ConfigError("--gpu-mem auto measures this machine, but simulate models --hardware; give the "
                          "modelled card's budget as a size, e.g. --gpu-mem 7.5G")
    quotas = shape.engine_quotas(parse_size(gpu_mem, "--gpu-mem"), max_kv_tokens, device)
    return [quotas] if len(set(quotas)) > 1 else [quotas[0]]


def pick_hardware(name: str, bandwidth: str | None, compute: str | None, latency: float | None,
                  no_overlap: bool, host_compute: str | None = None) -> Hardware:
    hw = preset(name)
    changes = {}
    if host_compute is not None:
        changes["host_compute_bytes_per_s"] = parse_rate(host_compute, "--host-compute")
    if bandwidth is not None:
        changes["link_bytes_per_s"] = parse_rate(bandwidth, "--bandwidth")
    if compute is not None:
        changes["compute_bytes_per_s"] = parse_rate(compute, "--compute")
    if latency is not None:
        if latency < 0:
            raise ConfigError(f"--load-latency {latency}: must be >= 0 seconds")
        changes["load_latency_s"] = latency
    if no_overlap:
        changes["overlap"] = False
    return hw.replace(name=f"{name} (modified)" if changes else name, **changes) if changes else hw


def _cache_label(r: dict) -> str:
    quotas = r.get("quotas") or [r["cache_experts"]]
    return str(quotas[0]) if min(quotas) == max(quotas) else f"{min(quotas)}-{max(quotas)}"


def _print(console, table) -> None:
    """Print `table` at its natural width, so that no header or cell is cut (a pipe's console is 80 columns)."""
    width, before = console.measure(table, options=console.options.update_width(WIDE)).maximum, console.width
    console.width = max(before, width)            # print() never renders wider than the console
    try:
        console.print(table)
    finally:
        console.width = before


def render(report: dict, console=None) -> None:
    """Print the moe-lrc table and the simulation sweep with rich (default: to stdout)."""
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    lrc = report.get("lrc")
    if lrc is not None:
        rows = format_lrc(lrc)
        t = Table(title=f"local routing consistency (moe-lrc), layer averages; top-k = {lrc['top_k']}, "
                        f"E = {lrc['num_experts']}", title_justify="left")
        for head in rows[0]:
            t.add_column(head, justify="right", no_wrap=True)
        for r in rows[1:]:
            t.add_row(*r)
        _print(console, t)
        sug = lrc["suggestion"]
        console.print(f"suggested cache: [bold]{lrc['suggested_cache_experts']}[/bold] experts per layer "
                      f"({sug['rule']}; m_ref={sug['m_ref']}, target={sug['target']})")
    hw, shape = report["hardware"], report["model"]
    t = Table(title=f"simulated decode: {shape['name']} ({shape['expert_bytes'] / 2**20:.1f} MiB per expert) on "
                    f"{hw['name']} (link {hw['link_bytes_per_s'] / 1e9:.2f} GB/s, compute "
                    f"{hw['compute_bytes_per_s'] / 1e9:.1f} GB/s); policy {report['policy']}, predictor "
                    f"{report['predictor']}; compute bound {report['compute_bound_tokens_per_s']:.1f} tok/s",
              title_justify="left")
    cols = ("C/layer", "resident", "hit", "Belady hit", "loads/tok", "Belady loads", "stall s", "tok/s", "pf P/R")
    for c in cols:
        t.add_column(c, justify="right", no_wrap=True)
    for r in report["results"]:
        pf = r["prefetch"]
        t.add_row(_cache_label(r), format_size(r["expert_bytes_resident"]), f"{r['hit_rate']:.3f}",
                  f"{r['belady_hit_rate']:.3f}", f"{r['loads_per_token']:.2f}", str(r["belady_loads"]),
                  f"{r['stall_seconds']:.2f}", f"{r['tokens_per_s']:.2f}",
                  f"{pf['precision']:.2f} / {pf['recall']:.2f}" if pf["issued"] else "-")
    _print(console, t)
