"""``care-export plot``: a checkpoint's accuracy after each task, as a picture."""

from __future__ import annotations

from pathlib import Path

import click

from .log import say


@click.command("plot")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Image file, .png or .svg [default: CKPT/accuracy.png].",
)
def plot_command(ckpt, out):
    """Draw the top-1 accuracy over all seen classes after each task, and the accuracy matrix
    (each task's classes after each later task) as a heat map. Needs matplotlib (the 'plot' extra).

    \b
    Example:
      care-export plot ckpt/ -o accuracy.svg
    """
    from runtime.checkpoint_files import read_checkpoint_manifest
    from runtime.errors import CheckpointError

    from ..plots.accuracy import plot_accuracy

    metrics = read_checkpoint_manifest(ckpt).get("metrics")
    if not metrics or not metrics.get("top1"):
        raise CheckpointError(
            f"{ckpt} holds no accuracy after tasks (made by care-export train, not synth-ckpt or import-official)"
        )
    out = out or ckpt / "accuracy.png"
    drawn = plot_accuracy(metrics, out, title=f"{ckpt.resolve().name}: accuracy after each task")
    say(f"wrote {out}: accuracy after {len(drawn['tasks'])} tasks and the accuracy matrix")
