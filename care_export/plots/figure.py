"""A matplotlib figure written to a file: PNG, or SVG by the name's extension, atomically."""

from __future__ import annotations

import io
from pathlib import Path

from runtime.errors import CareError

FORMATS = {".png": "png", ".svg": "svg"}
DPI = 80  # small files: the README embeds one


def new_figure(width: float, height: float):
    """A headless figure (no pyplot, no display); a one-line error without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CareError("plotting needs matplotlib: pip install 'care-export[plot]'") from None
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (temporary name, then rename: an old file survives a failure)."""
    from ..checkpoint.format import atomic_write_bytes

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CareError(f"{path}: plots are written as .png or .svg")
    if not path.parent.is_dir():
        raise CareError(f"{path.parent}: no such directory")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())
    return path
