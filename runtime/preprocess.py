"""Images to the network's input, in numpy and PIL (no torch, no torchvision).

The transform is the artifact manifest's ``preprocessing``: resize the shorter side to
``resize`` with ``interpolation``, centre crop ``input_size``, scale to [0, 1], normalise with
``mean``/``std``. It reproduces torchvision's ``Resize(resize, interpolation)`` +
``CenterCrop(input_size)`` + ``ToTensor()`` + ``Normalize(mean, std)`` on PIL images: the same PIL
resampling, the same integer arithmetic for sizes and crop offsets, the same float32 operations.

Accepted images, alone or as a batch (a list, or one 4-D array):

* ``uint8`` arrays, HWC (one image) or NHWC (a batch), 3 channels, RGB;
* PIL images (converted to RGB) and paths to image files;
* ``float32`` arrays already preprocessed: CHW (one image) or NCHW, at the input size.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import numpy as np

from .errors import InputError

_RESAMPLING = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")

# File names read as images wherever a folder of images is taken (run, parity, calibration,
# image-folder datasets); compared lower-case.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input (the checkpoint's and the artifact manifest's
    ``preprocessing`` entry): resize the shorter side, centre crop, normalise."""

    input_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_input(cls, input_size: int, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> Preprocessing:
        # The reference's test transform: resize to 256/224 of the input, centre crop.
        return cls(input_size, int(input_size * 256 / 224), "bicubic", tuple(mean), tuple(std))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        try:
            mean, std = (cast("tuple[float, float, float]", tuple(float(v) for v in d[k])) for k in ("mean", "std"))
            prep = cls(int(d["input_size"]), int(d["resize"]), str(d["interpolation"]).lower(), mean, std)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"preprocessing is malformed ({type(exc).__name__}: {exc})") from None
        if prep.input_size < 1 or prep.resize < 1:
            raise InputError(
                f"preprocessing sizes must be positive, got input_size {prep.input_size} and resize {prep.resize}"
            )
        if not all(np.isfinite(prep.mean + prep.std)):
            raise InputError("preprocessing mean and std must be finite")
        if prep.interpolation not in _RESAMPLING:
            raise InputError(f"unknown interpolation {prep.interpolation!r} (known: {', '.join(_RESAMPLING)})")
        if len(prep.mean) != 3 or len(prep.std) != 3 or min(prep.std) <= 0:
            raise InputError(f"preprocessing needs 3 means and 3 positive stds, got {prep.mean} and {prep.std}")
        return prep


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``size`` (torchvision's integer rule)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre crop of an HWC array, zero-padded first where the image is smaller (torchvision's rule)."""
    h, w = arr.shape[:2]
    if size > h or size > w:
        ph, pw = max(size - h, 0), max(size - w, 0)
        arr = np.pad(arr, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
        h, w = arr.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return arr[top : top + size, left : left + size]


def _pil():
    from PIL import Image

    return Image


def _resize_crop(img, prep: Preprocessing) -> np.ndarray:
    """A PIL RGB image -> uint8 HWC array of the input size."""
    Image = _pil()
    if not img.width or not img.height:
        raise InputError(f"image of size {img.width}x{img.height}: nothing to classify")
    h, w = resized_size(img.height, img.width, prep.resize)
    resample = getattr(Image.Resampling, prep.interpolation.upper())
    return center_crop(np.asarray(img.resize((w, h), resample)), prep.input_size)


def _normalise(hwc: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW: ``(x / 255 - mean) / std`` in float32, as ToTensor + Normalize."""
    x: np.ndarray = hwc.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _open(path: Path):
    Image = _pil()
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None


def _check_float(x: np.ndarray, prep: Preprocessing, what: str) -> None:
    s = prep.input_size
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2:] != (s, s):
        raise InputError(f"{what}: float input must be NCHW (N, 3, {s}, {s}) or CHW, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise InputError(f"{what}: {bad} pixel values are NaN or Inf")


def _uint8_images(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 HWC or NHWC -> NHWC, checked."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputError(f"{what}: uint8 images must be HWC or NHWC, got rank {x.ndim} (shape {x.shape})")
    if x.shape[-1] != 3:
        raise InputError(f"{what}: images must have 3 channels (RGB, channels last), got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError("empty batch: no image given")
    if not x.shape[1] or not x.shape[2]:
        raise InputError(f"{what}: images of size {x.shape[2]}x{x.shape[1]}: nothing to classify")
    return x


def _array_to_batch(x: np.ndarray, prep: Preprocessing, what: str) -> np.ndarray:
    if x.dtype == np.uint8:
        x = _uint8_images(x, what)
        Image = _pil()
        return _normalise(np.stack([_resize_crop(Image.fromarray(im), prep) for im in x]), prep)
    if x.dtype == np.float32:
        x = x[None] if x.ndim == 3 else x
        _check_float(x, prep, what)
        return np.ascontiguousarray(x)
    raise InputError(
        f"{what}: arrays must be uint8 images (HWC) or float32 preprocessed input (NCHW), got dtype {x.dtype}"
    )


def _item_to_batch(item, prep: Preprocessing, what: str) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return _array_to_batch(item, prep, what)
    if isinstance(item, (str, os.PathLike)):
        img = _open(Path(item))
    elif type(item).__module__.startswith("PIL.") and hasattr(item, "convert"):
        img = item.convert("RGB") if item.mode != "RGB" else item
    else:
        raise InputError(
            f"{what}: expected an image (uint8 array, PIL image, path) or float32 NCHW array, got {type(item).__name__}"
        )
    return _normalise(_resize_crop(img, prep)[None], prep)


def to_input(images, prep: Preprocessing, first: int = 0) -> np.ndarray:
    """Any accepted image or batch -> float32 NCHW, normalised, at the input size (N >= 1).
    ``first``: the index of a list's first image in errors (a chunk of a longer list)."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InputError("empty batch: no image given")
        parts = [_item_to_batch(im, prep, f"image {i}") for i, im in enumerate(images, start=first)]
        batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
    else:
        batch = _item_to_batch(images, prep, "input")
    if batch.shape[0] == 0:
        raise InputError("empty batch: no image given")
    return batch
