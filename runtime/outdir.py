"""Writing an output directory safely: the one way every command writes a checkpoint or an artifact.

``with output_dir(out, kind, force=..., inputs=[...]) as tmp:`` checks ``out`` first, then yields
a fresh temporary sibling of it to write into. Only when the block succeeds is ``tmp`` renamed to
``out`` (an old ``out`` is moved aside first and deleted last); when the block raises, ``tmp`` is
removed and ``out`` is untouched. Nothing already on disk is deleted before the new directory is
complete.

The checks, before any work:

- ``out`` must not be, lie inside, or contain one of the command's ``inputs`` (replacing it
  would destroy what is being read);
- an existing ``out`` needs ``force``, and even then must be a directory of the same ``kind``
  (its ``manifest.json`` says so) or an empty directory: ``--force`` never replaces a foreign
  directory or a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .checkpoint_files import CHECKPOINT_FORMAT
from .errors import ArtifactError, CheckpointError

CHECKPOINT = CHECKPOINT_FORMAT
ARTIFACT = "care-export-artifact"  # runtime.layout.FORMAT
_NAMES = {CHECKPOINT: "checkpoint", ARTIFACT: "artifact"}
_ERRORS = {CHECKPOINT: CheckpointError, ARTIFACT: ArtifactError}


def fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (POSIX; Windows cannot open a directory)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def directory_kind(directory: str | Path) -> str | None:
    """The ``format`` its ``manifest.json`` names (CHECKPOINT, ARTIFACT), or None."""
    try:
        manifest = json.loads((Path(directory) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(out: str | Path, kind: str, force: bool = False, inputs=()) -> Path:
    """Refuse to write a ``kind`` directory at ``out`` (module doc); returns ``out``."""
    out, what, error = Path(out), _NAMES[kind], _ERRORS[kind]
    where = out.resolve()
    for src in inputs:
        if src is not None and _overlaps(where, Path(src).resolve()):
            raise error(f"{out} is or overlaps the input {src}; write the {what} elsewhere")
    if not out.exists() and not out.is_symlink():
        return out
    if not force:
        raise error(f"{out} already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise error(f"{out} is not a directory; refusing to replace it")
    if directory_kind(out) != kind and any(out.iterdir()):
        raise error(f"{out} is a non-empty directory that is not a care-export {what}; refusing to replace it")
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out``, replacing what was there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


@contextlib.contextmanager
def staged_dir(out: Path):
    """A fresh temporary sibling of ``out`` to write into: it replaces ``out`` when the block ends,
    and is removed instead when the block raises (callers check ``out`` first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_dir(out: str | Path, kind: str, *, force: bool = False, inputs=()):
    """Check ``out``, yield a temporary sibling to write into, swap it in on success (module doc)."""
    with staged_dir(check_output(out, kind, force, inputs)) as tmp:
        yield tmp
