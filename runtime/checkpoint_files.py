"""Reading a care-export checkpoint directory with numpy only (no torch).

The exporter and in-place growth (``add-task``, ``Session.add_task``) read checkpoints through
this module, so that an edge box can take a new task without PyTorch. The directory format is
described in ``care_export/checkpoint.py``; this reader checks the parts growth relies on.
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
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this reader "
                              f"({CHECKPOINT_FORMAT_VERSION})")
    missing = [k for k in _KEYS if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: manifest lacks '{missing[0]}'")
    if not manifest["tasks"]:
        raise CheckpointError(f"{directory}: checkpoint has no task")
    return manifest


def checkpoint_digest(manifest: dict) -> str:
    """The digest naming a checkpoint's content (same definition as ``care_export.checkpoint``)."""
    m = manifest
    parts = [m["backbone"]["sha256"], m["shared"]["sha256"], m["head"]["sha256"]] + [t["sha256"] for t in m["tasks"]]
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def check_file(directory: str | Path, entry: dict, verify: bool = True) -> Path:
    """The path of a checkpoint file (a manifest entry), checked for presence, size and digest."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    if path.stat().st_size != entry["bytes"]:
        raise CheckpointError(f"{path}: truncated or altered ({path.stat().st_size} bytes, manifest says {entry['bytes']})")
    if verify and sha256_file(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupt (sha256 differs from the manifest)")
    return path


def load_tensors(directory: str | Path, entry: dict, verify: bool = True) -> dict[str, np.ndarray]:
    """The tensors of one checkpoint file (a manifest entry), size- and optionally sha-checked."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = check_file(directory, entry, verify)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def require(tensors: dict[str, np.ndarray], key: str, shape: tuple, where: str) -> np.ndarray:
    """``tensors[key]`` with the expected shape, or a CheckpointError naming the file."""
    if key not in tensors:
        raise CheckpointError(f"{where}: lacks tensor {key}")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{where}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t
