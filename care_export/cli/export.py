"""Commands that make, grow and check artifacts: ``onnx``, ``add-task``, ``parity``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from .log import disk_bytes, hint, mib, say

log = logging.getLogger(__name__)


class BatchParam(click.ParamType):
    """``dynamic`` or a positive integer."""

    name = "N|dynamic"

    def convert(self, value, param, ctx):
        if value is None or value == "dynamic" or isinstance(value, int):
            return value
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither 'dynamic' nor an integer", param, ctx)
        if n < 1:
            self.fail(f"batch must be positive, got {n}", param, ctx)
        return n


@click.command("onnx")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option(
    "--tasks",
    "capacity",
    type=click.IntRange(min=1),
    required=True,
    help="Capacity: the task slots the artifact holds, not the tasks learned so far (later tasks are "
    "added in place, up to this many).",
)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Artifact directory [default: CKPT-onnx].")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True, help="ONNX opset.")
@click.option("--batch", type=BatchParam(), default="dynamic", show_default=True, help="Fixed batch size, or dynamic.")
@click.option(
    "--task-classes",
    type=click.IntRange(min=1),
    default=None,
    help="Classes a later task may have [default: the checkpoint's largest later task].",
)
@click.option(
    "--predict",
    default="single",
    show_default=True,
    type=click.Choice(["single", "iterative"]),
    help="The graph's prediction: the single pass (output logits), or the reference's iterative "
    "prediction (output scores; one pass per task slot batched, at most 61 tasks).",
)
@click.option("--force", is_flag=True, help="Replace an existing artifact.")
def onnx_command(ckpt, capacity, out, opset, batch, task_classes, predict, force):
    """Export a checkpoint to a static ONNX artifact sized for CAPACITY tasks.

    The graph does not depend on the number of learned tasks: `care-export add-task` later
    writes new tasks into the artifact without touching it.

    \b
    Example (a 301-task B100-Inc3 sequence, batch dynamic):
      care-export onnx ckpt/ --tasks 301 -o model/
    """
    import onnx
    from tqdm import tqdm

    from ..export.writer import export_artifact

    out = out or ckpt.resolve().with_name(ckpt.resolve().name + "-onnx")
    t0 = time.perf_counter()
    bars = []

    def progress(done, total, what):
        if not bars:
            bars.append(tqdm(total=total, desc=f"packing {what}", unit=what[:-1], leave=False, disable=None))
        bars[0].update(done - bars[0].n)

    try:
        m = export_artifact(
            ckpt,
            out,
            capacity,
            opset=opset,
            batch=None if batch == "dynamic" else batch,
            slot_classes=task_classes,
            force=force,
            progress=progress,
            predict=predict,
        )
    finally:
        for bar in bars:
            bar.close()
    dt = time.perf_counter() - t0
    nodes = len(onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    size = sum(f["bytes"] for f in m["files"].values())
    dims = m["dims"]
    say(
        f"wrote {out}: {len(m['tasks'])} of {dims['capacity']} tasks, "
        f"{sum(t['classes'] for t in m['tasks'])} classes, {nodes} nodes, {mib(size)} "
        f"({mib(disk_bytes(out))} on disk), {dt:.1f} s"
    )
    hint(f"care-export parity {ckpt} {out}")


@click.command("add-task")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    help="Write the grown model as this new artifact and leave ARTIFACT as it was (unchanged files are "
    "hard-linked where the file system allows).",
)
@click.option(
    "--triton",
    is_flag=True,
    help="ARTIFACT is a Triton model (REPO/NAME, see care-export triton): add "
    "version N+1, grown from the newest version N.",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="With --triton: keep only the K newest versions [default: all].",
)
def add_task_command(artifact, ckpt, out, triton, keep):
    """Write the checkpoint's new tasks into ARTIFACT in place (the graph is not touched), or
    into a new version with -o.

    CKPT must be the checkpoint the artifact was exported from, grown by later tasks. A refused
    checkpoint (no slot left, other backbone or settings, changed older tasks) leaves the
    artifact as it was.

    \b
    Example:
      care-export add-task model/ ckpt/
      care-export add-task model-v1/ ckpt/ -o model-v2/
      care-export add-task --triton models/care ckpt/ --keep 2
    """
    from runtime.growth import add_tasks, add_tasks_to_copy

    t0 = time.perf_counter()
    if keep is not None and not triton:
        raise click.UsageError("--keep needs --triton")
    if triton:
        if out is not None:
            raise click.UsageError("--triton writes the next version inside ARTIFACT; -o does not apply")
        from runtime.triton import add_version

        version, added, removed = add_version(artifact, ckpt, keep)
        say(
            f"wrote {artifact}/{version}: tasks {added[0]}-{added[-1]} added"
            + (f"; removed version(s) {', '.join(map(str, removed))}" if removed else "")
            + f" ({time.perf_counter() - t0:.1f} s)"
        )
        hint(f"care-export info {artifact}/{version}")
        return
    if out is not None:
        added, m, how = add_tasks_to_copy(artifact, ckpt, out)
        which = f"task {added[0]}" if len(added) == 1 else f"tasks {added[0]}-{added[-1]}"
        say(
            f"wrote {out}: {artifact} + {which}, {len(m['tasks'])} of {m['dims']['capacity']} tasks, "
            f"{sum(t['classes'] for t in m['tasks'])} classes; hard-linked {', '.join(how['linked']) or '-'}; "
            f"written {', '.join(how['written'])} ({mib(how['written_bytes'])}) "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        hint(f"care-export parity {ckpt} {out}")
        return
    added, m = add_tasks(artifact, ckpt)
    total = len(m["tasks"])
    if not added:
        say(f"{artifact} already holds every task of {ckpt} ({total} tasks)")
        return
    which = f"task {added[0]}" if len(added) == 1 else f"tasks {added[0]}-{added[-1]}"
    say(
        f"added {which} to {artifact}: {total} of {m['dims']['capacity']} tasks, "
        f"{sum(t['classes'] for t in m['tasks'])} classes ({time.perf_counter() - t0:.1f} s)"
    )
    hint(f"care-export parity {ckpt} {artifact}")


@click.command("parity")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="[CKPT] ARTIFACT")
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Random inputs (or at most this many images with --images).",
)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Compare on the image files under this directory instead of random inputs.",
)
@click.option(
    "--save-golden",
    "save_golden",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a golden record (inputs, reference logits and routing, the artifact's identity).",
)
@click.option(
    "--golden",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Check ARTIFACT against this golden record, without PyTorch (no CKPT).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="With --golden: the backend to prove (cpu, cuda, tensorrt, auto).",
)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size of both runs.")
@click.option(
    "--atol",
    type=float,
    default=None,
    help="Tolerance on |dlogit| [default: 1e-4; with --golden per precision: fp32 1e-3, fp16 5e-2, int8 0.5].",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema in docs/CLI.md) instead of the report.")
def parity_command(paths, samples, images_dir, save_golden, golden, device, batch, atol, seed, as_json):
    """Compare ARTIFACT (ONNX Runtime, CPU) with the PyTorch reference forward of CKPT, or, with
    --golden, a deployed ARTIFACT with a golden record on any backend (no PyTorch needed).

    Reports max and mean |dlogit|, top-1 agreement and routing agreement per block; exits 1
    when routing or top-1 differ or |dlogit| exceeds the tolerance.

    \b
    Example:
      care-export parity ckpt/ model/ --samples 256
      care-export parity ckpt/ model/ --images photos/ --save-golden model.golden.npz
      care-export parity model/ --golden model.golden.npz --device cuda     # on the GPU server
    """
    if golden is not None:
        if len(paths) != 1 or save_golden or images_dir:
            raise click.UsageError("--golden checks one ARTIFACT (no CKPT, --images or --save-golden)")
        return _check_golden(paths[0], golden, device, batch, atol, as_json)
    if len(paths) != 2:
        raise click.UsageError("give CKPT and ARTIFACT (or ARTIFACT --golden FILE)")
    from ..export.parity import run_parity

    report = run_parity(
        *paths,
        samples=samples,
        batch=batch,
        atol=1e-4 if atol is None else atol,
        seed=seed,
        images_dir=images_dir,
        golden=save_golden,
    )
    _report_parity(
        report,
        1.0,
        as_json,
        {
            "mode": "checkpoint",
            "checkpoint": str(paths[0]),
            "artifact": str(paths[1]),
            "golden": None,
            "backend": "onnxruntime on cpu",
            "precision": None,
        },
        "",
    )
    if save_golden:  # with --json a log line: stdout holds the object alone
        (log.info if as_json else say)(f"golden record {save_golden}: {report.samples} inputs")
    if not as_json:
        say("parity ok")
        hint(f"care-export info {paths[1]}   (then deploy it: care-export run {paths[1]} IMAGE...)")


def _report_parity(report, min_agree: float, as_json: bool, about: dict, title: str) -> None:
    """The report (or its JSON object), then the error of a failed check."""
    import json

    from runtime.errors import ValidationError

    try:
        report.check(min_agree)
        failure = None
    except ValidationError as exc:
        failure = str(exc)
    if as_json:
        click.echo(
            json.dumps(
                dict(
                    about,
                    ok=failure is None,
                    error=failure,
                    samples=report.samples,
                    classes=report.classes,
                    max_abs=report.max_abs,
                    mean_abs=report.mean_abs,
                    atol=report.atol,
                    top1=report.top1,
                    routing=report.routing,
                    min_agree=min_agree,
                    same_checkpoint=report.same_checkpoint,
                )
            )
        )
    else:
        for line in ([title] if title else []) + report.lines():
            say(line)
    if failure is not None:
        raise ValidationError(failure)


def _check_golden(artifact, golden, device, batch, atol, as_json):
    from ..export.parity import GOLDEN_TOLERANCE, check_golden

    report, identity, backend = check_golden(artifact, golden, device=device, batch=batch, atol=atol)
    _report_parity(
        report,
        GOLDEN_TOLERANCE[identity["precision"]][1],
        as_json,
        {
            "mode": "golden",
            "checkpoint": None,
            "artifact": str(artifact),
            "golden": str(golden),
            "backend": backend,
            "precision": identity["precision"],
        },
        f"{artifact} ({backend}, {identity['precision']}) against {golden}",
    )
    if not as_json:
        say("golden parity ok")
