"""The built-in shifted sequence (``--data builtin-shift``): a real domain shift from pre-training.

The built-in backbone is pre-trained on built-in classes (``builtin.py``): shapes such as
discs and squares on stripes, checkers or dots, in a fixed palette. Its frozen features already
separate every class of the ``builtin`` sequence. This source draws from other families instead
(shapes and textures the pre-training never shows, colours off its palette), and every task
renders its classes in its own *domain*: a palette of four colours and a geometric warp of the whole
image, drawn once per task. Within a task every class is the same template (shape, texture, layout)
turned by its own hue: class ``k`` of a task of ``n`` classes rotates every colour of the image by
``k / n`` of a turn about the grey axis. The backbone that ``builtin-shift`` trains on is pre-trained
to ignore hue (``pretrain.SHIFT_PRETRAIN``), so its final features tell the task (the template) but
hardly the class; its early tokens, which the BR-MoE's adapters read, still carry the colours.

Domains follow the task layout (``init_cls``, ``increment``, class-order ``order_seed``) of the
sequence the source is made for, so each task of that sequence is one domain. Images are drawn on
the fly from ``(seed, class id, split, index)``, as for ``builtin``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .drawn import DrawnImages

SHIFT_SHAPES = ("hexagon", "crescent", "heart", "arrow", "ellipse", "hourglass")
SHIFT_TEXTURES = ("waves", "grid", "blobs", "spiral", "bricks", "zigzag")
_SPLITS = {"train": 0, "test": 1}
# Offsets that keep this source's random streams apart from builtin.py's.
_STYLE_STREAM, _DOMAIN_STREAM, _IMAGE_STREAM = 7001, 7002, 7003


def hue_rotation(angle: float) -> np.ndarray:
    """The 3x3 rotation of RGB colours by ``angle`` (radians) about the grey axis: a hue turn."""
    c, s = np.cos(angle), np.sin(angle)
    grey = np.full((3, 3), 1 / 3)
    cross = np.array([[0.0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3)
    return c * (np.eye(3) - grey) + grey + s * cross


class ShiftStyle:
    """The template of one task's classes: drawn once from ``(seed, task)``."""

    def __init__(self, seed: int, task: int):
        rng = np.random.default_rng([_STYLE_STREAM, seed, task])
        self.shape = int(rng.integers(len(SHIFT_SHAPES)))
        self.texture = int(rng.integers(len(SHIFT_TEXTURES)))
        self.freq = rng.uniform(2.5, 5.5)
        self.center = rng.uniform(0.35, 0.65, 2)
        self.radius = rng.uniform(0.2, 0.3)
        self.angle = rng.uniform(0, 2 * np.pi)
        self.roles = rng.permutation(4)[:3]  # which domain colours paint shape, background, texture

    @property
    def name(self) -> str:
        return f"{SHIFT_SHAPES[self.shape]}-on-{SHIFT_TEXTURES[self.texture]}"


class Domain:
    """What one task does to all its images: its colours and an affine warp of the image.

    The palette's colours are saturated (hue, saturation 0.6-0.95, value 0.55-0.95), so that a hue
    turn changes every pixel of the image.
    """

    def __init__(self, seed: int, domain: int):
        from colorsys import hsv_to_rgb

        rng = np.random.default_rng([_DOMAIN_STREAM, seed, domain])
        hsv = np.stack([rng.uniform(0, 1, 4), rng.uniform(0.6, 0.95, 4), rng.uniform(0.55, 0.95, 4)], 1)
        self.palette = np.array([hsv_to_rgb(*c) for c in hsv])
        self.contrast = rng.uniform(0.6, 1.2)
        # Warp of the image coordinates: rotation, anisotropic scale and shear about the centre.
        a = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        self.warp = rot @ np.array([[rng.uniform(0.7, 1.4), rng.uniform(-0.4, 0.4)], [0.0, rng.uniform(0.7, 1.4)]])

    def colours(self, roles, rng: np.random.Generator) -> np.ndarray:
        """Shape, background and texture colours of one image painted with ``roles``."""
        return self.palette[roles] + rng.normal(0, 0.05, (3, 3))


