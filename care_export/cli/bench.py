"""``care-export bench``: the artifact against the eager PyTorch reference and the plain backbone
(the measurement itself is :mod:`care_export.export.bench`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("bench")
@click.option("--ckpt", type=click.Path(path_type=Path), required=True,
              help="Checkpoint; the first T tasks are used for each T.")
@click.option("--tasks", "task_list", default="1,10,100,301", show_default=True, help="Task counts T.")
@click.option("--batch", "batch_list", default="1,8", show_default=True, help="Batch sizes.")
@click.option("--capacity", type=int, default=301, show_default=True, help="Artifact capacity (0: T itself).")
@click.option("--rounds", type=click.IntRange(min=1), default=12, show_default=True, help="Timed rounds per engine.")
@click.option("--eager-rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Rounds of the eager reference above --eager-max-tasks.")
@click.option("--eager-max-tasks", type=int, default=10, show_default=True,
              help="Above this T the eager reference runs batch 1 only, with --eager-rounds rounds.")
@click.option("--threads", type=int, default=0, show_default=True, help="Threads of ORT and PyTorch (0: all cores).")
def bench_command(ckpt, task_list, batch_list, capacity, rounds, eager_rounds, eager_max_tasks, threads):
    """Time the artifact, the eager PyTorch reference and the plain backbone, interleaved.

    \b
    Example (ViT-B/16, B100-Inc3, 301 tasks of random weights):
      care-export synth-ckpt -o big/ --init-cls 100 --increment 3 --tasks 301
      care-export bench --ckpt big/ --tasks 1,10,100,301 --batch 1,8
    """
    import os

    import torch

    from runtime.checkpoint_files import read_checkpoint_manifest

    from ..export.bench import bench_tasks, format_rows
    from ..export.writer import export_backbone

    tasks, batches = _ints(task_list), _ints(batch_list)
    if threads:
        torch.set_num_threads(threads)
    total = len(read_checkpoint_manifest(ckpt)["tasks"])
    if max(tasks) > total:
        raise click.BadParameter(f"the checkpoint has {total} tasks", param_hint="--tasks")
    click.echo(f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, ORT threads {threads or 'all'}")
    workdir = Path(tempfile.mkdtemp(prefix="care-bench-"))
    try:
        backbone = export_backbone(ckpt, workdir / "backbone")
        rows = []
        for t in tasks:
            rows += bench_tasks(ckpt, t, capacity or t, batches, rounds, eager_rounds, eager_max_tasks, threads,
                                backbone, workdir, click.echo)
            for line in format_rows([r for r in rows if r["tasks"] == t]):
                click.echo(line)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    click.echo("\nsummary")
    for line in format_rows(rows):
        click.echo(line)
    for r in rows:
        if r["engine"] == "artifact (ORT)":
            click.echo(f"T={r['tasks']:>3} batch {r['batch']}: artifact / backbone = {r['vs_backbone']:.3f} (goal <= 1.15)"
                       + (f", eager / artifact = {r['eager_vs']:.1f}" if r["eager_vs"] is not None else ""))
