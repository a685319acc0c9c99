"""The committed tiny model (``tests/data/tiny/``): the fixture of the tests that need only the
runtime install (no PyTorch), and a record of what this version of the exporter writes.

``tests/data/tiny/`` holds a 4-task checkpoint of a very small random ViT, the artifact of its
first 3 tasks (capacity 6), and golden records of the 3-task artifact and of it grown to 4 tasks.
Rebuild it (PyTorch side) after a deliberate change of the exporter or of the artifact format::

    python tests/tiny_artifact.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).with_name("data") / "tiny"
TASK_CLASSES = [4, 3, 3, 2]
CAPACITY = 6
GOLDEN_IMAGES = 8
IMG = 32


def build(out: Path) -> Path:
    """Write ``ckpt/``, ``artifact/``, ``golden-3.npz`` and ``golden-4.npz`` into ``out``."""
    from care_export.checkpoint.format import load_checkpoint, save_checkpoint
    from care_export.checkpoint.synth import synth_model
    from care_export.export.parity import random_images, run_reference, save_golden
    from care_export.export.writer import export_artifact
    from care_export.model.config import MoEConfig, backbone_config
    from runtime.artifact import Artifact
    from runtime.preprocess import Preprocessing

    cfg = backbone_config("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    moe = MoEConfig(topk_routers=2, topk_experts=2, expert_dim=4, shared_dim=8)
    model = synth_model(cfg, moe, TASK_CLASSES, seed=7)
    save_checkpoint(model, out / "ckpt", preprocessing=Preprocessing.for_input(IMG, (0.5,) * 3, (0.5,) * 3))
    images = random_images(GOLDEN_IMAGES, IMG, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        for tasks in (len(TASK_CLASSES), len(TASK_CLASSES) - 1):
            art_dir = out / "artifact" if tasks < len(TASK_CLASSES) else Path(tmp) / "grown"
            export_artifact(out / "ckpt", art_dir, CAPACITY, tasks=tasks)
            art = Artifact(art_dir)
            reference, _ = load_checkpoint(out / "ckpt", tasks=tasks)
            ref = run_reference(reference, images, GOLDEN_IMAGES, art.dims.topk_routers, art.dims.topk_experts)
            save_golden(out / f"golden-{tasks}.npz", art, images, ref, files=[])
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(dir=DATA.parent if DATA.parent.is_dir() else None) as tmp:
        built = build(Path(tmp) / "tiny")
        if DATA.exists():
            shutil.rmtree(DATA)  # only once the new copy is complete
        shutil.move(str(built), DATA)
    print(f"wrote {DATA}", file=sys.stderr)
