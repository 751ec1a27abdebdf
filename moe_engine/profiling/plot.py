"""`moe-engine profile --plot OUT.png`: one figure of three panels over the profile dict of profile.py.

    [ hit rate per MoE layer: live vs Belady ] [ a decode step: compute | stall, loader busy ] [ hit rate vs cache size ]

matplotlib is optional (the `bench` extra) and imported only here, on the Agg backend (no display).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from ..errors import ConfigError

TITLE_WIDTH = 150                # characters per title line (the figure is 18 inches wide)


def _pct(rates) -> list[float]:
    """Hit rates (fractions) as percentages: the axes and the panel titles both speak percent."""
    return [100 * r if r is not None else float("nan") for r in rates]


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or a ConfigError that says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is not installed; run `pip install matplotlib` (in a "
                          "moe-engine checkout: `pip install -e \".[bench]\"`), or drop --plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _layers_panel(ax, p: dict) -> None:
    lay = p["profile"]["layers"]
    x = list(range(len(lay["moe_layers"])))
    w = 0.4
    ax.bar([i - w / 2 for i in x], _pct(lay["hit_rate"]), w, label="this run", color="tab:blue")
    ax.bar([i + w / 2 for i in x], _pct(lay["belady_hit_rate"]), w, label="Belady (demand loads)", color="tab:gray")
    ax.set_xticks(x, [str(m) for m in lay["moe_layers"]])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"hit rate per layer (all: {p['cache']['hit_rate']:.1%}, Belady {p['optimal']['belady_hit_rate']:.1%})")
    ax.legend(loc="lower center", ncol=2, fontsize="small", framealpha=0.9)


def _time_panel(ax, p: dict) -> None:
    t = p["profile"]["time_per_token"]
    ms = {k: 1000 * t[k] for k in ("compute_s", "stall_s", "io_s")}
    ax.bar(0, ms["compute_s"], 0.6, label="compute", color="tab:green")
    ax.bar(0, ms["stall_s"], 0.6, bottom=ms["compute_s"], label="stall (waiting for loads)", color="tab:red")
    ax.bar(1, ms["io_s"], 0.6, label="IO (loader threads, beside compute)", color="tab:orange")
    ax.set_xticks([0, 1], ["wall clock", "IO"])
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"time per output token: {1000 * t['total_s']:.2f} ms over {t['decode_steps']} steps")
    ax.legend(loc="upper right", fontsize="small")


def _sweep_panel(ax, p: dict) -> None:
    sw = p["profile"]["cache_sweep"]
    c = sw["cache_experts_per_layer"]
    ax.plot(c, _pct(sw["belady_hit_rate"]), "o-", color="tab:gray", label="Belady")
    ax.plot(c, _pct(sw["policy_hit_rate"]), "s-", color="tab:blue", label=f"{sw['policy']} policy (replay)")
    live = sw["live"]
    ax.plot([live["mean_cache_experts_per_layer"]], _pct([live["hit_rate"]]), "*", ms=14, color="tab:red",
            label="this run (with prefetch)")
    suggested = p["profile"]["lrc"].get("suggested_cache_experts")
    if suggested is not None:
        ax.axvline(suggested, ls="--", color="tab:purple", label=f"moe-lrc suggestion ({suggested})")
    ax.set_xlabel("experts cached per layer")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("hit rate vs cache size")
    ax.legend(loc="lower right", fontsize="small")


def title(settings: dict, width: int = TITLE_WIDTH) -> str:
    """The figure's title: the run's settings, wrapped into lines of at most `width` characters."""
    parts = [f"{k} {v}" for k, v in settings.items() if v is not None]
    return "\n".join(textwrap.wrap("moe-engine profile: " + ", ".join(parts), width, break_long_words=False))


def make_figure(p: dict):
    """The figure of profile `p`: three panels under the wrapped settings title (closed by the caller)."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), constrained_layout=True)
    _layers_panel(axes[0], p)
    _time_panel(axes[1], p)
    _sweep_panel(axes[2], p)
    fig.suptitle(title(p["profile"]["settings"]))
    return fig


def plot_profile(p: dict, out: str | Path) -> Path:
    """Draw the three panels of profile `p` into `out` (PNG); returns the path."""
    plt = require_matplotlib()
    fig = make_figure(p)
    out = Path(out)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return out
