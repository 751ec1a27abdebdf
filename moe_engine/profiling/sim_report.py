"""`moe-engine simulate` glue: parse a cache-size sweep, pick the model shape and hardware, print tables.

Flag parsing stays in cli.py; this module turns the parsed values into the simulator's inputs and
its JSON into rich tables. Errors name the flag and value that caused them.
"""
from __future__ import annotations

from pathlib import Path

from ..config import parse_rate
from ..errors import ConfigError
from .hardware import Hardware, preset
from .lrc import format_lrc
from .shapes import ModelShape, expert_bytes_shape, shape_from_config, shape_preset
from .trace import Trace


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


def pick_shape(trace: Trace, model_dir: str | None, model_shape: str | None, expert_bytes: int | None,
               quant_bits: float | None) -> ModelShape:
    given = [n for n, v in (("MODEL_DIR", model_dir), ("--model-shape", model_shape),
                            ("--expert-bytes", expert_bytes)) if v is not None]
    if len(given) != 1:
        raise ConfigError(f"give exactly one of MODEL_DIR (its config.json is enough), --model-shape or "
                          f"--expert-bytes to size the experts (got {', '.join(given) or 'none'})")
    if model_dir is not None:
        if not Path(model_dir).is_dir():
            raise ConfigError(f"MODEL_DIR {model_dir} is not a directory; give a directory with a config.json")
        shape = shape_from_config(model_dir)
    elif model_shape is not None:
        shape = shape_preset(model_shape)
    else:
        shape = expert_bytes_shape(int(expert_bytes), trace.top_k, trace.num_layers, int(trace.num_experts))
    return shape if quant_bits is None else shape.with_expert_bits(quant_bits)


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


def render(report: dict) -> None:
    """Print the moe-lrc table and the simulation sweep with rich."""
    from rich.console import Console
    from rich.table import Table
    console = Console()
    lrc = report.get("lrc")
    if lrc is not None:
        rows = format_lrc(lrc)
        t = Table(title=f"local routing consistency (moe-lrc), layer averages; top-k = {lrc['top_k']}, "
                        f"E = {lrc['num_experts']}")
        for head in rows[0]:
            t.add_column(head, justify="right")
        for r in rows[1:]:
            t.add_row(*r)
        console.print(t)
        sug = lrc["suggestion"]
        console.print(f"suggested cache: [bold]{lrc['suggested_cache_experts']}[/bold] experts per layer "
                      f"({sug['rule']}; m_ref={sug['m_ref']}, target={sug['target']})")
    hw, shape = report["hardware"], report["model"]
    t = Table(title=f"simulated decode: {shape['name']} ({shape['expert_bytes'] / 2**20:.1f} MiB per expert) on "
                    f"{hw['name']} (link {hw['link_bytes_per_s'] / 1e9:.2f} GB/s, compute "
                    f"{hw['compute_bytes_per_s'] / 1e9:.1f} GB/s); policy {report['policy']}, predictor "
                    f"{report['predictor']}; compute bound {report['compute_bound_tokens_per_s']:.1f} tok/s")
    cols = ("C/layer", "GiB", "hit", "Belady hit", "loads/tok", "Belady loads", "stall s", "tok/s", "pf P/R")
    for c in cols:
        t.add_column(c, justify="right")
    for r in report["results"]:
        pf = r["prefetch"]
        t.add_row(str(r["cache_experts"]), f"{r['expert_bytes_resident'] / 2**30:.2f}", f"{r['hit_rate']:.3f}",
                  f"{r['belady_hit_rate']:.3f}", f"{r['loads_per_token']:.2f}", str(r["belady_loads"]),
                  f"{r['stall_seconds']:.2f}", f"{r['tokens_per_s']:.2f}",
                  f"{pf['precision']:.2f} / {pf['recall']:.2f}" if pf["issued"] else "-")
    console.print(t)