def _texture(kind: int, u, v, freq: float, phase: float):
    name = SHIFT_TEXTURES[kind]
    two_pi = 2 * np.pi
    if name == "waves":  # smooth sinusoid bent by a second one
        return 0.5 + 0.5 * np.sin(two_pi * (freq * v + 0.4 * np.sin(two_pi * (u + phase))))
    if name == "grid":  # thin lines
        gu, gv = (freq * u + phase) % 1, (freq * v + phase) % 1
        return ((gu < 0.18) | (gv < 0.18)).astype(np.float32)
    if name == "blobs":  # low-frequency interference
        return 0.5 + 0.25 * (np.sin(two_pi * (freq * 0.6 * u + phase)) + np.cos(two_pi * (freq * 0.7 * v - phase)))
    if name == "spiral":
        r, t = np.hypot(u - 0.5, v - 0.5), np.arctan2(v - 0.5, u - 0.5)
        return (np.sin(two_pi * freq * r + 3 * t + two_pi * phase) > 0).astype(np.float32)
    if name == "bricks":
        row = np.floor(freq * v + phase)
        gu = (freq * u + 0.5 * (row % 2)) % 1
        return (((freq * v + phase) % 1 < 0.15) | (gu < 0.12)).astype(np.float32)
    tri = np.abs(((freq * u + phase) % 1) - 0.5) * 2  # zigzag
    return (((freq * v + 0.5 * tri) % 1) < 0.5).astype(np.float32)


def _shape_mask(kind: int, x, y, radius: float):
    name = SHIFT_SHAPES[kind]
    r = np.hypot(x, y)
    if name == "hexagon":
        d = np.max([x * np.cos(a) + y * np.sin(a) for a in np.arange(6) * np.pi / 3], axis=0) - radius * 0.85
    elif name == "crescent":
        d = np.maximum(r - radius, radius * 0.8 - np.hypot(x - radius * 0.45, y))
    elif name == "heart":
        yy = -y + 0.35 * radius
        d = np.hypot(x, yy - np.sqrt(np.abs(x)) * np.sqrt(radius) * 0.9) - radius * 0.8
    elif name == "arrow":
        head = np.maximum(np.abs(y) + x * 0.9 - radius * 0.6, -x)
        shaft = np.maximum(np.abs(y) - radius * 0.2, np.maximum(x, -x - radius))
        d = np.minimum(head, shaft)
    elif name == "ellipse":
        d = np.hypot(x / 1.6, y / 0.6) - radius * 0.7
    else:  # hourglass: two triangles meeting at the centre
        d = np.maximum(np.abs(x) - np.abs(y) * 0.9, np.abs(y) - radius)
    return np.clip(0.5 - d * 32, 0.0, 1.0)


