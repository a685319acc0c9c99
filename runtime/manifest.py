"""Reading an artifact's manifest and checking it: format and version, field types, agreement
between its parts, and the tensor layout it lists.

Crash safety of growth (``runtime.growth``): new slots are written into slots the graph ignores,
then ``state.bin.pending`` and ``manifest.pending.json`` are written, then the state is renamed
into place and the manifest last. A reader that finds a pending manifest matching ``state.bin``
completes that last rename (:func:`read_manifest`).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import TypeGuard

from .checkpoint_files import sha256_file
from .errors import ArtifactError
from .layout import (
    ALIGN,
    BACKBONE_FILE,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    PENDING_MANIFEST,
    PRECISIONS,
    SLOTS_FILE,
    SMALL_ALIGN,
    STATE_FILE,
    Dims,
    TensorSpec,
    layout,
)

_REQUIRED = (
    "dims",
    "opset",
    "precision",
    "batch",
    "tasks",
    "classes",
    "preprocessing",
    "files",
    "tensors",
    "source",
    "backbone",
    "brmoe",
)


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
    want = (
        pending.get("files", {}).get(STATE_FILE)
        if pending is not None and isinstance(pending.get("files"), dict)
        else None
    )
    if (
        pending is not None
        and isinstance(want, dict)
        and _is_int(want.get("bytes"), 0)
        and isinstance(want.get("sha256"), str)
    ):
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


def _is_int(v: object, low: int = -(1 << 62)) -> TypeGuard[int]:
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
        if (
            not isinstance(e, dict)
            or not _is_int(e.get("classes"), 1)
            or not all(isinstance(e.get(k), str) for k in ("slot_sha256", "source_sha256"))
        ):
            bad(f"task {t} lacks a positive 'classes' or its digests")
    if len(tasks) > dims["capacity"]:
        bad(f"lists {len(tasks)} tasks, more than the capacity {dims['capacity']}")
    if tasks[0]["classes"] != dims["first_classes"] or any(e["classes"] > dims["slot_classes"] for e in tasks[1:]):
        bad("task class counts do not fit dims.first_classes / dims.slot_classes")
    classes = m["classes"]
    if (
        not isinstance(classes, dict)
        or not isinstance(classes.get("names"), list)
        or not all(isinstance(n, str) for n in classes["names"])
    ):
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
        specs = {
            name: TensorSpec(
                name, e["file"], int(e["offset"]), tuple(int(n) for n in e["shape"]), e["dtype"], e["role"]
            )
            for name, e in manifest["tensors"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ArtifactError(f"{where}: manifest 'tensors' is malformed") from None
    for name, s in want.items():
        got = specs.get(name)
        if s.role != "backbone" and (got is None or (got.file, got.shape, got.role) != (s.file, s.shape, s.role)):
            raise ArtifactError(f"{where}: growth tensor {name} is missing or laid out differently (format drift)")
    for s in specs.values():
        if (
            s.dtype not in DTYPES
            or s.file not in manifest["files"]
            or s.offset % (ALIGN if s.nbytes >= ALIGN else SMALL_ALIGN)
            or s.offset + s.nbytes > int(manifest["files"][s.file]["bytes"])
        ):
            raise ArtifactError(f"{where}: tensor {s.name} has an invalid place or dtype in the manifest")
    return specs
