"""The artifact's layout: what lies where in an artifact directory, fixed by :class:`Dims`.

::

    model/
      manifest.json   format, sizes, tasks and classes, preprocessing, file digests, tensor layout
      model.onnx      the graph; every initializer that growth may change is external data
      backbone.bin    frozen ViT weights (never change)
      slots.bin       per-task tensors padded to the capacity; a new task is written into its
                      unused slot in place
      state.bin       small tensors that change with every task: active task and class counts,
                      shared experts, cosine head; rewritten whole (temp name, then rename)

The graph and the layout depend on :class:`Dims` only, never on the number of learned tasks, so
growth never touches ``model.onnx``. docs/ARTIFACT.md describes the format for readers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .outdir import ARTIFACT

FORMAT = ARTIFACT
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PENDING_MANIFEST = "manifest.pending.json"
MODEL_FILE = "model.onnx"
BACKBONE_FILE = "backbone.bin"
SLOTS_FILE = "slots.bin"
STATE_FILE = "state.bin"
PENDING_STATE = "state.bin.pending"

INPUT = "images"
LOGITS = "logits"
SCORES = "scores"  # output of an iterative-prediction graph (manifest "predict": "iterative")
ROUTING_TASKS = "routing_tasks"
ROUTING_EXPERTS = "routing_experts"
FEATURES = "features"  # output of a plain-backbone graph (benchmarks)


def score_output(manifest: dict) -> str:
    """The output classes are ranked by: ``scores`` of an iterative artifact, else ``logits``."""
    return SCORES if manifest.get("predict") == "iterative" else LOGITS


# Every tensor starts at a multiple of 64 KiB: ONNX Runtime memory-maps external data only at
# offsets aligned to the page size (4 KiB on Linux, 64 KiB allocation granularity on Windows).
ALIGN = 1 << 16
# Reduced-precision artifacts pack tensors smaller than ALIGN at this alignment instead.
SMALL_ALIGN = 64

# What ``precision`` may say. FP32 is the exporter's; FP16 and INT8 are rewrites by
# ``care-export quantize`` (docs/CALIBRATION.md), whose tensor layout is the manifest's own.
PRECISIONS = ("fp32", "fp16", "int8")
DTYPES = ("float32", "float16", "int8", "int64")
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Dims:
    """Everything that fixes the graph and the tensor layout (never the learned task count)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    img_size: int
    patch_size: int
    capacity: int  # task slots
    expert_dim: int  # r
    shared_dim: int  # r_s
    topk_routers: int  # M
    topk_experts: int  # K
    first_classes: int  # classes of task 0 (kept apart from the slot stack)
    slot_classes: int  # classes a later task may have at most
    in_chans: int = 3

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2 + 1

    @property
    def class_capacity(self) -> int:
        return self.first_classes + (self.capacity - 1) * self.slot_classes

    @property
    def router_rows(self) -> int:
        """Rows of the packed router table: router t shares a row with router capacity-1-t."""
        return (self.capacity + 1) // 2 * (self.capacity + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Dims:
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})


def router_base(task: int, capacity: int) -> int:
    """First row of router ``task`` (``task + 1`` rows, one per expert it scores) in the packed table.

    Row pair j holds router j in columns [0, j+1) and router capacity-1-j in [j+1, capacity+1):
    the quadratic router weights are stored once, not padded to capacity x capacity.
    """
    if 2 * task <= capacity - 1:
        return task * (capacity + 1)
    j = capacity - 1 - task
    return j * (capacity + 1) + j + 1


@dataclass(frozen=True)
class TensorSpec:
    """Where an initializer lives: file, byte offset, shape, dtype, and its role in growth."""

    name: str
    file: str
    offset: int
    shape: tuple
    dtype: str  # "float32" or "int64"; reduced-precision artifacts also "float16" and "int8"
    role: str  # backbone | first | slot | router | state

    @functools.cached_property  # read for every region a digest covers: tens of thousands at 301 tasks
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @functools.cached_property
    def row_bytes(self) -> int:
        """Bytes of one index along axis 0 (the slot axis of slot tensors)."""
        return self.nbytes // self.shape[0] if self.shape else self.nbytes

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "offset": self.offset,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "role": self.role,
        }


def backbone_shapes(dims: Dims) -> dict[str, tuple]:
    """Backbone initializers in graph layout (projections as (in, out))."""
    d, p = dims.embed_dim, dims.patch_size
    shapes = {
        "vit.patch_embed.weight": (d, dims.in_chans, p, p),
        "vit.patch_embed.bias": (d,),
        "vit.cls_token": (1, 1, d),
        "vit.pos_embed": (1, dims.num_tokens, d),
    }
    for i in range(dims.depth):
        b = f"vit.blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv": (d, 3 * d),
                b + "attn.qkv_bias": (3 * d,),
                b + "attn.proj": (d, d),
                b + "attn.proj_bias": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1": (d, dims.mlp_dim),
                b + "mlp.fc1_bias": (dims.mlp_dim,),
                b + "mlp.fc2": (dims.mlp_dim, d),
                b + "mlp.fc2_bias": (d,),
            }
        )
    shapes.update({"vit.norm.weight": (d,), "vit.norm.bias": (d,)})
    return shapes


