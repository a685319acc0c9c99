"""``care-export bench``: the artifact against the eager PyTorch reference and the plain backbone
(the measurement itself is :mod:`care_export.export.bench`)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import click

from .log import say

log = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("bench")
@click.option(
    "--ckpt", type=click.Path(path_type=Path), required=True, help="Checkpoint; the first T tasks are used for each T."
)
@click.option(
    "--task-counts",
    "--tasks",
    "task_list",
    default="1,10,100,301",
    show_default=True,
    help="Task counts T to time, comma-separated (--tasks is the old name).",
)
@click.option("--batch", "batch_list", default="1,8", show_default=True, help="Batch sizes.")
@click.option("--capacity", type=int, default=301, show_default=True, help="Artifact capacity (0: T itself).")
@click.option("--rounds", type=click.IntRange(min=1), default=12, show_default=True, help="Timed rounds per engine.")
@click.option(
    "--eager-rounds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Rounds of the eager reference above --eager-max-tasks.",
)
@click.option(
    "--eager-max-tasks",
    type=int,
    default=10,
    show_default=True,
    help="Above this T the eager reference runs batch 1 only, with --eager-rounds rounds.",
)
@click.option("--threads", type=int, default=0, show_default=True, help="Threads of ORT and PyTorch (0: all cores).")
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the median latency against T per engine and batch into this .png or .svg.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema in docs/CLI.md) instead of the tables.")
def bench_command(
    ckpt, task_list, batch_list, capacity, rounds, eager_rounds, eager_max_tasks, threads, plot_file, as_json
):
    """Time the artifact, the eager PyTorch reference and the plain backbone, interleaved.

    \b
    Example (ViT-B/16, B100-Inc3, 301 tasks of random weights):
      care-export synth-ckpt -o big/ --init-cls 100 --increment 3 --tasks 301
      care-export bench --ckpt big/ --task-counts 1,10,100,301 --batch 1,8 --plot latency.png
    """
    import os

    import torch

    from runtime.checkpoint_files import read_checkpoint_manifest

    from ..export.bench import bench_tasks, format_rows
    from ..export.writer import export_backbone

    tasks, batches = _ints(task_list), _ints(batch_list)
    if not tasks or not batches:
        raise click.UsageError("give at least one task count and one batch size")
    if plot_file is not None:  # before the long measurement
        from ..plots.figure import check_plot_path

        check_plot_path(plot_file)
    if threads:
        torch.set_num_threads(threads)
    total = len(read_checkpoint_manifest(ckpt)["tasks"])
    if max(tasks) > total:
        raise click.BadParameter(f"the checkpoint has {total} tasks", param_hint="--task-counts")
    machine = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ort_threads": threads or None}
    log.info(f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, ORT threads {threads or 'all'}")
    workdir = Path(tempfile.mkdtemp(prefix="care-bench-"))
    try:
        backbone = export_backbone(ckpt, workdir / "backbone")
        rows = []
        for t in tasks:
            rows += bench_tasks(
                ckpt,
                t,
                capacity or t,
                batches,
                rounds,
                eager_rounds,
                eager_max_tasks,
                threads,
                backbone,
                workdir,
                log.info,
            )
            for line in format_rows([r for r in rows if r["tasks"] == t]):
                log.info(line)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    plotted = None
    if plot_file is not None:
        from ..plots.latency import plot_latency

        plotted = plot_latency(rows, plot_file)
    if as_json:
        import json

        click.echo(
            json.dumps(
                {
                    "checkpoint": str(ckpt),
                    "capacity": capacity or None,
                    "machine": machine,
                    "rows": rows,
                    "plot": None if plot_file is None else str(plot_file),
                }
            )
        )
        return
    say("summary")
    for line in format_rows(rows):
        say(line)
    for r in rows:
        if r["engine"] == "artifact (ORT)":
            say(
                f"T={r['tasks']:>3} batch {r['batch']}: artifact / backbone = {r['vs_backbone']:.3f} (goal <= 1.05)"
                + (f", eager / artifact = {r['eager_vs']:.1f}" if r["eager_vs"] is not None else "")
            )
    if plotted is not None:
        say(f"wrote {plot_file}: latency against tasks, {len(plotted)} lines")
