"""Drawn images kept in memory for the procedural sources (``builtin``, ``builtin-shift``).

Those sources draw every image from its seed on each load, and every epoch, statistics pass and
evaluation loads the same images again: after a few hundred tasks the evaluation of every seen
class drew far more images than it classified. Kept up to a byte budget; past it, images are
drawn anew each time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np

CACHE_BYTES = 256 << 20


class DrawnImages:
    """Images (H, W, 3) uint8 by key, drawn by the caller's function the first time."""

    def __init__(self, image_size: int, budget_bytes: int | None = None):
        self._drawn: dict[Hashable, np.ndarray] = {}
        self._room = (CACHE_BYTES if budget_bytes is None else budget_bytes) // (3 * image_size**2)

    def __len__(self) -> int:
        return len(self._drawn)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._drawn

    def get(self, key: Hashable, draw: Callable[[], np.ndarray]) -> np.ndarray:
        pixels = self._drawn.get(key)
        if pixels is None:
            pixels = draw()
            if len(self._drawn) < self._room:
                self._drawn[key] = pixels
        return pixels
