"""The exported artifact opened for reading (:class:`Artifact`): the manifest and the state as one
snapshot, every file's presence, size and digest checked. What lies where is
:mod:`runtime.layout`; how the manifest is read and checked, :mod:`runtime.manifest`; the bytes
of the tensor files, :mod:`runtime.tensor_files`.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

from .checkpoint_files import sha256_file
from .errors import ArtifactError
from .layout import MANIFEST, MODEL_FILE, SLOTS_FILE, STATE_FILE, Dims, task_regions
from .manifest import read_layout, read_manifest
from .tensor_files import regions_digest

# Reads of the manifest and state.bin before a mismatch is reported (module doc, Artifact).
SNAPSHOT_TRIES = 20


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
                raise ArtifactError(
                    f"{path}: truncated or altered ({path.stat().st_size} bytes, manifest says {entry['bytes']})"
                )
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
            raise ArtifactError(
                f"{self.dir / MANIFEST}: lists {self.num_tasks} tasks and {self.num_classes} classes, "
                f"state.bin holds {tasks} and {classes}"
            )

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
            if self._state is None:
                raise ArtifactError(f"{self.dir}: {STATE_FILE} was not read")
            return np.frombuffer(
                self._state,
                dtype=np.dtype(s.dtype).newbyteorder("<"),
                offset=s.offset,
                count=int(np.prod(s.shape, dtype=np.int64)),
            ).reshape(s.shape)
        return np.memmap(
            self.dir / s.file, dtype=np.dtype(s.dtype).newbyteorder("<"), mode="r", offset=s.offset, shape=s.shape
        )

    def slot_digest(self, regions: list[tuple[str, int, int]]) -> str:
        """Digest of the bytes of ``regions`` ``(tensor, first row, rows)`` in slots.bin."""
        return regions_digest(self.dir / SLOTS_FILE, self.tensors, regions)
