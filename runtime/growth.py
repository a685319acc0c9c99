"""Growth in place: a checkpoint's new tasks go into an artifact's unused slots; the graph stays.

:func:`plan_growth` checks that the checkpoint belongs to the artifact and packs everything that
changes (in memory, numpy only); :func:`apply_growth` writes it crash-safely:

1. new tasks' patches into slots.bin, in place: those slots are beyond the active task count,
   so the graph ignores them whatever they hold;
2. ``state.bin.pending`` and ``manifest.pending.json`` (fsynced);
3. rename the state into place (the graph now sees the new tasks), then the manifest (commit).

Any failure before step 3 leaves an artifact that computes what it did; a crash between the two
renames is completed by the next :func:`~runtime.manifest.read_manifest`. Every check runs before
step 1, so a refused checkpoint leaves the artifact byte for byte as it was.

A running ONNX Runtime session keeps its own copy of the state (``state.bin`` is replaced by a
rename, never rewritten), so it goes on answering with the old tasks until a new session is made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .atomic import write_bytes, write_json
from .checkpoint_files import checkpoint_digest, load_tensors, read_checkpoint_manifest, sha256_file
from .errors import ArtifactError, CapacityError, MismatchError
from .layout import MANIFEST, PENDING_MANIFEST, PENDING_STATE, SLOTS_FILE, STATE_FILE
from .outdir import ARTIFACT, fsync_dir, output_dir
from .packing import check_task_classes, pack_state, pack_task
from .tensor_files import Patch, as_stored, patches_digest, tensor_file_bytes, write_patches

# Backbone keys of a checkpoint manifest that are configuration, not file bookkeeping.
_FILE_KEYS = ("file", "bytes")


def backbone_fields(ckpt: dict) -> dict:
    """The checkpoint's backbone configuration and weights digest, as an artifact records them."""
    return {k: v for k, v in ckpt["backbone"].items() if k not in _FILE_KEYS}


def brmoe_fields(ckpt: dict) -> dict:
    return {k: ckpt["brmoe"][k] for k in ("topk_routers", "topk_experts", "expert_dim", "shared_dim")}


def checkpoint_fields(ckpt: dict, slot_digests: list[str]) -> dict:
    """The manifest fields that follow the checkpoint's tasks (the same for export and growth)."""
    return {
        "tasks": [
            {"classes": int(e["classes"]), "source_sha256": e["sha256"], "slot_sha256": dg}
            for e, dg in zip(ckpt["tasks"], slot_digests)
        ],
        "classes": {"names": list(ckpt["classes"]["names"])},
        "source": {
            "checkpoint_digest": checkpoint_digest(ckpt),
            "shared_sha256": ckpt["shared"]["sha256"],
            "head_sha256": ckpt["head"]["sha256"],
        },
    }


def load_state_sources(ckpt_dir: Path, ckpt: dict) -> tuple[dict, dict]:
    """The checkpoint's shared experts and head, verified."""
    return load_tensors(ckpt_dir, ckpt["shared"]), load_tensors(ckpt_dir, ckpt["head"])


# Precisions whose growth tensors hold plain values, so that new tasks are packed as for FP32.
# INT8 artifacts are not among them: their activation scales were calibrated on the old tasks.
GROWABLE = ("fp32", "fp16")


def check_growable(art: Artifact) -> None:
    """Refuse growth of an artifact whose precision cannot take new tasks (INT8)."""
    precision = art.manifest["precision"]
    if precision not in GROWABLE:
        raise ArtifactError(
            f"{art.dir} is an {precision.upper()} artifact and cannot take new tasks (its scales "
            f"were calibrated on the old ones): run care-export add-task on the FP32 artifact it "
            f"came from, then care-export quantize again"
        )


@dataclass
class Growth:
    """Everything a growth changes: new tasks' slot patches, the whole new state, the new manifest."""

    tasks: list[int]
    patches: list[Patch]
    state: dict[str, np.ndarray]
    manifest: dict


