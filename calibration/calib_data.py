"""Calibration and evaluation images, sampled across every learned task with a fixed seed.

A *pool* maps the artifact's global class ids to image items (uint8 HWC arrays, PIL images or
image paths: whatever ``runtime.preprocess.to_input`` takes, or callables that return one). It
comes from an image folder with one sub-folder per class, named as the artifact's classes
(:func:`folder_pool`), or from a function the caller passes (the command line's built-in
dataset), so this package needs no dataset code of its own.

Routing depends on which task an image belongs to, so samples are drawn per task: ``per_task``
images of each learned task, spread over its classes (each class's images shuffled, then taken
class by class in turn). Evaluation images are drawn the same way from what calibration left.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import InputError
from runtime.preprocess import IMAGE_SUFFIXES

Pool = dict[int, list]


def task_classes(manifest: dict) -> list[range]:
    """Global class ids of every learned task."""
    out, start = [], 0
    for t in manifest["tasks"]:
        out.append(range(start, start + int(t["classes"])))
        start += int(t["classes"])
    return out


def folder_pool(root: str | Path, class_names: list[str]) -> Pool:
    """Images of ``root/<class name>/`` (searched recursively) for each learned class found there."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    ids = {name: i for i, name in enumerate(class_names)}
    pool: Pool = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name in ids:
            files = sorted(f for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if files:
                pool[ids[sub.name]] = files
    if not pool:
        raise InputError(
            f"{root}: no images of the artifact's classes (expected sub-folders named as its classes, "
            f"e.g. {root / class_names[0]}/, holding image files)"
        )
    return pool


def sample(pool: Pool, tasks: list[range], per_task: int, seed: int, skip: set | None = None):
    """``(items, labels, tasks covered, chosen)``: up to ``per_task`` items of each task, none of
    ``skip``, deterministic in ``seed``; ``chosen`` holds the ``(class id, index in the pool)``
    pairs taken (a ``skip`` for a second, disjoint draw)."""
    items, labels, chosen, covered = [], [], set(), 0
    for t, classes in enumerate(tasks):
        rng = np.random.default_rng([seed, t])
        queues = []
        for c in classes:
            idx = [i for i in range(len(pool.get(c, ()))) if (c, i) not in (skip or ())]
            queues.append([(c, int(i)) for i in rng.permutation(idx)] if idx else [])
        order = [queues[j] for j in rng.permutation(len(queues))]
        taken = 0
        while taken < per_task and any(order):
            for q in order:
                if q and taken < per_task:
                    c, i = q.pop(0)
                    items.append(pool[c][i])
                    labels.append(c)
                    chosen.add((c, i))
                    taken += 1
        covered += taken > 0
    return items, np.array(labels, np.int64), covered, chosen


def load(items: list) -> list:
    """Items as images: a callable item (an image drawn on demand) is called."""
    return [item() if callable(item) else item for item in items]


def batches(x: np.ndarray, size: int):
    """``x`` in consecutive chunks of ``size``."""
    return [x[i : i + size] for i in range(0, len(x), size)]


CHUNK = 16  # images preprocessed and held at once (ViT-B/16: 9.6 MB of input)


class Chunks:
    """Images as preprocessed float32 NCHW arrays of at most ``chunk`` images, loaded anew on
    every pass: what calibration holds at once does not grow with the number of images.
    ``largest``: the most images one array held so far."""

    def __init__(self, items: list, preprocessing, chunk: int = CHUNK):
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self.items, self.pre, self.chunk, self.largest = list(items), preprocessing, int(chunk), 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        from runtime.preprocess import to_input

        for i in range(0, len(self.items), self.chunk):
            x = np.ascontiguousarray(to_input(load(self.items[i : i + self.chunk]), self.pre), np.float32)
            self.largest = max(self.largest, len(x))
            yield x

    def head(self, n: int) -> np.ndarray:
        """The first ``n`` images (``n`` at most one chunk)."""
        return next(iter(Chunks(self.items[:n], self.pre, max(n, 1))))
