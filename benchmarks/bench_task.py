"""Seconds to learn one task at several points of a long sequence, side by side: the first T
tasks of a sequence checkpoint made by ``care-export train`` (e.g. a B100-Inc3 run of 301
tasks), then task T learned again from its recorded data, with the checkpoint's settings and
each classifier-alignment schedule given (``ref``: one step per learned class, the reference's;
a number: ``--ca-steps``). What ``care-export train`` logs as a task's training time: no
evaluation, no saving. Before each timing the model is left as a run leaves it after learning
task T-1 (its frozen parts cached by one training forward of T-1), not as a fresh load. Every
(T, schedule) runs once per round, interleaved; medians.

    python benchmarks/bench_task.py CKPT --tasks 10 298 --ca-steps ref 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from care_export.checkpoint.format import load_checkpoint
from care_export.data.sources import TaskSequence, source_from_dict
from care_export.training.alignment import load_statistics
from care_export.training.continual import ContinualRun
from care_export.training.task import TrainConfig, set_trainable
from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.preprocess import Preprocessing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path, help="a checkpoint of care-export train holding more than max(--tasks) tasks")
    ap.add_argument("--tasks", type=int, nargs="+", default=[10, 298], help="tasks T learned again")
    ap.add_argument("--ca-steps", nargs="+", default=["ref"], help="alignment schedules: ref or a step cap")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    manifest = read_checkpoint_manifest(args.ckpt)
    stored = manifest["sequence"]
    if max(args.tasks) >= len(manifest["tasks"]):
        ap.error(f"{args.ckpt} holds {len(manifest['tasks'])} tasks: --tasks must stay below that")
    sequence, source = TaskSequence.from_dict(stored), source_from_dict(stored["data"])
    base = TrainConfig.from_dict(manifest["training"])
    preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    schedules = {s: None if s == "ref" else int(s) for s in args.ca_steps}
    learned = {t: load_checkpoint(args.ckpt, tasks=t, verify=False)[0] for t in args.tasks}
    stats = {t: [load_statistics(args.ckpt / f) for f in manifest["class_stats"][:t]] for t in args.tasks}

    times: dict[tuple[int, str], list[float]] = {(t, s): [] for t in args.tasks for s in schedules}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for t in args.tasks:
                for name, steps in schedules.items():
                    run = ContinualRun(
                        tmp,
                        copy.deepcopy(learned[t]),
                        sequence,
                        source,
                        preprocessing,
                        replace(base, ca_steps=steps),
                        limit=t + 1,
                        weights=manifest["training"]["backbone_weights"],
                        stats=stats[t],
                    )
                    settle(run.model, t)
                    start = time.perf_counter()
                    run.train_next(progress=False)
                    times[t, name].append(time.perf_counter() - start)

    first = min(args.tasks)
    print(f"{args.ckpt}: {len(manifest['tasks'])} tasks; medians of {args.rounds}, interleaved")
    print(f"{'T':>5} {'classes':>8} {'schedule':>9} {'s/task':>8} {'vs T=' + str(first):>9}")
    for t in args.tasks:
        classes = sum(int(e["classes"]) for e in manifest["tasks"][: t + 1])
        for name in schedules:
            med = statistics.median(times[t, name])
            ratio = med / statistics.median(times[first, name])
            print(f"{t:>5} {classes:>8} {name:>9} {med:>8.2f} {ratio:>8.2f}x")


def settle(model, task: int) -> None:
    """Leave ``model`` (tasks ``0..task-1``) as a run does after learning ``task - 1``: the
    frozen parts of that task's training cached (one training forward), every parameter frozen."""
    set_trainable(model, task - 1)
    size = model.backbone_cfg.img_size
    with torch.random.fork_rng():
        model.train().forward_train(torch.zeros(1, 3, size, size), task - 1)
    model.requires_grad_(False)


if __name__ == "__main__":
    main()