def _check_belongs(art: Artifact, ckpt: dict, ckpt_dir: Path) -> None:
    m = art.manifest
    if backbone_fields(ckpt) != m["backbone"]:
        raise MismatchError(f"{ckpt_dir}: its backbone differs from the artifact's")
    if brmoe_fields(ckpt) != m["brmoe"]:
        raise MismatchError(f"{ckpt_dir}: BR-MoE settings {brmoe_fields(ckpt)} differ from the artifact's {m['brmoe']}")
    if ckpt["preprocessing"] != m["preprocessing"]:
        raise MismatchError(f"{ckpt_dir}: its preprocessing differs from the artifact's")
    old = m["tasks"]
    if len(ckpt["tasks"]) < len(old):
        raise MismatchError(f"{ckpt_dir}: holds {len(ckpt['tasks'])} tasks, the artifact already {len(old)}")
    for t, (mine, theirs) in enumerate(zip(old, ckpt["tasks"])):
        if int(theirs["classes"]) != mine["classes"]:
            raise MismatchError(
                f"{ckpt_dir}: task {t} has {theirs['classes']} classes, the artifact's {mine['classes']}"
            )
        if theirs["sha256"] == mine["source_sha256"]:
            continue
        # Same content may come in a differently written file: compare what it packs to.
        packed = pack_task(load_tensors(ckpt_dir, theirs), t, mine["classes"], art.dims, str(ckpt_dir / theirs["file"]))
        if patches_digest(packed, art.tensors) != mine["slot_sha256"]:
            raise MismatchError(f"{ckpt_dir}: task {t} differs from the artifact's (not the checkpoint it grew from)")


def plan_growth(art: Artifact, ckpt_dir: str | Path) -> Growth | None:
    """What adding the checkpoint's new tasks changes; None when the artifact already matches it.

    Raises MismatchError (other backbone, settings or older tasks), CapacityError (no slot left,
    a task larger than a slot) and CheckpointError (unreadable files) before anything is written.
    """
    ckpt_dir = Path(ckpt_dir)
    check_growable(art)
    ckpt = read_checkpoint_manifest(ckpt_dir)
    _check_belongs(art, ckpt, ckpt_dir)
    old, dims = len(art.manifest["tasks"]), art.dims
    if old == len(ckpt["tasks"]):
        if checkpoint_digest(ckpt) == art.manifest["source"]["checkpoint_digest"]:
            return None
        raise MismatchError(f"{ckpt_dir}: no new task, but its shared experts or head differ from the artifact's")
    if len(ckpt["tasks"]) > dims.capacity:
        raise CapacityError(
            f"the artifact holds {dims.capacity} tasks, {ckpt_dir} has {len(ckpt['tasks'])}: "
            f"export again with a larger --tasks"
        )
    for t, e in enumerate(ckpt["tasks"][old:], start=old):
        check_task_classes(t, int(e["classes"]), dims)

    patches, digests = [], [t["slot_sha256"] for t in art.manifest["tasks"]]
    for t, e in enumerate(ckpt["tasks"][old:], start=old):
        packed = pack_task(load_tensors(ckpt_dir, e), t, int(e["classes"]), dims, str(ckpt_dir / e["file"]))
        # Values as the artifact stores them (FP16 artifacts: half precision), for files and sessions alike.
        packed = [Patch(p.name, p.row, as_stored(p.data, art.tensors[p.name].dtype)) for p in packed]
        patches += packed
        digests.append(patches_digest(packed, art.tensors))
    shared, head = load_state_sources(ckpt_dir, ckpt)
    classes = [int(e["classes"]) for e in ckpt["tasks"]]
    state = pack_state(shared, head, classes, dims, str(ckpt_dir))
    state = {name: as_stored(value, art.tensors[name].dtype) for name, value in state.items()}
    manifest = dict(art.manifest, **checkpoint_fields(ckpt, digests))
    return Growth(list(range(old, len(classes))), patches, state, manifest)


@contextlib.contextmanager
def _exclusive(directory: Path):
    """One writer at a time (POSIX advisory lock on the directory; no lock where unsupported)."""
    try:
        import fcntl
    except ImportError:  # Windows: callers must not run two growths at once
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(f"{directory}: another process is adding tasks to this artifact") from None
        yield
    finally:
        os.close(fd)


