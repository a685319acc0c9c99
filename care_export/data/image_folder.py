"""An image folder as a labelled source (one sub-folder per class), without PyTorch: the
trainer reads it through ``datasets.py``, and ``care-export eval`` of an artifact reads it with
the runtime alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.errors import CareError
from runtime.preprocess import IMAGE_SUFFIXES


class ImageFolderSource:
    """One sub-folder per class, as torchvision's ImageFolder (classes in sorted order).

    ``root/train/<class>/`` and ``root/test/<class>/`` are used when both exist; otherwise the
    images of ``root/<class>/`` are split per class, a fixed ``test_fraction`` going to test.
    """

    def __init__(self, root: str | Path, test_fraction: float = 0.2):
        root = Path(root)
        if not root.is_dir():
            raise CareError(f"data folder not found: {root}")
        self.root = root
        if (root / "train").is_dir() and (root / "test").is_dir():
            train, test = self._scan(root / "train"), self._scan(root / "test")
            if list(train) != list(test):
                raise CareError(f"{root}: train/ and test/ hold different class folders")
            self.files = {"train": list(train.values()), "test": list(test.values())}
        else:
            train = self._scan(root)
            self.files = {"train": [], "test": []}
            for name, paths in train.items():
                if len(paths) < 2:
                    raise CareError(f"{root / name}: a class needs at least 2 images to split into train and test")
                perm = np.random.RandomState(0).permutation(len(paths))
                n_test = max(1, int(round(len(paths) * test_fraction)))
                self.files["test"].append([paths[i] for i in sorted(perm[:n_test])])
                self.files["train"].append([paths[i] for i in sorted(perm[n_test:])])
        self.class_names = list(train)

    @staticmethod
    def _scan(folder: Path) -> dict[str, list[Path]]:
        classes = sorted(p for p in folder.iterdir() if p.is_dir())
        if not classes:
            raise CareError(f"{folder}: no class folders (expected one sub-folder of images per class)")
        out = {}
        for c in classes:
            files = sorted(p for p in c.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise CareError(f"{c}: no images ({', '.join(IMAGE_SUFFIXES)})")
            out[c.name] = files
        return out

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict:
        return {"kind": "folder", "path": str(self.root.resolve())}

    def files_digest(self, labels) -> str:
        """sha256 of the file list (path below the root, size) of the given classes, both splits:
        it changes when an image is added, removed, renamed or rewritten at another size."""
        h = hashlib.sha256()
        for split in ("train", "test"):
            for p, c in self.samples(split, labels):
                h.update(
                    f"{split}\t{self.class_names[c]}\t{p.relative_to(self.root).as_posix()}\t{p.stat().st_size}\n".encode()
                )
        return h.hexdigest()

    def samples(self, split: str, labels) -> list[tuple[Path, int]]:
        return [(p, int(c)) for c in labels for p in self.files[split][int(c)]]

    def load(self, split: str, item: Path) -> Image.Image:
        try:
            with Image.open(item) as img:
                return img.convert("RGB")
        except OSError as exc:
            raise CareError(f"cannot read image {item}: {exc}") from None
