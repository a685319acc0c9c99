"""``care-export bench``: the artifact against the eager PyTorch reference and the plain backbone.

For each task count T the three engines run interleaved (one call of each per round, the order
rotating), on the same inputs, in one process:

* ``eager``: ``CareViT.forward`` in PyTorch, the reference semantics (every expert on every token);
* ``artifact``: the exported graph in ONNX Runtime (CPU, every graph optimisation on);
* ``backbone``: the plain ViT without BR-MoE, exported by the same graph builder.

Latency is the median over rounds; memory is read from /proc (Linux): ``load`` is the resident
growth when the engine is loaded (weights, ORT's pre-packed copies), ``run peak`` the largest
high-water mark of one call above the resident size before it, warm-up calls included (the
first call of a batch size allocates the activations). The eager reference is slow and memory hungry at hundreds of tasks
(seconds per image), so it gets fewer rounds and skips large batches above a task count; the
output says when.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from runtime.artifact import INPUT

INPUTS = 4  # distinct inputs cycled over rounds (different routing), the same for every engine
# Idle time before each call: ORT's and OpenMP's worker threads spin for a while after a call
# and would slow whichever engine runs next.
PAUSE_S = 0.05


def _status(key: str) -> int:
    """A /proc/self/status value in bytes (0 where /proc is absent)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    except OSError:
        pass


@dataclass
class Engine:
    name: str
    run: callable
    rounds: int
    load_bytes: int
    times: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    def call(self, timed: bool = True) -> None:
        time.sleep(PAUSE_S)
        _reset_peak()
        before = _status("VmRSS")
        t0 = time.perf_counter()
        self.run()
        if timed:
            self.times.append(time.perf_counter() - t0)
        self.peak_bytes = max(self.peak_bytes, _status("VmHWM") - before)


def _load(make):
    """``(make(), resident bytes it added)``."""
    gc.collect()
    before = _status("VmRSS")
    obj = make()
    return obj, _status("VmRSS") - before


def _ort(path: Path, threads: int):
    from .parity import ort_session

    return ort_session(path, threads)


def bench_tasks(ckpt: Path, tasks: int, capacity: int, batches: list[int], rounds: int, eager_rounds: int,
                eager_max_tasks_large_batch: int, threads: int, backbone: Path, workdir: Path, echo) -> list[dict]:
    """Time the three engines at ``tasks`` tasks; one result row per (batch, engine)."""
    import torch

    from .checkpoint import load_checkpoint
    from .export import export_artifact

    art_dir = workdir / f"artifact-{tasks}"
    t0 = time.perf_counter()
    export_artifact(ckpt, art_dir, capacity, tasks=tasks, force=True)
    echo(f"T={tasks}: exported at capacity {capacity} in {time.perf_counter() - t0:.1f} s")

    model, eager_load = _load(lambda: load_checkpoint(ckpt, tasks=tasks, verify=False)[0])
    art, art_load = _load(lambda: _ort(art_dir / "model.onnx", threads))
    bb, bb_load = _load(lambda: _ort(backbone, threads))
    img = model.backbone_cfg.img_size
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        inputs = [rng.standard_normal((batch, 3, img, img), dtype=np.float32) for _ in range(INPUTS)]
        current = {}  # the input of this round, the same for every engine

        def eager_run():
            with torch.no_grad():
                model(torch.from_numpy(current["x"]))

        engines = [Engine("artifact (ORT)", lambda: art.run(None, {INPUT: current["x"]}), rounds, art_load),
                   Engine("backbone (ORT)", lambda: bb.run(None, {INPUT: current["x"]}), rounds, bb_load)]
        note = ""
        if batch > 1 and tasks > eager_max_tasks_large_batch:
            note = f"eager skipped at batch {batch} above {eager_max_tasks_large_batch} tasks"
        else:
            r = rounds if tasks <= eager_max_tasks_large_batch else eager_rounds
            engines.insert(0, Engine("eager (PyTorch)", eager_run, r, eager_load))
        for j, x in enumerate(inputs):  # warm-up: page in the weights these inputs route to, plan memory
            current["x"] = x
            for e in engines:
                if j < min(e.rounds, INPUTS):
                    e.call(timed=False)
        for i in range(max(e.rounds for e in engines)):
            current["x"] = inputs[i % INPUTS]
            # Rotate the order so that no engine always follows the same one.
            for e in engines[i % len(engines):] + engines[: i % len(engines)]:
                if i < e.rounds:
                    e.call()
        base = {e.name: float(np.median(e.times)) for e in engines}
        for e in engines:
            med = base[e.name]
            rows.append({
                "tasks": tasks, "batch": batch, "engine": e.name, "rounds": len(e.times), "ms": med * 1e3,
                "img_s": batch / med, "load_mb": e.load_bytes / 2**20, "peak_mb": e.peak_bytes / 2**20,
                "vs_backbone": med / base["backbone (ORT)"],
                "eager_vs": base["eager (PyTorch)"] / med if "eager (PyTorch)" in base else None, "note": note,
            })
    del model, art, bb
    gc.collect()
    shutil.rmtree(art_dir)
    return rows


def format_rows(rows: list[dict]) -> list[str]:
    out = [f"{'T':>4} {'batch':>5} {'engine':16} {'rounds':>6} {'median ms':>10} {'img/s':>7} {'load MB':>8} "
           f"{'run peak MB':>11} {'x backbone':>10} {'eager / this':>12}"]
    for r in rows:
        eager = f"{r['eager_vs']:.1f}" if r["eager_vs"] is not None else "-"
        out.append(f"{r['tasks']:>4} {r['batch']:>5} {r['engine']:16} {r['rounds']:>6} {r['ms']:>10.1f} "
                   f"{r['img_s']:>7.2f} {r['load_mb']:>8.0f} {r['peak_mb']:>11.0f} {r['vs_backbone']:>10.3f} {eager:>12}")
    notes = sorted({r["note"] for r in rows if r["note"]})
    return out + [f"note: {n}" for n in notes]


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

    from .export import export_backbone

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
            click.echo(f"T={r['tasks']:>3} batch {r['batch']}: artifact / backbone = {r['vs_backbone']:.3f} (goal <= 1.05)"
                       + (f", eager / artifact = {r['eager_vs']:.1f}" if r["eager_vs"] is not None else ""))
