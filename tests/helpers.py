"""Helpers shared by the test modules (no tests here): tiny random checkpoints and artifacts, file
snapshots, and the line that blocks PyTorch in a subprocess. Importable without PyTorch (the
PyTorch side is imported where it is used)."""

from __future__ import annotations

from pathlib import Path

from runtime.preprocess import Preprocessing

ROOT = Path(__file__).resolve().parents[1]  # the repository
IMG = 32
BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"


def make_checkpoint(
    out: Path, task_classes, M: int = 2, K: int = 3, depth: int = 2, seed: int = 0, name: str = "vit_tiny_patch16_224"
) -> Path:
    """A random, non-degenerate checkpoint of a tiny ViT (img 32, patch 8). The same seed with
    more tasks is the same model grown by later tasks (identical older task files)."""
    from care_export.checkpoint.format import save_checkpoint
    from care_export.checkpoint.synth import synth_model
    from care_export.model.config import MoEConfig, backbone_config

    cfg = backbone_config(name, img_size=IMG, patch_size=8, depth=depth)
    model = synth_model(cfg, MoEConfig(topk_routers=M, topk_experts=K), list(task_classes), seed=seed)
    save_checkpoint(model, out, preprocessing=Preprocessing.for_input(IMG, (0.5,) * 3, (0.5,) * 3))
    return out


def make_artifact(ckpt: Path, out: Path, capacity: int = 301, **kw) -> Path:
    from care_export.export import export_artifact

    export_artifact(ckpt, out, capacity, **kw)
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a directory, by name, as bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
