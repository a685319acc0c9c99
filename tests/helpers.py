"""Helpers shared by the test modules (no tests here): tiny random checkpoints and artifacts, file
snapshots, and the line that blocks PyTorch in a subprocess. Importable without PyTorch (the
PyTorch side is imported where it is used)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from care_export.model.config import backbone_config
from runtime.preprocess import Preprocessing

ROOT = Path(__file__).resolve().parents[1]  # the repository
IMG = 32
TINY = backbone_config("vit_tiny_patch16_224", img_size=IMG, patch_size=8, depth=2)  # the trainer tests' ViT
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
    from care_export.export.writer import export_artifact

    export_artifact(ckpt, out, capacity, **kw)
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a directory, by name, as bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------- the Session tests' model
# The Session tests' model: a 4-task checkpoint, grown to 6, exported at capacity 8.
SESSION_TASKS, SESSION_GROWN, SESSION_CAPACITY = 4, 6, 8
ATOL = 1e-4


def synth_session_checkpoint(out: Path, tasks: int, seed: int = 0, depth: int = 3) -> Path:
    """A random checkpoint; the same seed with more tasks is the same model grown by later tasks."""
    from click.testing import CliRunner

    from care_export.cli import main

    res = CliRunner().invoke(
        main,
        [
            "synth-ckpt",
            "-o",
            str(out),
            "--backbone",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--patch-size",
            "8",
            "--depth",
            str(depth),
            "--init-cls",
            "10",
            "--increment",
            "3",
            "--tasks",
            str(tasks),
            "--seed",
            str(seed),
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def reference(ckpt: Path, x: np.ndarray, moe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``CareViT.forward`` logits and canonical routing (B, depth, M) / (B, depth, M, K)."""
    import torch

    from care_export.checkpoint.format import load_checkpoint
    from runtime.routing import canonical_routing, pad_routing

    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        logits, routing = model.forward_with_routing(torch.from_numpy(x))
    m, k = moe["topk_routers"], moe["topk_experts"]
    tasks, experts = zip(*(pad_routing(r.tasks.numpy(), r.experts.numpy(), min(m, 99), min(k, 99)) for r in routing))
    tasks, experts = np.stack(tasks, 1), np.stack(experts, 1)
    return logits.numpy(), *canonical_routing(tasks, experts)


def random_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def assert_equals_reference(session, x: np.ndarray, ref, atol: float = ATOL) -> None:
    """The Session's logits within ``atol`` of ``ref``, and the same top-1 and routing."""
    from runtime.routing import pad_routing

    logits, tasks, experts = ref
    got = session.logits(x)
    assert got.shape == logits.shape
    assert np.abs(got - logits).max() <= atol
    pred = session.predict(x, return_routing=True)
    np.testing.assert_array_equal(pred.classes[:, 0], logits.argmax(1))
    width = pred.tasks.shape[-1], pred.experts.shape[-1]
    np.testing.assert_array_equal(pred.tasks, pad_routing(tasks, experts, *width)[0])
    np.testing.assert_array_equal(pred.experts, pad_routing(tasks, experts, *width)[1])


# ---------------------------------------------------------------------- the calibration tests' model
# The calibration tests' model: a small ViT pre-trained on built-in classes, then 3 CaRE tasks.
CALIB_BACKBONE = backbone_config("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
CALIB_CAPACITY = 16


def images_for(art_dir, per_task=16, eval_samples=300):
    """Calibration and held-out images of an artifact's classes from the built-in dataset."""
    from calibration.quantize import draw_images
    from care_export.data.builtin import builtin_pool
    from runtime.artifact import Artifact

    art = Artifact(art_dir)
    names = art.manifest["classes"]["names"]
    return draw_images(
        art,
        builtin_pool(names, art.dims.img_size, "train"),
        builtin_pool(names, art.dims.img_size, "test"),
        per_task,
        eval_samples,
        1993,
        "builtin train",
        "builtin test",
    )
