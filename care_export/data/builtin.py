"""The built-in dataset: procedurally drawn images, no download.

Every class is a distribution over images: a shape (kind, colour, size, position, rotation) on a
textured background (pattern, two colours, frequency). A class draws its own means from a seed;
every image then draws its own deviations from them (position, size, angle, colour, texture phase,
pixel noise), so no two images are alike and neighbouring classes can be close. Images are drawn
on the fly from ``(seed, class id, split, index)``: the same arguments always give the same pixels.

Class ids ``0..MAX_CLASSES-1`` make up the continual sequences; ids from ``PRETRAIN_FIRST_CLASS``
on are the pre-training classes, so the two sets never meet.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .drawn import DrawnImages

MAX_CLASSES = 1000
PRETRAIN_FIRST_CLASS = MAX_CLASSES

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "bar", "star")
TEXTURES = ("flat", "hstripes", "vstripes", "diagonal", "checker", "dots", "radial")
_SPLITS = {"train": 0, "test": 1}
PALETTE = np.array(
    [
        [0.9, 0.1, 0.1],
        [0.1, 0.7, 0.2],
        [0.15, 0.3, 0.9],
        [0.95, 0.85, 0.1],
        [0.9, 0.5, 0.1],
        [0.6, 0.2, 0.8],
        [0.1, 0.8, 0.8],
        [0.9, 0.4, 0.7],
        [0.95, 0.95, 0.95],
        [0.1, 0.1, 0.1],
        [0.5, 0.5, 0.5],
        [0.5, 0.3, 0.1],
    ]
)


class ClassStyle:
    """The means that make a class: drawn once from ``(seed, class id)``."""

    def __init__(self, seed: int, class_id: int):
        rng = np.random.default_rng([seed, class_id])
        self.shape = int(rng.integers(len(SHAPES)))
        self.texture = int(rng.integers(len(TEXTURES)))
        # Colours come from a small palette, so that colour alone rarely tells classes apart.
        colours = PALETTE[rng.choice(len(PALETTE), 3, replace=False)] + rng.normal(0, 0.03, (3, 3))
        self.fg, self.bg = colours[0], colours[1:]
        self.freq = rng.uniform(2.0, 6.0)  # texture periods across the image
        self.center = rng.uniform(0.3, 0.7, 2)
        self.radius = rng.uniform(0.16, 0.32)  # fraction of the image side
        self.angle = rng.uniform(0, np.pi)

    @property
    def name(self) -> str:
        return f"{SHAPES[self.shape]}-on-{TEXTURES[self.texture]}"


def _texture(kind: int, u, v, freq: float, phase: float):
    """A background pattern in [0, 1] on image coordinates ``u, v`` in [0, 1)."""
    two_pi = 2 * np.pi
    name = TEXTURES[kind]
    if name == "flat":
        return np.zeros_like(u)
    if name == "hstripes":
        return (np.sin(two_pi * (freq * v + phase)) > 0).astype(np.float32)
    if name == "vstripes":
        return (np.sin(two_pi * (freq * u + phase)) > 0).astype(np.float32)
    if name == "diagonal":
        return (np.sin(two_pi * (freq * (u + v) / np.sqrt(2) + phase)) > 0).astype(np.float32)
    if name == "checker":
        return ((np.sin(two_pi * (freq * u + phase)) * np.sin(two_pi * (freq * v + phase))) > 0).astype(np.float32)
    if name == "dots":
        du, dv = (freq * u + phase) % 1 - 0.5, (freq * v + phase) % 1 - 0.5
        return (du**2 + dv**2 < 0.09).astype(np.float32)
    r = np.hypot(u - 0.5, v - 0.5)  # radial
    return (np.sin(two_pi * (freq * r + phase)) > 0).astype(np.float32)


def _shape_mask(kind: int, x, y, radius: float):
    """Soft mask of a shape centred at 0 in rotated coordinates ``x, y`` (image fractions)."""
    name = SHAPES[kind]
    r = np.hypot(x, y)
    if name == "disc":
        d = r - radius
    elif name == "square":
        d = np.maximum(np.abs(x), np.abs(y)) - radius * 0.85
    elif name == "triangle":
        # Equilateral triangle as the max of three half-planes.
        angles = np.array([np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3])
        d = np.max([x * np.cos(a) + y * np.sin(a) for a in angles], axis=0) - radius * 0.5
    elif name == "ring":
        d = np.abs(r - radius * 0.8) - radius * 0.25
    elif name == "cross":
        arm = np.minimum(
            np.maximum(np.abs(x) - radius * 0.3, np.abs(y) - radius),
            np.maximum(np.abs(y) - radius * 0.3, np.abs(x) - radius),
        )
        d = arm
    elif name == "diamond":
        d = (np.abs(x) + np.abs(y)) - radius
    elif name == "bar":
        d = np.maximum(np.abs(x) - radius * 1.1, np.abs(y) - radius * 0.3)
    else:  # star: a disc whose radius oscillates five times around the centre
        theta = np.arctan2(y, x)
        d = r - radius * (0.75 + 0.3 * np.cos(5 * theta))
    # About one pixel of anti-aliasing at 32 px.
    return np.clip(0.5 - d * 32, 0.0, 1.0)


def render(style: ClassStyle, rng: np.random.Generator, size: int) -> np.ndarray:
    """One image of ``style`` as ``size x size x 3`` uint8, its deviations drawn from ``rng``."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    v, u = np.meshgrid(coords, coords, indexing="ij")
    tex = _texture(style.texture, u, v, style.freq * rng.uniform(0.85, 1.15), rng.uniform())
    bg = style.bg + rng.normal(0, 0.08, (2, 3))
    img = bg[0] * (1 - tex[..., None]) + bg[1] * tex[..., None]

    cx, cy = style.center + rng.normal(0, 0.1, 2)
    angle = style.angle + rng.normal(0, 0.4)
    radius = style.radius * rng.uniform(0.75, 1.25)
    x, y = u - cx, v - cy
    xr, yr = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    mask = _shape_mask(style.shape, xr, yr, radius)[..., None]
    fg = style.fg + rng.normal(0, 0.08, 3)
    img = img * (1 - mask) + fg * mask
    # Brightness, colour cast, pixel noise.
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 0.04, 3) + rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


