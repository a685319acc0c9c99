"""``care-export run``: predictions for image files from an artifact, for people who do not
write Python. Imports only the runtime (numpy, onnxruntime, PIL), never torch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from runtime.preprocess import IMAGE_SUFFIXES

from .log import error, say

log = logging.getLogger(__name__)

CHUNK = 64  # images read and run at a time: memory stays flat for long lists


def _expand(paths: tuple[Path, ...]) -> list[Path]:
    """Files as given; a directory stands for the image files directly inside it, sorted."""
    out = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


@click.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", default=1, show_default=True, type=click.IntRange(min=1), help="Classes per image.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime", "tensorrt"]),
    default="auto",
    show_default=True,
    help="auto/onnxruntime: TensorRT EP, CUDA EP, then CPU; tensorrt: native TensorRT.",
)
@click.option("--routing", is_flag=True, help="Also print the tasks and experts each block selected.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image (JSON lines).")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Hash every weight file first, as care-export verify does (docs/ARTIFACT.md, Verification).",
)
def run_command(artifact, images, top_k, device, backend, routing, as_json, verify):
    """Predict the classes of image files with an exported artifact (no PyTorch needed).

    IMAGES are image files or directories of them. Each image is resized, centre-cropped and
    normalised as the artifact's manifest says. The backend chosen is printed on stderr.

    \b
    Example:
      care-export run model/ cat.jpg dog.png --top-k 3
      care-export run model/ photos/ --device cpu --json > predictions.jsonl
    """
    from runtime import Session
    from runtime.errors import CareError, InputError

    files = _expand(images)
    if not files:
        raise click.UsageError("no image files found in the given directories")
    missing = [f for f in files if not f.is_file()]
    for f in missing:  # named before the backend is chosen and loaded
        error(f"image not found: {f}")
    if len(missing) == len(files):
        raise CareError(f"{len(files)} of {len(files)} images could not be classified (see above)")
    session = Session(artifact, device=device, backend=backend, verify=verify)
    log.info(
        f"{session.backend} on {session.device} ({', '.join(session.providers)}): {session.num_tasks} tasks, "
        f"{session.num_classes} classes"
    )
    top_k = min(top_k, session.num_classes)
    failed = len(missing)
    files = [f for f in files if f not in missing]

    def predict(paths):
        """(path, result) of each readable file; an unreadable one is reported and skipped."""
        nonlocal failed
        try:
            return list(zip(paths, session.predict(paths, top_k=top_k, return_routing=routing).to_list()))
        except InputError as exc:
            if len(paths) > 1:  # find the bad files, keep the good ones
                return [r for p in paths for r in predict([p])]
            failed += 1
            msg = str(exc).removeprefix("image 0: ")
            error(msg if str(paths[0]) in msg else f"{paths[0]}: {msg}")
            return []

    for start in range(0, len(files), CHUNK):
        for path, item in predict(files[start : start + CHUNK]):
            if as_json:
                click.echo(json.dumps({"image": str(path), **item}))
                continue
            click.echo(f"{path}\t" + "\t".join(f"{t['name']} ({t['prob']:.3f})" for t in item["top"]))
            if routing:
                for b, (tasks, experts) in enumerate(zip(item["routing"]["tasks"], item["routing"]["experts"])):
                    click.echo(f"  block {b}: tasks {tasks} experts {experts}")
    if failed:
        raise CareError(f"{failed} of {len(files) + len(missing)} images could not be classified (see above)")


@click.command("verify")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object (schema in docs/CLI.md); a damaged "
    "directory gets one too (ok false), then the error line and exit 1.",
)
def verify_command(directory, as_json):
    """Check every byte of an artifact (or a checkpoint) against its manifest's digests.

    Hashes the graph, the backbone, the state and every learned task's slot; for a checkpoint,
    every file, and refuses NaN or Inf weights. Exits 1 naming the first damaged part.
    `add-task`, `parity` and `quantize` run the same check on what they build on.

    \b
    Example:
      care-export verify model/ --json
    """
    import time

    from runtime.artifact import Artifact
    from runtime.checkpoint_files import load_tensors, read_checkpoint_manifest
    from runtime.errors import CareError
    from runtime.outdir import CHECKPOINT, directory_kind

    t0 = time.perf_counter()
    result = {
        "path": str(directory),
        "kind": None,
        "ok": False,
        "error": None,
        "tasks": None,
        "capacity": None,
        "precision": None,
    }
    try:
        if directory_kind(directory) == CHECKPOINT:
            result["kind"] = "checkpoint"
            m = read_checkpoint_manifest(directory)
            for e in [m["backbone"], m["shared"], m["head"], *m["tasks"]]:
                load_tensors(directory, e)
            result["tasks"] = len(m["tasks"])
            what = f"checkpoint, {len(m['tasks'])} tasks"
        else:
            result["kind"] = "artifact"
            art = Artifact(directory, verify=True)
            result.update(tasks=art.num_tasks, capacity=art.dims.capacity, precision=art.manifest["precision"])
            what = f"{art.manifest['precision'].upper()} artifact, {art.num_tasks} of {art.dims.capacity} tasks"
    except CareError as exc:
        if not as_json:
            raise
        result["error"] = str(exc)
    result["seconds"] = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(dict(result, ok=result["error"] is None)))
        if result["error"] is not None:
            raise CareError(result["error"])
        return
    say(f"ok: {directory} ({what}, every digest matches; {result['seconds']:.2f} s)")
