"""Writing one file so that a reader never sees it half-written: write a temporary sibling, then
rename it over the target (``os.replace`` is atomic on POSIX and Windows). Whole directories go
through :mod:`runtime.outdir` instead."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes | bytearray) -> None:
    """Write ``data`` to ``path`` and fsync it (callers rename it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj) -> None:
    """Write JSON to ``path`` and fsync it (callers rename it into place)."""
    write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, follow_umask: bool = False):
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` when the block ends
    and is removed instead when the block raises, so ``path`` is never half-written or lost.
    ``follow_umask``: give the file the mode the umask asks for (writers such as safetensors
    create 0600 files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if follow_umask:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | bytearray) -> None:
    """Replace ``path`` by ``data`` (fsynced) in one rename."""
    with replacing(path) as tmp:
        write_bytes(tmp, data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Replace ``path`` by ``obj`` as indented JSON in one rename."""
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())
