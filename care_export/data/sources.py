"""Labelled image sources, their split into a task sequence, and the reference's transforms.

A source (an image folder or the built-in dataset) labels its classes ``0..n-1``. A
:class:`TaskSequence` shuffles them with a seed and cuts them into tasks; the model's class ``g``
(global id, contiguous per task) is the source's class ``order[g]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from torchvision import transforms

from runtime.errors import CareError
from runtime.preprocess import Preprocessing

from . import DEFAULT_SEED, INPUT_SETS
from .builtin import BuiltinSource
from .image_folder import ImageFolderSource


# ---------------------------------------------------------------------- task sequence
def task_split(num_classes: int, init_cls: int, increment: int) -> list[int]:
    """Class counts per task: ``init_cls``, then ``increment`` while a whole increment still
    leaves classes over, then the remainder as one last task (the reference's rule)."""
    if init_cls < 1 or increment < 1:
        raise CareError(f"--init-cls and --increment must be positive, got {init_cls} and {increment}")
    if init_cls > num_classes:
        raise CareError(f"--init-cls {init_cls} exceeds the {num_classes} classes of the data")
    sizes = [init_cls]
    while sum(sizes) + increment < num_classes:
        sizes.append(increment)
    if num_classes > sum(sizes):
        sizes.append(num_classes - sum(sizes))
    return sizes


def class_order(num_classes: int, seed: int = DEFAULT_SEED, shuffle: bool = True) -> list[int]:
    """The source classes in learning order; the reference's ``np.random.seed(seed)``
    followed by ``np.random.permutation(n)``, without touching numpy's global state."""
    if not shuffle:
        return list(range(num_classes))
    return np.random.RandomState(seed).permutation(num_classes).tolist()


@dataclass(frozen=True)
class TaskSequence:
    """Which source classes each task learns, in global-id order."""

    order: tuple[int, ...]
    sizes: tuple[int, ...]
    init_cls: int
    increment: int
    seed: int

    @classmethod
    def build(cls, num_classes: int, init_cls: int, increment: int, seed: int = DEFAULT_SEED) -> TaskSequence:
        return cls(
            tuple(class_order(num_classes, seed)),
            tuple(task_split(num_classes, init_cls, increment)),
            init_cls,
            increment,
            seed,
        )

    @property
    def num_tasks(self) -> int:
        return len(self.sizes)

    def classes(self, task: int) -> range:
        """Global ids of ``task``'s classes."""
        start = sum(self.sizes[:task])
        return range(start, start + self.sizes[task])

    def seen(self, task: int) -> range:
        """Global ids of every class learned up to and including ``task``."""
        return range(sum(self.sizes[: task + 1]))

    def to_dict(self) -> dict:
        return {
            "init_cls": self.init_cls,
            "increment": self.increment,
            "seed": self.seed,
            "sizes": list(self.sizes),
            "class_order": list(self.order),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TaskSequence:
        return cls(tuple(d["class_order"]), tuple(d["sizes"]), int(d["init_cls"]), int(d["increment"]), int(d["seed"]))


# ---------------------------------------------------------------------- sources


def open_source(data: str | Path, *, sequence: dict | None = None, **builtin):
    """``"builtin"``, ``"builtin-shift"`` (``builtin`` holds their settings; ``sequence`` the
    ``init_cls``, ``increment`` and ``order_seed`` whose tasks the shifted domains follow), a
    folder of the CIFAR-100 python files, or an image folder."""
    from .cifar import Cifar100Source, cifar_folder

    if str(data) == "builtin":
        return BuiltinSource(**builtin)
    if str(data) == "builtin-shift":
        from .shift import ShiftedSource

        return ShiftedSource(**builtin, **(sequence or {}))
    if cifar_folder(data) is not None:
        return Cifar100Source(data)
    return ImageFolderSource(data)


def source_from_dict(d: dict) -> BuiltinSource | ImageFolderSource:
    """Reopen the source a checkpoint was trained on (see ``describe()``)."""
    if d["kind"] == "builtin-shift":
        from .shift import ShiftedSource

        return ShiftedSource.from_dict(d)
    if d["kind"] == "builtin":
        return BuiltinSource(
            d["classes"],
            first_class=d["first_class"],
            train_per_class=d["train_per_class"],
            test_per_class=d["test_per_class"],
            image_size=d["image_size"],
            seed=d["seed"],
        )
    if d["kind"] == "cifar100":
        from .cifar import Cifar100Source

        return Cifar100Source(d["path"])
    return ImageFolderSource(d["path"])


# ---------------------------------------------------------------------- transforms
_INTERPOLATION = {
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "nearest": transforms.InterpolationMode.NEAREST,
}


# The reference's training transforms per dataset: "common" (ImageNet-R, ObjectNet,
# OmniBenchmark) and those of CIFAR-224, ImageNet-A and VTAB (reference_config.DATASETS).


def train_transform(pre: Preprocessing, crop_scale: tuple[float, float] = (0.05, 1.0), input_set: str = "common"):
    """The reference's training augmentation at the backbone's input size."""
    if input_set == "common":
        crop = [
            transforms.RandomResizedCrop(pre.input_size, scale=crop_scale, ratio=(3 / 4, 4 / 3)),
            transforms.RandomHorizontalFlip(p=0.5),
        ]
    elif input_set == "cifar224":  # crop at 256/224 of the input, then centre-crop, flip, jitter
        crop = [
            transforms.RandomResizedCrop(pre.resize, interpolation=_INTERPOLATION["bicubic"]),
            transforms.CenterCrop(pre.input_size),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.ColorJitter(brightness=0.25),
        ]
    elif input_set in ("imageneta", "vtab"):  # timm's crop with a random interpolation per image
        from timm.data import RandomResizedCropAndInterpolation

        crop = [
            RandomResizedCropAndInterpolation(pre.input_size, interpolation="random"),
            transforms.RandomHorizontalFlip(p=0.5),
        ]
        if input_set == "vtab":
            crop.append(transforms.ColorJitter(brightness=0.25))
    else:
        raise CareError(f"input set must be one of {', '.join(INPUT_SETS)}, got {input_set!r}")
    return transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])


def eval_transform(pre: Preprocessing):
    """Resize the shorter side to ``pre.resize`` (256/224 of the input), centre crop, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(pre.resize, interpolation=_INTERPOLATION[pre.interpolation]),
            transforms.CenterCrop(pre.input_size),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )


class LabelledImages(Dataset):
    """``(image tensor, global label)`` for the given global classes of a sequence."""

    def __init__(self, source, split: str, order, classes, transform):
        self.source, self.split, self.transform = source, split, transform
        to_global = {order[g]: g for g in classes}
        self.samples = [(item, to_global[c]) for item, c in source.samples(split, [order[g] for g in classes])]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        item, label = self.samples[i]
        return self.transform(self.source.load(self.split, item)), label
