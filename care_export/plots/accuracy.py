"""Accuracy after each task: top-1 over all classes seen so far (a line), and the accuracy
matrix, task j's classes after learning task i, as a heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .figure import check_plot_path, new_figure, save_figure


def plot_accuracy(metrics: dict, path: str | Path, title: str = "") -> dict:
    """Draw ``metrics`` (``metrics.json``: ``top1``, ``matrix``) into ``path``; returns the
    numbers as drawn, read back from the figure: ``tasks`` (1-based), ``top1`` (None where not
    measured) and ``matrix`` (rows: after task i; None above the diagonal or not measured)."""
    check_plot_path(path)
    top1, matrix = metrics["top1"], metrics["matrix"]
    n = len(top1)
    tasks = np.arange(1, n + 1)
    grid = np.full((n, n), np.nan)
    for i, row in enumerate(matrix):
        grid[i, : len(row)] = [np.nan if a is None else a for a in row]

    fig = new_figure(9.5 if n > 1 else 5, 3.6)
    left, right = fig.subplots(1, 2, width_ratios=(1.2, 1))
    (line,) = left.plot(tasks, [np.nan if a is None else a for a in top1], marker="o")
    left.set(
        xlabel="tasks learned",
        ylabel="top-1 % (all seen classes)",
        ylim=(0, 100),
        title=title or "accuracy after each task",
    )
    ticks = tasks if n <= 20 else np.linspace(1, n, 11).round()
    left.set_xticks(ticks)
    left.grid(alpha=0.3)
    image = right.imshow(
        np.ma.masked_invalid(grid),
        vmin=0,
        vmax=100,
        cmap="viridis",
        origin="upper",
        extent=(0.5, n + 0.5, n + 0.5, 0.5),
    )
    right.set(xlabel="task j (its classes)", ylabel="after learning task i", title="accuracy matrix, top-1 %")
    right.set_xticks(ticks)
    right.set_yticks(ticks)
    fig.colorbar(image, ax=right, shrink=0.9)
    if n <= 10:
        for i in range(n):
            for j in range(n):
                if not np.isnan(grid[i, j]):
                    right.text(
                        j + 1,
                        i + 1,
                        f"{grid[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if grid[i, j] < 60 else "black",
                    )
    save_figure(fig, path)

    def plain(values):
        return [None if np.ma.is_masked(v) or np.isnan(v) else float(v) for v in values]

    drawn = image.get_array()
    return {
        "tasks": [int(t) for t in line.get_xdata()],
        "top1": plain(line.get_ydata()),
        "matrix": [plain(drawn[i, : i + 1]) for i in range(n)],
    }
