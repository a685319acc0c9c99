"""Reading a care-export checkpoint directory with numpy only (no torch).

The exporter and in-place growth (``add-task``, ``Session.add_task``) read checkpoints through
this module, so that an edge box can take a new task without PyTorch. The directory format is
described in ``care_export/checkpoint/format.py``; this reader checks the parts growth relies on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import CheckpointError

CHECKPOINT_FORMAT = "care-export-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
_KEYS = ("backbone", "brmoe", "tasks", "head", "shared", "preprocessing", "classes")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint_manifest(directory: str | Path) -> dict:
    """The manifest of checkpoint ``directory``, checked for format, version and keys."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint not found or not a directory: {directory}")
    if not path.is_file():
        raise CheckpointError(f"{path}: manifest missing (not a care-export checkpoint?)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a care-export checkpoint manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r} is not an integer")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this reader ({CHECKPOINT_FORMAT_VERSION})"
        )
    missing = [k for k in _KEYS if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: manifest lacks '{missing[0]}'")
    if not isinstance(manifest["tasks"], list) or not manifest["tasks"]:
        raise CheckpointError(f"{directory}: checkpoint has no task")
    _check_fields(manifest, path)
    return manifest


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_entry(entry, what: str, path: Path) -> None:
    """A file entry: a plain file name inside the directory, its size and digest."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("file"), str)
        or not isinstance(entry.get("sha256"), str)
        or not isinstance(entry.get("bytes"), int)
    ):
        raise CheckpointError(f"{path}: {what} lacks its file, sha256 or bytes")
    name = entry["file"]
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise CheckpointError(f"{path}: {what} names {name!r}, not a file of the checkpoint directory")


def _check_fields(m: dict, path: Path) -> None:
    """Types and agreement of the fields growth and export rely on (files, class counts, names)."""
    for key in ("backbone", "brmoe", "head", "shared", "preprocessing", "classes"):
        if not isinstance(m[key], dict):
            raise CheckpointError(f"{path}: manifest '{key}' is not an object")
    for key in ("backbone", "head", "shared"):
        _check_entry(m[key], key, path)
    for t, e in enumerate(m["tasks"]):
        _check_entry(e, f"task {t}", path)
        if not _is_count(e.get("classes")):
            raise CheckpointError(f"{path}: task {t} 'classes' is not a positive integer ({e.get('classes')!r})")
    for key in ("embed_dim", "depth", "num_heads", "img_size", "patch_size"):
        if not _is_count(m["backbone"].get(key)):
            raise CheckpointError(f"{path}: backbone.{key} is not a positive integer ({m['backbone'].get(key)!r})")
    for key in ("topk_routers", "topk_experts", "expert_dim", "shared_dim"):
        if not _is_count(m["brmoe"].get(key)):
            raise CheckpointError(f"{path}: brmoe.{key} is not a positive integer ({m['brmoe'].get(key)!r})")
    names = m["classes"].get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: classes.names is not a list of names")
    total = sum(e["classes"] for e in m["tasks"])
    if len(names) != total:
        raise CheckpointError(f"{path}: {len(names)} class names for {total} classes")


def checkpoint_digest(manifest: dict) -> str:
    """The digest naming a checkpoint's content (same definition as ``care_export.checkpoint.format``)."""
    m = manifest
    parts = [m["backbone"]["sha256"], m["shared"]["sha256"], m["head"]["sha256"]] + [t["sha256"] for t in m["tasks"]]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def check_file(directory: str | Path, entry: dict, verify: bool = True) -> Path:
    """The path of a checkpoint file (a manifest entry), checked for presence, size and digest."""
    _check_entry(entry, "manifest entry", Path(directory) / "manifest.json")  # a plain name, never ../x
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    if path.stat().st_size != entry["bytes"]:
        raise CheckpointError(
            f"{path}: truncated or altered ({path.stat().st_size} bytes, manifest says {entry['bytes']})"
        )
    if verify and sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupt (sha256 differs from the manifest)")
    return path


def load_tensors(directory: str | Path, entry: dict, verify: bool = True) -> dict[str, np.ndarray]:
    """The tensors of one checkpoint file (a manifest entry), size- and optionally sha-checked."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = check_file(directory, entry, verify)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    require_finite(tensors, str(path))
    return tensors


def require_finite(tensors: dict, where: str) -> None:
    """Refuse NaN or Inf weights, naming the first tensor that holds one (numpy or torch tensors)."""
    for name, t in tensors.items():
        if hasattr(t, "is_floating_point"):  # torch (duck-typed: the runtime never imports it)
            bad = int((~t.isfinite()).sum()) if t.is_floating_point() else 0
        else:
            bad = int(np.size(t) - np.isfinite(t).sum()) if np.asarray(t).dtype.kind == "f" else 0
        if bad:
            raise CheckpointError(f"{where}: tensor {name} holds {bad} NaN or Inf values")


def check_state(tensors: dict, expected: dict[str, tuple], where: str, *, allow_extra: bool = False) -> None:
    """The one check of loaded weights (numpy or torch tensors) against the shapes a model expects:
    every expected tensor present with its shape and, unless ``allow_extra``, nothing else."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: lacks weights for {missing[0]} ({len(missing)} missing)")
    extra = [] if allow_extra else sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: holds weights the model cannot place, e.g. {extra[0]}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise CheckpointError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {tuple(shape)}")


def require(tensors: dict[str, np.ndarray], key: str, shape: tuple, where: str) -> np.ndarray:
    """``tensors[key]`` with the expected shape, or a CheckpointError naming the file."""
    if key not in tensors:
        raise CheckpointError(f"{where}: lacks tensor {key}")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t
