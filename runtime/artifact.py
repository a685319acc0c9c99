"""The exported artifact: a directory with a static ONNX graph, its weights and a manifest.

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

Crash safety of growth (``runtime.growth``): new slots are written into slots the graph ignores,
then ``state.bin.pending`` and ``manifest.pending.json`` are written, then the state is renamed
into place and the manifest last. A reader that finds a pending manifest matching ``state.bin``
completes that last rename (:func:`read_manifest`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .checkpoint_files import sha256_file
from .errors import ArtifactError
from .outdir import ARTIFACT, fsync_dir  # noqa: F401 - growth imports fsync_dir from here

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

# Reads of the manifest and state.bin before a mismatch is reported (module doc, Artifact).
SNAPSHOT_TRIES = 20

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
    def from_dict(cls, d: dict) -> "Dims":
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
        return {"file": self.file, "offset": self.offset, "shape": list(self.shape), "dtype": self.dtype,
                "role": self.role}


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
        shapes.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv": (d, 3 * d), b + "attn.qkv_bias": (3 * d,),
            b + "attn.proj": (d, d), b + "attn.proj_bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1": (d, dims.mlp_dim), b + "mlp.fc1_bias": (dims.mlp_dim,),
            b + "mlp.fc2": (dims.mlp_dim, d), b + "mlp.fc2_bias": (d,),
        })
    shapes.update({"vit.norm.weight": (d,), "vit.norm.bias": (d,)})
    return shapes


def moe_shapes(dims: Dims) -> dict[str, tuple[tuple, str]]:
    """BR-MoE initializers: name -> (shape, role). See runtime/packing.py for what they hold."""
    d, cap, r = dims.embed_dim, dims.capacity, dims.expert_dim
    wide0, wide = dims.first_classes + r + 1, dims.slot_classes + r + 1
    out = {}
    for i in range(dims.depth):
        b = f"moe.{i}."
        out.update({
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
        })
    return out


def state_shapes(dims: Dims) -> dict[str, tuple[tuple, str]]:
    """Tensors rewritten with every task: name -> (shape, dtype)."""
    d, rs = dims.embed_dim, dims.shared_dim
    out = {"active_tasks": ((), "int64"), "active_classes": ((), "int64"),
           "head.weight": ((d, dims.class_capacity), "float32")}
    for i in range(dims.depth):
        b = f"moe.{i}.shared."
        out.update({b + "down": ((1, rs, d), "float32"), b + "down_bias": ((1, 1, rs), "float32"),
                    b + "up": ((1, rs, d), "float32"), b + "up_bias": ((d,), "float32")})
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
        regions += [(b + "experts.down", task * r, r), (b + "experts.down_bias", task * r, r),
                    (b + "experts.up", task, 1), (b + "experts.up_bias", task, 1)]
        base = router_base(task, dims.capacity)
        regions += [(b + "routers.weight", base, task + 1), (b + "routers.bias", base, task + 1)]
        if task == 0:
            wide0 = dims.first_classes + r + 1
            regions += [(b + "perceptor0.proj", 0, r), (b + "perceptor0.shift", 0, wide0),
                        (b + "perceptor0.bias", 0, dims.first_classes)]
        else:
            regions += [(b + n, task, 1) for n in ("perceptors.proj", "perceptors.shift", "perceptors.bias")]
    return regions


def file_size(specs: dict[str, TensorSpec], file: str) -> int:
    """Size of ``file``: the end of its last tensor."""
    return max(s.offset + s.nbytes for s in specs.values() if s.file == file)


# ---------------------------------------------------------------------- files
def write_json(path: Path, obj) -> None:
    """Write JSON to ``path`` and fsync it (callers rename it into place)."""
    write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def as_stored(data, dtype: str) -> np.ndarray:
    """``data`` as a tensor of dtype ``dtype`` is stored (little-endian).

    Float16 goes through float32 (the value an FP32 artifact holds) and saturates at the largest
    finite half (padding logits of -1e30 become -65504, still probability 0), so that a task
    packed into an FP16 artifact is bit for bit what quantizing the grown FP32 artifact gives."""
    if dtype == "float16":
        data = np.clip(np.asarray(data, np.float32), -FP16_MAX, FP16_MAX)
    return np.asarray(data, dtype=np.dtype(dtype).newbyteorder("<"))


def tensor_file_bytes(file: str, specs: dict[str, TensorSpec], arrays: dict[str, np.ndarray]) -> bytearray:
    """The whole content of tensor file ``file``: every tensor it holds, zero padding between."""
    out = bytearray(file_size(specs, file))
    for s in specs.values():
        if s.file == file:
            a = as_stored(arrays[s.name], s.dtype)
            if a.shape != s.shape:
                raise ArtifactError(f"tensor {s.name}: shape {a.shape}, layout says {s.shape}")
            out[s.offset: s.offset + s.nbytes] = a.tobytes()
    return out


def write_bytes(path: Path, data: bytes | bytearray) -> None:
    """Write ``data`` to ``path`` and fsync it (callers rename it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class Patch:
    """Rows ``[row, row + len(data))`` along axis 0 of tensor ``name`` (a task's part of a stack)."""

    name: str
    row: int
    data: np.ndarray


def patch_bytes(patch: Patch, spec: TensorSpec) -> tuple[int, bytes]:
    """Byte offset in the file and bytes of ``patch``."""
    data = as_stored(patch.data, spec.dtype)
    if data.shape[1:] != spec.shape[1:] or not 0 <= patch.row <= spec.shape[0] - data.shape[0]:
        raise ArtifactError(f"patch of {spec.name}: rows {patch.row}+{data.shape} do not fit {spec.shape}")
    return spec.offset + patch.row * spec.row_bytes, data.tobytes()


def _digest(chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def patches_digest(patches: list[Patch], specs: dict[str, TensorSpec]) -> str:
    """The digest of a task's slot bytes (manifest ``slot_sha256``), from its patches."""
    return _digest(patch_bytes(p, specs[p.name])[1] for p in patches)


def write_patches(path: Path, specs: dict[str, TensorSpec], patches: list[Patch]) -> str:
    """Write ``patches`` into ``path`` in place; return the digest of their bytes."""
    chunks = []
    with open(path, "r+b") as f:
        for p in patches:
            offset, data = patch_bytes(p, specs[p.name])
            f.seek(offset)
            f.write(data)
            chunks.append(data)
        f.flush()
        os.fsync(f.fileno())
    return _digest(chunks)


def file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# ---------------------------------------------------------------------- reading
_REQUIRED = ("dims", "opset", "precision", "batch", "tasks", "classes", "preprocessing", "files", "tensors",
             "source", "backbone", "brmoe")


def _load_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def read_manifest(directory: str | Path) -> dict:
    """The artifact's manifest, checked for format and version.

    Completes an interrupted growth whose new state is already in place (the pending manifest
    matches ``state.bin``); a pending manifest from a growth that stopped earlier is ignored.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(f"artifact not found or not a directory: {directory}")
    manifest = _load_json(path)
    if manifest is None:
        raise ArtifactError(f"{path}: manifest missing or not valid JSON (not a care-export artifact?)")
    pending = _load_json(directory / PENDING_MANIFEST)
    want = pending.get("files", {}).get(STATE_FILE) if pending is not None and isinstance(pending.get("files"), dict) \
        else None
    if isinstance(want, dict) and _is_int(want.get("bytes"), 0) and isinstance(want.get("sha256"), str):
        state = directory / STATE_FILE
        if state.is_file() and state.stat().st_size == want["bytes"] and sha256_file(state) == want["sha256"]:
            if os.access(directory, os.W_OK):
                with contextlib.suppress(FileNotFoundError):  # the growing process got there first
                    os.replace(directory / PENDING_MANIFEST, path)
            manifest = pending
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a care-export artifact manifest")
    version = manifest.get("format_version")
    if not _is_int(version):
        raise ArtifactError(f"{path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} is newer than this reader ({FORMAT_VERSION})")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{path}: manifest lacks '{missing[0]}'")
    check_manifest(manifest, path)
    return manifest


def _is_int(v, low: int = -(1 << 62)) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def check_manifest(m: dict, where: Path) -> None:
    """The manifest's fields hold values of the right types, and agree with each other
    (tasks with dims and class names; every file named with its size, the graph and the state
    with their digests). The state itself is held against ``tasks`` by :class:`Artifact`."""
    def bad(what: str):
        raise ArtifactError(f"{where}: manifest {what}")

    dims, names = m["dims"], {f.name for f in fields(Dims)}
    if not isinstance(dims, dict):
        bad("'dims' is not an object")
    for k in sorted(names - {"in_chans"}):
        if not _is_int(dims.get(k), 1):
            bad(f"dims.{k} is missing or not a positive integer ({dims.get(k)!r})")
    if not _is_int(dims.get("in_chans", 3), 1):
        bad("dims.in_chans is not a positive integer")
    if not (m["batch"] == "dynamic" or _is_int(m["batch"], 1)):
        bad(f"'batch' must be \"dynamic\" or a positive integer, not {m['batch']!r}")
    if not _is_int(m["opset"], 1):
        bad(f"'opset' is not a positive integer ({m['opset']!r})")
    tasks = m["tasks"]
    if not isinstance(tasks, list) or not tasks:
        bad("'tasks' is not a non-empty list")
    for t, e in enumerate(tasks):
        if not isinstance(e, dict) or not _is_int(e.get("classes"), 1) or \
                not all(isinstance(e.get(k), str) for k in ("slot_sha256", "source_sha256")):
            bad(f"task {t} lacks a positive 'classes' or its digests")
    if len(tasks) > dims["capacity"]:
        bad(f"lists {len(tasks)} tasks, more than the capacity {dims['capacity']}")
    if tasks[0]["classes"] != dims["first_classes"] or any(e["classes"] > dims["slot_classes"] for e in tasks[1:]):
        bad("task class counts do not fit dims.first_classes / dims.slot_classes")
    classes = m["classes"]
    if not isinstance(classes, dict) or not isinstance(classes.get("names"), list) or \
            not all(isinstance(n, str) for n in classes["names"]):
        bad("'classes.names' is not a list of names")
    if len(classes["names"]) != sum(e["classes"] for e in tasks):
        bad(f"has {len(classes['names'])} class names for {sum(e['classes'] for e in tasks)} classes")
    files = m["files"]
    if not isinstance(files, dict) or set(files) != {MODEL_FILE, BACKBONE_FILE, SLOTS_FILE, STATE_FILE}:
        bad(f"'files' must name exactly {MODEL_FILE}, {BACKBONE_FILE}, {SLOTS_FILE} and {STATE_FILE}")
    for name, e in files.items():
        if not isinstance(e, dict) or not _is_int(e.get("bytes"), 0):
            bad(f"files.{name} lacks a size in bytes")
        if (name in (MODEL_FILE, STATE_FILE) or "sha256" in e) and not isinstance(e.get("sha256"), str):
            bad(f"files.{name} lacks its sha256")
    if not isinstance(m["tensors"], dict) or not isinstance(m["preprocessing"], dict):
        bad("'tensors' or 'preprocessing' is not an object")
    if not isinstance(m["precision"], str):
        bad("'precision' is not a string")


def read_layout(manifest: dict, dims: Dims, where: Path) -> dict[str, TensorSpec]:
    """The tensor layout of a manifest, checked.

    FP32: exactly :func:`layout`. A reduced-precision rewrite lays its tensors out itself, but
    keeps every growth tensor of :func:`layout` under its name, shape and role (the dtype may
    change; growth writes rows cast to it), and every tensor lies inside its file, aligned to
    ALIGN (SMALL_ALIGN for tensors smaller than ALIGN).
    """
    precision = manifest["precision"]
    if precision not in PRECISIONS:
        raise ArtifactError(f"{where}: unknown precision {precision!r} (this reader knows {', '.join(PRECISIONS)})")
    want = layout(dims)
    if precision == "fp32":
        if manifest["tensors"] != {k: s.to_dict() for k, s in want.items()}:
            raise ArtifactError(f"{where}: tensor layout differs from this reader's (format drift)")
        return want
    try:
        specs = {name: TensorSpec(name, e["file"], int(e["offset"]), tuple(int(n) for n in e["shape"]), e["dtype"],
                                  e["role"]) for name, e in manifest["tensors"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ArtifactError(f"{where}: manifest 'tensors' is malformed") from None
    for name, s in want.items():
        got = specs.get(name)
        if s.role != "backbone" and (got is None or (got.file, got.shape, got.role) != (s.file, s.shape, s.role)):
            raise ArtifactError(f"{where}: growth tensor {name} is missing or laid out differently (format drift)")
    for s in specs.values():
        if s.dtype not in DTYPES or s.file not in manifest["files"] or \
                s.offset % (ALIGN if s.nbytes >= ALIGN else SMALL_ALIGN) or \
                s.offset + s.nbytes > int(manifest["files"][s.file]["bytes"]):
            raise ArtifactError(f"{where}: tensor {s.name} has an invalid place or dtype in the manifest")
    return specs


class Artifact:
    """An artifact directory opened for reading: manifest, sizes and tensor layout."""

    def __init__(self, directory: str | Path, verify: bool = False):
        """Checks every file's presence and size, the digests of the graph and the state, and the
        state's task and class counts against the manifest. ``verify`` also hashes the backbone
        and every active task slot (reads the whole artifact; docs/ARTIFACT.md, "Verification").

        The manifest and the state are read as one snapshot: ``state.bin`` is read into memory
        once and must match the manifest just read; a mismatch while another process grows the
        directory (it renames the new state in, then the new manifest) is read again."""
        self.dir = Path(directory)
        for attempt in range(SNAPSHOT_TRIES):
            self.manifest = read_manifest(self.dir)
            self.dims = Dims.from_dict(self.manifest["dims"])
            self.tensors = read_layout(self.manifest, self.dims, self.dir)
            state, problem = self._read_state()
            if problem is None:
                break
            time.sleep(0.005 * (attempt + 1))
        if problem is not None:
            raise ArtifactError(problem)
        self._state = state
        self._check_counts()
        for name, entry in self.manifest["files"].items():
            path = self.dir / name
            if not path.is_file():
                raise ArtifactError(f"{path}: file missing")
            if path.stat().st_size != entry["bytes"]:
                raise ArtifactError(f"{path}: truncated or altered ({path.stat().st_size} bytes, "
                                    f"manifest says {entry['bytes']})")
            if name != STATE_FILE and "sha256" in entry and (verify or name == MODEL_FILE):
                if sha256_file(path) != entry["sha256"]:
                    raise ArtifactError(f"{path}: corrupt (sha256 differs from the manifest)")
        if verify:
            for t, task in enumerate(self.manifest["tasks"]):
                if self.slot_digest(task_regions(t, self.dims)) != task["slot_sha256"]:
                    raise ArtifactError(f"{self.dir / SLOTS_FILE}: slot of task {t} is corrupt")

    def _read_state(self) -> tuple[bytes | None, str | None]:
        """state.bin's bytes, or the reason they do not match the manifest."""
        path, entry = self.dir / STATE_FILE, self.manifest["files"][STATE_FILE]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, f"{path}: file missing"
        except OSError as exc:
            return None, f"{path}: unreadable ({exc.strerror or exc})"
        if len(data) != entry["bytes"]:
            return None, f"{path}: truncated or altered ({len(data)} bytes, manifest says {entry['bytes']})"
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            return None, f"{path}: corrupt (sha256 differs from the manifest)"
        return data, None

    def _check_counts(self) -> None:
        tasks, classes = int(self.read("active_tasks")), int(self.read("active_classes"))
        if (tasks, classes) != (self.num_tasks, self.num_classes):
            raise ArtifactError(f"{self.dir / MANIFEST}: lists {self.num_tasks} tasks and {self.num_classes} classes, "
                                f"state.bin holds {tasks} and {classes}")

    @property
    def num_tasks(self) -> int:
        return len(self.manifest["tasks"])

    @property
    def num_classes(self) -> int:
        return sum(t["classes"] for t in self.manifest["tasks"])

    @property
    def model_path(self) -> Path:
        return self.dir / MODEL_FILE

    def read(self, name: str) -> np.ndarray:
        """One initializer's value (read-only: a memory map, or the state snapshot)."""
        s = self.tensors[name]
        if s.file == STATE_FILE:  # the snapshot read with the manifest
            return np.frombuffer(self._state, dtype=np.dtype(s.dtype).newbyteorder("<"), offset=s.offset,
                                 count=int(np.prod(s.shape, dtype=np.int64))).reshape(s.shape)
        return np.memmap(self.dir / s.file, dtype=np.dtype(s.dtype).newbyteorder("<"), mode="r", offset=s.offset,
                         shape=s.shape)

    def slot_digest(self, regions: list[tuple[str, int, int]]) -> str:
        """Digest of the bytes of ``regions`` ``(tensor, first row, rows)`` in slots.bin."""
        return regions_digest(self.dir / SLOTS_FILE, self.tensors, regions)


def regions_digest(path: Path, specs: dict[str, TensorSpec], regions: list[tuple[str, int, int]]) -> str:
    """Digest of the bytes of ``regions`` ``(tensor, first row, rows)`` in the tensor file ``path``."""
    chunks = []
    with open(path, "rb") as f:
        for name, row, rows in regions:
            s = specs[name]
            f.seek(s.offset + row * s.row_bytes)
            chunks.append(f.read(rows * s.row_bytes))
    return _digest(chunks)