def apply_growth(art: Artifact, growth: Growth) -> dict:
    """Write ``growth`` into the artifact (see the module doc for the order). Returns the manifest."""
    d = art.dir
    for stale in (PENDING_STATE, PENDING_MANIFEST):
        (d / stale).unlink(missing_ok=True)
    write_patches(d / SLOTS_FILE, art.tensors, growth.patches)
    state = tensor_file_bytes(STATE_FILE, art.tensors, growth.state)
    write_bytes(d / PENDING_STATE, state)
    manifest = dict(growth.manifest)
    manifest["files"] = dict(
        manifest["files"], **{STATE_FILE: {"sha256": sha256_file(d / PENDING_STATE), "bytes": len(state)}}
    )
    write_json(d / PENDING_MANIFEST, manifest)
    os.replace(d / PENDING_STATE, d / STATE_FILE)
    with contextlib.suppress(FileNotFoundError):  # a reader completed it (runtime.manifest.read_manifest)
        os.replace(d / PENDING_MANIFEST, d / MANIFEST)
    fsync_dir(d)
    return manifest


def add_tasks(artifact_dir: str | Path, ckpt_dir: str | Path) -> tuple[list[int], dict]:
    """Add the tasks that ``ckpt_dir`` has beyond the artifact's, in place.

    Returns the task indices added (empty when the artifact already matches the checkpoint) and
    the artifact's manifest.
    """
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise ArtifactError(f"artifact not found or not a directory: {artifact_dir}")
    try:
        with _exclusive(artifact_dir):
            art = Artifact(artifact_dir, verify=True)  # never build on a corrupt artifact
            growth = plan_growth(art, ckpt_dir)
            if growth is None:
                return [], art.manifest
            return growth.tasks, apply_growth(art, growth)
    except OSError as exc:  # full disk, file-size limit, read-only mount: the old model is intact
        where = exc.filename or artifact_dir
        raise ArtifactError(
            f"cannot add tasks to {artifact_dir} ({where}: {exc.strerror or exc}); "
            f"the artifact still holds its old tasks"
        ) from None


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` as ``dst`` where the file system allows (True), else copy it (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def clone_artifact(art: Artifact, dst: Path) -> None:
    """Fill the empty directory ``dst`` with ``art``'s files: slots.bin, which growth patches in
    place, is copied; every other file, which nothing writes in place, is hard-linked where the
    file system allows."""
    for name in [*art.manifest["files"], MANIFEST]:
        if name == SLOTS_FILE:
            shutil.copyfile(art.dir / name, dst / name)
        else:
            link_or_copy(art.dir / name, dst / name)


def add_tasks_to_copy(artifact_dir: str | Path, ckpt_dir: str | Path, out: str | Path) -> tuple[list[int], dict, dict]:
    """Write the artifact grown by the checkpoint's new tasks as a new artifact ``out``, leaving
    ``artifact_dir`` as it was. Returns the tasks added, the new manifest, and which of its files
    are hard links to the old version's (``linked``) and which were written, with their bytes
    (``written``, ``written_bytes``).

    Growth never writes into a file it does not own: the state and manifest are replaced by a
    rename (so the new version's links to the old files are simply replaced), the backbone and
    graph are never written; only slots.bin is patched in place, so it is copied. ``out`` is
    built in a temporary sibling and renamed into place when complete.
    """
    artifact_dir, out = Path(artifact_dir), Path(out)
    art = Artifact(artifact_dir, verify=True)  # never build on a corrupt artifact
    growth = plan_growth(art, ckpt_dir)  # every check runs before anything is written
    if growth is None:
        raise ArtifactError(f"{artifact_dir} already holds every task of {ckpt_dir}: no new version to write")
    with output_dir(out, ARTIFACT, inputs=(artifact_dir, ckpt_dir)) as tmp:
        clone_artifact(art, tmp)
        manifest = apply_growth(Artifact(tmp), growth)
        names = sorted(p.name for p in tmp.iterdir())
        linked = [n for n in names if (artifact_dir / n).exists() and os.path.samefile(artifact_dir / n, tmp / n)]
        written = [n for n in names if n not in linked]
        how = {"linked": linked, "written": written, "written_bytes": sum((tmp / n).stat().st_size for n in written)}
    return growth.tasks, manifest, how
