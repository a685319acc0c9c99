"""Commands that make, grow and check artifacts: ``onnx``, ``add-task``, ``parity``."""

from __future__ import annotations

import time
from pathlib import Path

import click


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


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.is_file())


@click.command("onnx")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--tasks", "capacity", type=click.IntRange(min=1), required=True,
              help="Capacity: task slots the artifact holds (later tasks are added in place).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Artifact directory [default: CKPT-onnx].")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True, help="ONNX opset.")
@click.option("--batch", type=BatchParam(), default="dynamic", show_default=True, help="Fixed batch size, or dynamic.")
@click.option("--task-classes", type=click.IntRange(min=1), default=None,
              help="Classes a later task may have [default: the checkpoint's largest later task].")
@click.option("--predict", default="single", show_default=True, type=click.Choice(["single", "iterative"]),
              help="The graph's prediction: the single pass (output logits), or the reference's iterative "
                   "prediction (output scores; one pass per task slot batched, at most 61 tasks).")
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

    from .export import export_artifact

    out = out or ckpt.resolve().with_name(ckpt.resolve().name + "-onnx")
    t0 = time.perf_counter()
    bars = []

    def progress(done, total, what):
        if not bars:
            bars.append(tqdm(total=total, desc=f"packing {what}", unit=what[:-1], leave=False, disable=None))
        bars[0].update(done - bars[0].n)

    try:
        m = export_artifact(ckpt, out, capacity, opset=opset, batch=None if batch == "dynamic" else batch,
                            slot_classes=task_classes, force=force, progress=progress, predict=predict)
    finally:
        for bar in bars:
            bar.close()
    dt = time.perf_counter() - t0
    nodes = len(onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    size = sum(f["bytes"] for f in m["files"].values())
    dims = m["dims"]
    click.echo(f"wrote {out}: {len(m['tasks'])} of {dims['capacity']} tasks, "
               f"{sum(t['classes'] for t in m['tasks'])} classes, {nodes} nodes, {_mib(size)} "
               f"({_mib(_disk_bytes(out))} on disk), {dt:.1f} s")


@click.command("add-task")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("ckpt", type=click.Path(path_type=Path))
def add_task_command(artifact, ckpt):
    """Write the checkpoint's new tasks into ARTIFACT in place (the graph is not touched).

    CKPT must be the checkpoint the artifact was exported from, grown by later tasks. A refused
    checkpoint (no slot left, other backbone or settings, changed older tasks) leaves the
    artifact as it was.

    \b
    Example:
      care-export add-task model/ ckpt/
    """
    from runtime.growth import add_tasks

    t0 = time.perf_counter()
    added, m = add_tasks(artifact, ckpt)
    total = len(m["tasks"])
    if not added:
        click.echo(f"{artifact} already holds every task of {ckpt} ({total} tasks)")
        return
    which = f"task {added[0]}" if len(added) == 1 else f"tasks {added[0]}-{added[-1]}"
    click.echo(f"added {which} to {artifact}: {total} of {m['dims']['capacity']} tasks, "
               f"{sum(t['classes'] for t in m['tasks'])} classes ({time.perf_counter() - t0:.1f} s)")


@click.command("parity")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True, help="Random inputs.")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True, help="Batch size of both runs.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Tolerance on |dlogit|.")
@click.option("--seed", default=0, show_default=True)
def parity_command(ckpt, artifact, samples, batch, atol, seed):
    """Compare ARTIFACT (ONNX Runtime, CPU) with the PyTorch reference forward of CKPT.

    Reports max and mean |dlogit|, top-1 agreement and routing agreement per block; exits 1
    when routing or top-1 differ or |dlogit| exceeds the tolerance.

    \b
    Example:
      care-export parity ckpt/ model/ --samples 256
    """
    from .parity import run_parity

    report = run_parity(ckpt, artifact, samples=samples, batch=batch, atol=atol, seed=seed)
    for line in report.lines():
        click.echo(line)
    report.check()
    click.echo("parity ok")