def render_shifted(
    style: ShiftStyle, domain: Domain, rng: np.random.Generator, size: int, hue: float = 0.0
) -> np.ndarray:
    """One image of ``style`` in ``domain``, its colours turned by ``hue`` (radians), as ``size x
    size x 3`` uint8, deviations from ``rng``."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    v, u = np.meshgrid(coords, coords, indexing="ij")
    uw, vw = np.einsum("ij,jhw->ihw", domain.warp, np.stack([u - 0.5, v - 0.5])) + 0.5
    fg, bg0, bg1 = domain.colours(style.roles, rng)
    tex = _texture(style.texture, uw, vw, style.freq * rng.uniform(0.85, 1.15), rng.uniform())[..., None]
    img = bg0 + (bg1 - bg0) * tex

    cx, cy = style.center + rng.normal(0, 0.08, 2)
    angle = style.angle + rng.normal(0, 0.35)
    x, y = uw - cx, vw - cy
    xr, yr = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
    mask = _shape_mask(style.shape, xr, yr, style.radius * rng.uniform(0.8, 1.2))[..., None]
    img = img * (1 - mask) + fg * mask
    img = ((img - 0.5) * domain.contrast + 0.5) * rng.uniform(0.85, 1.15) + rng.normal(0, 0.05, img.shape)
    img = (img - 0.5) @ hue_rotation(hue).T + 0.5
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


class ShiftedSource:
    """``num_classes`` classes of the shifted families; class ``c`` lives in the domain of the task
    that learns it in the sequence ``(init_cls, increment, order_seed)``, and is that task's
    template turned by its own hue."""

    kind = "builtin-shift"

    def __init__(
        self,
        num_classes: int,
        *,
        init_cls: int = 10,
        increment: int = 10,
        order_seed: int | None = None,
        train_per_class: int = 60,
        test_per_class: int = 20,
        image_size: int = 32,
        seed: int = 0,
    ):
        from runtime.errors import CareError

        from . import DEFAULT_SEED
        from .sources import TaskSequence

        if not 1 <= num_classes <= 1000:
            raise CareError(f"the built-in shifted dataset has up to 1000 classes, asked for {num_classes}")
        if min(train_per_class, test_per_class) < 1 or image_size < 8:
            raise CareError("built-in dataset: images per class must be positive and the image size at least 8")
        self.order_seed = DEFAULT_SEED if order_seed is None else order_seed
        seq = TaskSequence.build(num_classes, init_cls, increment, self.order_seed)
        self.init_cls, self.increment = init_cls, increment
        self.domain_of = [0] * num_classes
        self.hue_of = [0.0] * num_classes  # the class's hue turn within its task, in radians
        hue_index = [0] * num_classes
        for t in range(seq.num_tasks):
            members = seq.classes(t)
            for k, g in enumerate(members):
                c = seq.order[g]
                self.domain_of[c], hue_index[c] = t, k
                self.hue_of[c] = 2 * np.pi * k / len(members)
        self.domains = [Domain(seed, t) for t in range(seq.num_tasks)]
        self.templates = [ShiftStyle(seed, t) for t in range(seq.num_tasks)]
        self.per_class = {"train": train_per_class, "test": test_per_class}
        self.image_size, self.seed = image_size, seed
        self.styles = [self.templates[t] for t in self.domain_of]
        self.class_names = [f"{s.name}-h{hue_index[c]}-d{self.domain_of[c]}-{c}" for c, s in enumerate(self.styles)]
        self._drawn = DrawnImages(image_size)

    @property
    def num_classes(self) -> int:
        return len(self.styles)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "classes": self.num_classes,
            "init_cls": self.init_cls,
            "increment": self.increment,
            "order_seed": self.order_seed,
            "train_per_class": self.per_class["train"],
            "test_per_class": self.per_class["test"],
            "image_size": self.image_size,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShiftedSource:
        return cls(
            d["classes"],
            init_cls=d["init_cls"],
            increment=d["increment"],
            order_seed=d["order_seed"],
            train_per_class=d["train_per_class"],
            test_per_class=d["test_per_class"],
            image_size=d["image_size"],
            seed=d["seed"],
        )

    def samples(self, split: str, labels) -> list[tuple[tuple[int, int], int]]:
        return [((int(c), i), int(c)) for c in labels for i in range(self.per_class[split])]

    def load(self, split: str, item: tuple[int, int]) -> Image.Image:
        label, index = item

        def draw():
            rng = np.random.default_rng([_IMAGE_STREAM, self.seed, label, _SPLITS[split], index])
            style, domain = self.styles[label], self.domains[self.domain_of[label]]
            return render_shifted(style, domain, rng, self.image_size, self.hue_of[label])

        return Image.fromarray(self._drawn.get((split, label, index), draw))
