"""Where care-export caches what it can rebuild (the built-in pre-trained ViT, TensorRT engines)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$CARE_EXPORT_CACHE``, else ``$XDG_CACHE_HOME/care-export``, else ``~/.cache/care-export``
    (empty variables count as unset)."""
    env = os.environ.get("CARE_EXPORT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "care-export"