class BuiltinSource:
    """A labelled image source of ``num_classes`` built-in classes starting at ``first_class``.

    Labels are ``0..num_classes-1``; ``train`` and ``test`` images of a class are drawn from the
    same distribution with disjoint random streams.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        first_class: int = 0,
        train_per_class: int = 60,
        test_per_class: int = 20,
        image_size: int = 32,
        seed: int = 0,
    ):
        from runtime.errors import CareError

        if first_class < PRETRAIN_FIRST_CLASS and not 1 <= num_classes <= MAX_CLASSES - first_class:
            raise CareError(f"the built-in dataset has {MAX_CLASSES} classes, asked for {num_classes}")
        if min(train_per_class, test_per_class) < 1 or image_size < 8:
            raise CareError("built-in dataset: images per class must be positive and the image size at least 8")
        self.first_class = first_class
        self.per_class = {"train": train_per_class, "test": test_per_class}
        self.image_size = image_size
        self.seed = seed
        self.styles = [ClassStyle(seed, first_class + k) for k in range(num_classes)]
        self.class_names = [f"{s.name}-{first_class + k}" for k, s in enumerate(self.styles)]
        self._drawn = DrawnImages(image_size)

    @property
    def num_classes(self) -> int:
        return len(self.styles)

    def describe(self) -> dict:
        return {
            "kind": "builtin",
            "classes": self.num_classes,
            "first_class": self.first_class,
            "train_per_class": self.per_class["train"],
            "test_per_class": self.per_class["test"],
            "image_size": self.image_size,
            "seed": self.seed,
        }

    def samples(self, split: str, labels) -> list[tuple[tuple[int, int], int]]:
        """``(item, label)`` pairs of ``split`` for the given source labels."""
        return [((int(c), i), int(c)) for c in labels for i in range(self.per_class[split])]

    def load(self, split: str, item: tuple[int, int]) -> Image.Image:
        label, index = item

        def draw():
            rng = np.random.default_rng([self.seed, self.first_class + label, _SPLITS[split], index])
            return render(self.styles[label], rng, self.image_size)

        return Image.fromarray(self._drawn.get((split, label, index), draw))


# The built-in dataset as ``care-export train`` uses it: train images calibrate, test images evaluate.
POOL_PER_CLASS = {"train": 60, "test": 20}


def builtin_pool(class_names: list[str], image_size: int, split: str, seed: int = 0) -> dict[int, list]:
    """The built-in dataset's images of an artifact's classes (drawn on demand), by class id.

    A built-in class is named ``<shape>-on-<texture>-<id>``; the name must match the dataset's."""
    import re

    from runtime.errors import InputError

    ids = []
    for name in class_names:
        m = re.fullmatch(r".*-(\d+)", name)
        if not m or int(m.group(1)) >= MAX_CLASSES:
            raise InputError(f"class {name!r} is not a built-in dataset class; pass --calib-data DIR")
        ids.append(int(m.group(1)))
    per = POOL_PER_CLASS[split]
    source = BuiltinSource(max(ids) + 1, train_per_class=per, test_per_class=per, image_size=image_size, seed=seed)
    for name, i in zip(class_names, ids):
        if source.class_names[i] != name:
            raise InputError(
                f"class {name!r} is not the built-in dataset's class {i} ({source.class_names[i]}); "
                f"pass --calib-data DIR"
            )
    return {g: [(lambda i=i, k=k: source.load(split, (i, k))) for k in range(per)] for g, i in enumerate(ids)}
