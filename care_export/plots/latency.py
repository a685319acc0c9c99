"""Benchmark latency against the number of learned tasks: one line per engine and batch size."""

from __future__ import annotations

from pathlib import Path

from .figure import check_plot_path, new_figure, save_figure

STYLES = {"artifact (ORT)": "-o", "backbone (ORT)": "--s", "eager (PyTorch)": ":^"}


def plot_latency(rows: list[dict], path: str | Path) -> dict:
    """Draw the median latency of ``rows`` (``care-export bench`` rows) against tasks into
    ``path``; returns the series as drawn, read back from the figure:
    ``{"<engine>, batch <b>": {"tasks": [...], "ms": [...]}}``."""
    check_plot_path(path)
    fig = new_figure(6.5, 4)
    ax = fig.subplots()
    lines = {}
    for engine in STYLES:
        for batch in sorted({r["batch"] for r in rows}):
            pts = sorted((r["tasks"], r["ms"]) for r in rows if r["engine"] == engine and r["batch"] == batch)
            if pts:
                label = f"{engine}, batch {batch}"
                (lines[label],) = ax.plot(*zip(*pts), STYLES[engine], label=label)
    ax.set(xlabel="tasks learned", ylabel="median latency, ms", title="latency against tasks")
    counts = sorted({r["tasks"] for r in rows})
    if len(counts) > 2:
        ax.set_xscale("log")
    ax.set_xticks(counts, labels=[str(c) for c in counts])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return {
        k: {"tasks": [int(t) for t in ln.get_xdata()], "ms": [float(v) for v in ln.get_ydata()]}
        for k, ln in lines.items()
    }
