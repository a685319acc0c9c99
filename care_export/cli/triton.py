"""``care-export triton``: an artifact as a Triton model repository (see :mod:`runtime.triton`)."""

from __future__ import annotations

from pathlib import Path

import click

from runtime.artifact import Artifact
from runtime.errors import ArtifactError
from runtime.outdir import staged_dir
from runtime.triton import CONFIG, model_config, write_labels

from .log import hint, say


@click.command("triton")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "repo",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Model repository (created if missing; other models in it are left alone).",
)
@click.option("--name", default=None, help="Model name [default: the artifact directory's name].")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1), help="Triton's max_batch_size.")
@click.option(
    "--instances",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Model instances (instance_group count).",
)
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="gpu", show_default=True, help="Instance kind.")
def triton_command(artifact, repo, name, max_batch, instances, device):
    """Write REPO/NAME (config.pbtxt, labels.txt, version 1 holding ARTIFACT) for Triton.

    Version files are hard-linked to ARTIFACT where the file system allows (slots.bin, which
    growth writes in place, is copied). Grow the model with `care-export add-task --triton`.

    \b
    Example:
      care-export triton model/ -o models/ --name care --max-batch 64 --instances 2
      tritonserver --model-repository models/
    """
    from runtime.growth import clone_artifact

    art = Artifact(artifact)
    name = name or art.dir.resolve().name
    model_dir = repo / name
    if model_dir.exists():
        raise ArtifactError(f"{model_dir} already exists; grow it with care-export add-task --triton {model_dir} CKPT")
    config = model_config(art, name, max_batch, instances, device)
    with staged_dir(model_dir) as tmp:
        (tmp / "1").mkdir()
        clone_artifact(art, tmp / "1")
        (tmp / CONFIG).write_text(config)
        write_labels(tmp, art)
    say(
        f"wrote {model_dir}: version 1 ({art.num_tasks} tasks, {art.num_classes} classes), max batch "
        f"{max_batch}, {instances} {device} instance(s)"
    )
    hint(f"tritonserver --model-repository {repo}")
