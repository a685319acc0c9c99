"""``care-export eval``: accuracy of a checkpoint (PyTorch) or of an artifact (the runtime alone,
never torch) on labelled images: an image folder or the built-in data."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click
import numpy as np

from runtime.errors import CareError
from runtime.numerics import COS_SCALE

from .log import say

BATCH = 64


def is_artifact(target: Path) -> bool:
    """True for an artifact directory, False for a checkpoint (both keep a manifest.json)."""
    from runtime.layout import FORMAT

    try:
        return json.loads((target / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError) as exc:
        raise CareError(f"{target}: neither a checkpoint nor an artifact ({exc})") from None


def labelled_images(data: str, names: list[str], split: str, skip_unknown: bool, builtin_test: int, image_size: int):
    """``(source, split items, global labels, skipped class names)`` for the model's ``names``.

    The built-in data stands for the built-in classes the model knows (named ``...-<id>``)."""
    from ..data.builtin import BuiltinSource

    index = {n: g for g, n in enumerate(names)}
    if data == "builtin":
        ids = [int(m.group(1)) for n in names if (m := re.search(r"-(\d+)$", n))]
        if not ids:
            raise CareError("the model knows no built-in class")
        source = BuiltinSource(max(ids) + 1, test_per_class=builtin_test, image_size=image_size)
        split = "test"  # an endless pool: only the classes the model knows count
    else:
        from ..data.image_folder import ImageFolderSource

        source = ImageFolderSource(data)
    unknown = [] if data == "builtin" else [n for n in source.class_names if n not in index]
    if unknown and not skip_unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise CareError(
            f"class folder {unknown[0]!r} of {data} is not a class the model knows{more}; pass "
            f"--skip-unknown to leave such classes out"
        )
    labels = [c for c, n in enumerate(source.class_names) if n in index]
    splits = ("train", "test") if split == "all" else (split,)
    items = [(s, item, index[source.class_names[c]]) for s in splits for item, c in source.samples(s, labels)]
    if not items:
        raise CareError(f"{data}: no images of a class the model knows")
    return source, items, sorted(set(unknown))


def score(logits: np.ndarray, labels: np.ndarray, task_sizes: list[int]) -> dict:
    """Top-1 and top-5 (%), accuracy per task (None for a task without images), and the
    task-confusion rate: the share of images predicted in another task's classes."""
    bounds = np.cumsum(task_sizes)
    top = np.argsort(-logits, axis=1)[:, :5]
    hit1 = top[:, 0] == labels
    true_task = np.searchsorted(bounds, labels, side="right")
    pred_task = np.searchsorted(bounds, top[:, 0], side="right")
    per_task = [
        float(100 * hit1[true_task == t].mean()) if (true_task == t).any() else None for t in range(len(task_sizes))
    ]
    return {
        "images": int(len(labels)),
        "top1": float(100 * hit1.mean()),
        "top5": float(100 * (top == labels[:, None]).any(1).mean()),
        "per_task": per_task,
        "task_confusion": float(100 * (pred_task != true_task).mean()),
    }


def _artifact_runner(target: Path, device: str, mode: str | None):
    from runtime import Session
    from runtime.layout import SCORES, score_output

    session = Session(target, device=device)
    own = "iterative" if score_output(session.manifest) == SCORES else "single"
    if mode not in (None, own):  # the prediction mode is part of an artifact's graph
        raise CareError(
            f"{target} was exported for {own} prediction; --eval {mode} needs an artifact exported "
            f"with care-export onnx --predict {mode}"
        )

    def scores(images):  # logits, or the scores of an iterative artifact: what predict() ranks
        return session.predict(images).logits

    return (
        session.class_names,
        [t["classes"] for t in session.manifest["tasks"]],
        session.preprocessing.input_size,
        scores,
        f"{session.backend} on {session.device}, {own} prediction",
    )


def _checkpoint_runner(target: Path, device: str, mode: str | None):
    import torch

    from runtime.preprocess import Preprocessing

    from ..checkpoint.format import load_checkpoint
    from ..data.sources import eval_transform
    from ..model.iterative import prediction_scores
    from ..training.continual import resolve_device

    model, manifest = load_checkpoint(target)
    training = manifest.get("training", {})
    mode = mode or training.get("eval_mode", "single")  # as the checkpoint was evaluated
    scale = training.get("scale", COS_SCALE)
    dev = resolve_device(device)
    model.to(dev)
    transform = eval_transform(Preprocessing.from_dict(manifest["preprocessing"]))

    @torch.no_grad()
    def logits(images):
        x = torch.stack([transform(im) for im in images]).to(dev)
        return prediction_scores(model, x, mode=mode, scale=scale).float().cpu().numpy()

    return (
        manifest["classes"]["names"],
        list(model.task_classes),
        model.backbone_cfg.img_size,
        logits,
        f"pytorch on {dev}, {mode} prediction",
    )


@click.command("eval")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data")
@click.option(
    "--split",
    type=click.Choice(["test", "all"]),
    default="test",
    show_default=True,
    help="test: the folder's test/ (or its fixed-seed held-out part, as training splits it); all: every image.",
)
@click.option("--skip-unknown", is_flag=True, help="Leave out class folders the model does not know.")
@click.option(
    "--builtin-test",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Built-in test images per class (DATA builtin).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--eval",
    "eval_mode",
    type=click.Choice(["single", "iterative"]),
    default=None,
    help="Prediction mode: single pass or the reference's iterative prediction [default: a checkpoint's "
    "training setting; an artifact's export].",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
def eval_command(target, data, split, skip_unknown, builtin_test, device, eval_mode, as_json):
    """Accuracy of TARGET, a checkpoint (PyTorch) or an artifact (runtime only, no PyTorch), on
    DATA: an image folder (one sub-folder per class, named as the model's classes) or 'builtin'.

    Prints top-1, top-5, accuracy per task, the task-confusion rate (predictions in the classes
    of another task than the image's) and images per second (reading, preprocessing and
    inference).

    \b
    Example:
      care-export eval model/ photos/ --json
      care-export eval ckpt/ new-classes/ --skip-unknown
    """
    runner = _artifact_runner if is_artifact(target) else _checkpoint_runner
    names, task_sizes, image_size, logits_of, backend = runner(target, device, eval_mode)
    source, items, skipped = labelled_images(data, names, split, skip_unknown, builtin_test, image_size)
    t0 = time.perf_counter()
    logits = np.concatenate(
        [logits_of([source.load(s, item) for s, item, _ in items[i : i + BATCH]]) for i in range(0, len(items), BATCH)]
    )
    seconds = time.perf_counter() - t0
    result = dict(
        score(logits, np.array([g for _, _, g in items]), task_sizes),
        target=str(target),
        data=data,
        backend=backend,
        images_per_second=len(items) / seconds,
        skipped_classes=skipped,
    )
    if as_json:
        click.echo(json.dumps(result))
        return
    say(
        f"{target} ({backend}) on {data}: {result['images']} images"
        + (f", {len(skipped)} unknown classes skipped" if skipped else "")
    )
    say(
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  task confusion "
        f"{result['task_confusion']:.2f}%  {result['images_per_second']:.1f} images/s"
    )
    say("per task  " + " ".join("-" if a is None else f"T{t} {a:.1f}" for t, a in enumerate(result["per_task"])))
