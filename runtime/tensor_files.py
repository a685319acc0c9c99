"""The bytes of the artifact's tensor files (backbone.bin, slots.bin, state.bin): tensors as
stored, whole files, a task's patches of the slot stacks, and digests of byte regions."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint_files import sha256_file
from .errors import ArtifactError
from .layout import FP16_MAX, TensorSpec, file_size


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
            out[s.offset : s.offset + s.nbytes] = a.tobytes()
    return out


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


def regions_digest(path: Path, specs: dict[str, TensorSpec], regions: list[tuple[str, int, int]]) -> str:
    """Digest of the bytes of ``regions`` ``(tensor, first row, rows)`` in the tensor file ``path``."""
    chunks = []
    with open(path, "rb") as f:
        for name, row, rows in regions:
            s = specs[name]
            f.seek(s.offset + row * s.row_bytes)
            chunks.append(f.read(rows * s.row_bytes))
    return _digest(chunks)


def file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}
