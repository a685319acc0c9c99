"""CIFAR-100 from the standard python-pickle files (``cifar-100-python/``: ``train``, ``test``,
``meta``), read from a local folder; the reference's CIFAR-224 runs use these images."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.errors import CareError

CIFAR_FILES = ("train", "test", "meta")


def cifar_folder(root: str | Path) -> Path | None:
    """The folder holding the CIFAR-100 pickle files: ``root`` or ``root/cifar-100-python``."""
    root = Path(root)
    for folder in (root, root / "cifar-100-python"):
        if all((folder / f).is_file() for f in CIFAR_FILES):
            return folder
    return None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise CareError(f"{path}: not a CIFAR-100 python-pickle file ({exc})") from None
    if not isinstance(data, dict):
        raise CareError(f"{path}: not a CIFAR-100 python-pickle file (no dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


class Cifar100Source:
    """The 100 fine classes, in the files' label order (the reference's ``class_order`` before
    its seeded permutation); images are 32x32 RGB, resized by the transforms."""

    def __init__(self, root: str | Path):
        folder = cifar_folder(root)
        if folder is None:
            raise CareError(f"{root}: no CIFAR-100 python files ({', '.join(CIFAR_FILES)})")
        self.root = folder
        meta = _unpickle(folder / "meta")
        if "fine_label_names" not in meta:
            raise CareError(f"{folder / 'meta'}: lacks fine_label_names")
        self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]
        self.images, self.labels = {}, {}
        for split in ("train", "test"):
            d = _unpickle(folder / split)
            if "data" not in d or "fine_labels" not in d:
                raise CareError(f"{folder / split}: lacks data or fine_labels")
            data = np.asarray(d["data"], dtype=np.uint8)
            labels = np.asarray(d["fine_labels"], dtype=np.int64)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
                raise CareError(f"{folder / split}: data has shape {data.shape}, expected (N, 3072) with N labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
                raise CareError(f"{folder / split}: labels outside 0..{len(self.class_names) - 1}")
            self.images[split] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            self.labels[split] = labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        return {"kind": "cifar100", "path": str(self.root.resolve())}

    def samples(self, split: str, labels) -> list[tuple[int, int]]:
        out = []
        for c in labels:
            out += [(int(i), int(c)) for i in np.flatnonzero(self.labels[split] == int(c))]
        return out

    def load(self, split: str, item: int) -> Image.Image:
        return Image.fromarray(self.images[split][item])