def moe_shapes(dims: Dims) -> dict[str, tuple[tuple, str]]:
    """BR-MoE initializers: name -> (shape, role). See runtime/packing.py for what they hold."""
    d, cap, r = dims.embed_dim, dims.capacity, dims.expert_dim
    wide0, wide = dims.first_classes + r + 1, dims.slot_classes + r + 1
    out = {}
    for i in range(dims.depth):
        b = f"moe.{i}."
        out.update(
            {
                b + "experts.down": ((cap * r, d), "slot"),
                b + "experts.down_bias": ((cap * r,), "slot"),
                b + "experts.up": ((cap, r, d), "slot"),
                b + "experts.up_bias": ((cap, 1, d), "slot"),
                b + "perceptors.proj": ((cap, r, wide), "slot"),
                b + "perceptors.shift": ((cap, 1, wide), "slot"),
                b + "perceptors.bias": ((cap, 1, dims.slot_classes), "slot"),
                b + "perceptor0.proj": ((r, wide0), "first"),
                b + "perceptor0.shift": ((wide0,), "first"),
                b + "perceptor0.bias": ((dims.first_classes,), "first"),
                b + "routers.weight": ((dims.router_rows, r), "router"),
                b + "routers.bias": ((dims.router_rows,), "router"),
            }
        )
    return out


def state_shapes(dims: Dims) -> dict[str, tuple[tuple, str]]:
    """Tensors rewritten with every task: name -> (shape, dtype)."""
    d, rs = dims.embed_dim, dims.shared_dim
    out = {
        "active_tasks": ((), "int64"),
        "active_classes": ((), "int64"),
        "head.weight": ((d, dims.class_capacity), "float32"),
    }
    for i in range(dims.depth):
        b = f"moe.{i}.shared."
        out.update(
            {
                b + "down": ((1, rs, d), "float32"),
                b + "down_bias": ((1, 1, rs), "float32"),
                b + "up": ((1, rs, d), "float32"),
                b + "up_bias": ((d,), "float32"),
            }
        )
    return out


def _place(entries, file: str) -> list[TensorSpec]:
    specs, offset = [], 0
    for name, shape, dtype, role in entries:
        spec = TensorSpec(name, file, offset, tuple(shape), dtype, role)
        specs.append(spec)
        offset = -(-(offset + spec.nbytes) // ALIGN) * ALIGN
    return specs


def layout(dims: Dims, moe: bool = True) -> dict[str, TensorSpec]:
    """Every external initializer of the graph, by name. ``moe=False``: the plain backbone."""
    specs = _place([(n, s, "float32", "backbone") for n, s in backbone_shapes(dims).items()], BACKBONE_FILE)
    if moe:
        specs += _place([(n, s, "float32", role) for n, (s, role) in moe_shapes(dims).items()], SLOTS_FILE)
        specs += _place([(n, s, dt, "state") for n, (s, dt) in state_shapes(dims).items()], STATE_FILE)
    return {s.name: s for s in specs}


def task_regions(task: int, dims: Dims) -> list[tuple[str, int, int]]:
    """What task ``task`` occupies in slots.bin, in a fixed order: ``(tensor, first row, rows)``.

    Task 0 has its own perceptor tensors; its rows in the perceptor stacks stay zero."""
    r, regions = dims.expert_dim, []
    for i in range(dims.depth):
        b = f"moe.{i}."
        regions += [
            (b + "experts.down", task * r, r),
            (b + "experts.down_bias", task * r, r),
            (b + "experts.up", task, 1),
            (b + "experts.up_bias", task, 1),
        ]
        base = router_base(task, dims.capacity)
        regions += [(b + "routers.weight", base, task + 1), (b + "routers.bias", base, task + 1)]
        if task == 0:
            wide0 = dims.first_classes + r + 1
            regions += [
                (b + "perceptor0.proj", 0, r),
                (b + "perceptor0.shift", 0, wide0),
                (b + "perceptor0.bias", 0, dims.first_classes),
            ]
        else:
            regions += [(b + n, task, 1) for n in ("perceptors.proj", "perceptors.shift", "perceptors.bias")]
    return regions


def file_size(specs: dict[str, TensorSpec], file: str) -> int:
    """Size of ``file``: the end of its last tensor."""
    return max(s.offset + s.nbytes for s in specs.values() if s.file == file)
