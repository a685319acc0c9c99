"""A matplotlib figure written to a file: PNG, or SVG by the name's extension, atomically."""

from __future__ import annotations

import io
from pathlib import Path

from runtime.errors import CareError

FORMATS = {".png": "png", ".svg": "svg"}
DPI = 80  # small files: the README embeds one


def check_plot_path(path: str | Path) -> str:
    """The format of plot file ``path``; a one-line error for another extension, a missing
    directory or a missing matplotlib (commands call it before long work)."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CareError(f"{path}: plots are written as .png or .svg")
    if not path.parent.is_dir():
        raise CareError(f"{path.parent}: no such directory")
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise CareError("plotting needs matplotlib: pip install 'care-export[plot]'") from None
    return fmt


def new_figure(width: float, height: float):
    """A headless figure: no pyplot, no display."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (temporary name, then rename: an old file survives a failure)."""
    from runtime.atomic import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format=check_plot_path(path))
    write_atomic(Path(path), buf.getvalue())
    return Path(path)
