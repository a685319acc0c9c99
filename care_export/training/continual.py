"""A continual run: the tasks of a sequence, learned one by one into a growing checkpoint.

The checkpoint is written only when a task is finished (atomically, see ``checkpoint.py``), so
an interrupted task leaves it as it was after the last finished one, and ``resume_sequence``
goes on from there. Every task seeds its own randomness from ``(seed, task)``: a resumed run
learns the next task exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader
from tqdm import tqdm

from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.errors import CareError, CheckpointError
from runtime.preprocess import Preprocessing

from ..checkpoint.format import MANIFEST, load_checkpoint, save_checkpoint
from ..data import DEFAULT_SEED
from ..data.sources import LabelledImages, TaskSequence, eval_transform, open_source, source_from_dict, train_transform
from ..model.care_vit import CareViT
from ..model.config import BackboneConfig, MoEConfig, backbone_config
from ..model.iterative import prediction_scores
from .alignment import load_statistics, save_statistics
from .distributed import SINGLE, Group
from .evaluate import Metrics, accuracy_by_task, write_metrics
from .task import TaskData, TrainConfig, learn_task

log = logging.getLogger(__name__)

STATS_FILE = "class-stats-{:04d}.safetensors"
BUILTIN_WEIGHTS = "builtin-pretrained"
REFERENCE_BACKBONE = "vit_base_patch16_224.augreg_in21k"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CareError(f"device {device} requested but CUDA is not available")
    return torch.device(device)


def _task_seed(seed: int, task: int) -> int:
    return seed * 100_003 + task


# ---------------------------------------------------------------------- provenance
def task_record(source, given: str, labels: list[int]) -> dict:
    """Where a task's data came from: the source (as reopened, and as given), its classes, image
    counts and, for a folder, a digest of its file list: enough to audit and repeat the task."""
    record = {
        "data": source.describe(),
        "given": str(given),
        "classes": [source.class_names[c] for c in labels],
        "images": {split: len(source.samples(split, labels)) for split in ("train", "test")},
    }
    if hasattr(source, "files_digest"):
        record["files_sha256"] = source.files_digest(labels)
    return record


def sequence_records(stored: dict, tasks: range) -> list[dict]:
    """Task records of a checkpoint that predates them, from its recorded sequence."""
    seq = TaskSequence.from_dict(stored)
    given = stored["data"].get("path", "builtin")
    return [
        {
            "data": stored["data"],
            "given": given,
            "classes": [stored["source_classes"][seq.order[g]] for g in seq.classes(t)],
        }
        for t in tasks
    ]


def evaluate_recorded(
    model,
    records: list[dict],
    pre: Preprocessing,
    batch_size: int,
    device,
    workers: int = 0,
    opened: dict | None = None,
    predict=None,
) -> tuple[float | None, list[float | None], list[str]]:
    """Top-1 over every task whose recorded source can still be read, accuracy per task (None for
    a skipped task), and one line per skipped task saying why. ``opened``: sources already open,
    keyed by :func:`_source_key`; ``predict``: as for :func:`accuracy_by_task`."""
    opened = dict(opened or {})
    parts, skipped, first = [], {}, 0
    for t, rec in enumerate(records):
        classes = range(first, first + len(rec["classes"]))
        first = classes.stop
        key = _source_key(rec["data"])
        if key not in opened:
            try:
                opened[key] = source_from_dict(rec["data"])
            except CareError as exc:
                opened[key] = str(exc)
        source = opened[key]
        if isinstance(source, str):
            skipped[t] = source
            continue
        index = {n: i for i, n in enumerate(source.class_names)}
        gone = [n for n in rec["classes"] if n not in index]
        if gone:
            skipped[t] = f"class {gone[0]!r} is no longer in {rec['given']}"
            continue
        order = {g: index[n] for g, n in zip(classes, rec["classes"])}
        parts.append(LabelledImages(source, "test", order, classes, eval_transform(pre)))
    lines = [f"task {t}: {why}" for t, why in skipped.items()]
    if not parts:
        return None, [None] * len(records), lines
    test = DataLoader(ConcatDataset(parts), batch_size=batch_size, num_workers=workers)
    top1, per_task = accuracy_by_task(model, test, [len(r["classes"]) for r in records], device, predict)
    return top1, [None if t in skipped else a for t, a in enumerate(per_task)], lines


def _source_key(description: dict) -> str:
    return json.dumps(description, sort_keys=True)


class ContinualRun:
    """A checkpoint directory being grown, with everything needed to learn its next task.

    ``plan`` maps each task still to learn to ``(source, path as given, source labels)``; by
    default the tasks of ``sequence`` on ``source``. A task learned from new data follows the
    sequence's tasks. If learning a task fails, the model in memory holds a half-learned task:
    reopen the checkpoint with :func:`resume_sequence` rather than calling :meth:`learn_next` again.
    """

    def __init__(
        self,
        directory,
        model,
        sequence: TaskSequence,
        source,
        preprocessing: Preprocessing,
        cfg: TrainConfig,
        *,
        limit: int,
        weights: str,
        stats=None,
        metrics: Metrics | None = None,
        device="cpu",
        plan: dict | None = None,
        records: list[dict] | None = None,
        class_names: list[str] | None = None,
        sequence_record: dict | None = None,
        group: Group = SINGLE,
    ):
        if plan is None:
            if not model.num_tasks < limit <= sequence.num_tasks:
                raise CareError(
                    f"cannot train up to task {limit}: the checkpoint has {model.num_tasks} tasks and "
                    f"the sequence {sequence.num_tasks}"
                )
            given = str(getattr(source, "root", "builtin"))
            plan = {
                t: (source, given, [sequence.order[g] for g in sequence.classes(t)])
                for t in range(model.num_tasks, limit)
            }
        self.directory = Path(directory)
        self.group = group
        self.model = model.to(device)
        self.sequence, self.source, self.preprocessing, self.cfg = sequence, source, preprocessing, cfg
        self.limit, self.weights, self.device, self.plan = limit, weights, device, plan
        self.sequence_record = sequence_record or dict(data=source.describe(), source_classes=list(source.class_names))
        self.records = list(records or [])
        self.class_names = list(class_names or [])
        self.stats = list(stats or [])
        self.metrics = metrics or Metrics()

    # ------------------------------------------------------------------ one task
    def train_next(self, progress: bool = True) -> tuple[int, dict]:
        """Learn the next task of the plan into the model and the run's records, without
        evaluating or saving; returns the task and its classes' statistics."""
        task = self.model.num_tasks
        seq, cfg = self.sequence, self.cfg
        source, given, labels = self.plan[task]
        torch.manual_seed(_task_seed(seq.seed, task))
        self.model.add_task(len(labels))
        classes = range(self.model.num_classes - len(labels), self.model.num_classes)
        order = dict(zip(classes, labels))

        def images(transform):
            return LabelledImages(source, "train", order, classes, transform)

        data = TaskData(
            images(train_transform(self.preprocessing, cfg.crop_scale, cfg.input_set)),
            images(eval_transform(self.preprocessing)),
            cfg,
            torch.Generator().manual_seed(_task_seed(seq.seed, task)),
            self.group,
        )
        own = learn_task(
            self.model, task, data, self.stats, cfg, device=self.device, progress=progress and self.group.main
        )
        self.records.append(task_record(source, given, labels))
        self.class_names += [source.class_names[c] for c in labels]
        self.stats.append({k: v.to(self.device) for k, v in own.items()})
        return task, own

    def learn_next(self, progress: bool = True) -> None:
        """Learn the next task of the plan, evaluate it (every ``eval_every``-th task and the
        last) and save the checkpoint."""
        t0 = time.perf_counter()
        task, own = self.train_next(progress)
        if not self.group.main:  # rank 0 evaluates and writes the checkpoint
            self.group.barrier()
            return
        trained = time.perf_counter() - t0
        seq, cfg, source = self.sequence, self.cfg, self.plan[task][0]
        classes = range(self.model.num_classes - self.model.task_classes[task], self.model.num_classes)
        evaluated = (task + 1) % cfg.eval_every == 0 or task + 1 == self.limit
        top1, per_task, skipped = None, [None] * len(self.records), []
        if evaluated:
            top1, per_task, skipped = evaluate_recorded(
                self.model,
                self.records,
                self.preprocessing,
                3 * cfg.batch_size,
                self.device,
                cfg.workers,
                {_source_key(source.describe()): source},
                partial(prediction_scores, self.model, mode=cfg.eval_mode, scale=cfg.scale),
            )
        self.metrics.add(top1, per_task)
        spent = time.perf_counter() - t0
        self.directory.mkdir(parents=True, exist_ok=True)
        save_statistics(own, self.directory / STATS_FILE.format(task))
        self._save()
        self.group.barrier()
        for line in skipped:
            log.warning(f"evaluation skipped {line}")
        head = (
            f"task {task} ({task + 1}/{max(seq.num_tasks, self.limit)}): classes {classes.start}-{classes.stop - 1}, "
        )
        if evaluated:
            old = [a for a in per_task[:-1] if a is not None]
            old = f", old tasks {sum(old) / len(old):.1f}%" if old else ""
            seen = "n/a" if top1 is None else f"{top1:.2f}%"
            new = "n/a" if per_task[-1] is None else f"{per_task[-1]:.1f}%"
            head += f"top-1 over {self.model.num_classes} seen classes {seen} (new task {new}{old})"
        else:
            head += f"not evaluated (--eval-every {cfg.eval_every})"
        # Training, evaluation and saving apart (to the hundredth: a task trains in seconds),
        # so that what grows with the task count shows.
        done = time.perf_counter() - t0
        log.info(
            f"{head} in {done:.1f} s (training {trained:.2f} s, evaluation {spent - trained:.2f} s, "
            f"saving {done - spent:.2f} s)"
        )

    def _save(self) -> None:
        seq = self.sequence
        extra = {
            "sequence": dict(seq.to_dict(), tasks=min(self.limit, seq.num_tasks), **self.sequence_record),
            "task_data": self.records,
            "training": dict(self.cfg.to_dict(), backbone_weights=self.weights),
            "class_stats": [STATS_FILE.format(t) for t in range(self.model.num_tasks)],
            "metrics": self.metrics.to_dict(),
        }
        names = self.class_names
        save_checkpoint(self.model, self.directory, class_names=names, preprocessing=self.preprocessing, extra=extra)
        write_metrics(self.directory, self.metrics)

    def run(self, progress: bool = True) -> Metrics:
        """Learn tasks until ``limit``; the checkpoint is saved after each."""
        todo = range(self.model.num_tasks, self.limit)
        for _ in tqdm(
            todo, desc="tasks", unit="task", disable=None if progress and len(todo) > 1 and self.group.main else True
        ):
            self.learn_next(progress)
        return self.metrics


# ---------------------------------------------------------------------- starting and resuming
def default_backbone(weights: str | Path | None) -> BackboneConfig:
    if weights == BUILTIN_WEIGHTS:
        from .pretrain import BUILTIN_BACKBONE

        return BUILTIN_BACKBONE
    if weights == "hub":  # the reference's backbone: ViT-B/16 pre-trained on ImageNet-21K
        return backbone_config(REFERENCE_BACKBONE)
    return backbone_config("vit_base_patch16_224")


def build_care_vit(
    backbone: BackboneConfig,
    weights: str | Path | None,
    moe: MoEConfig,
    *,
    seed: int = DEFAULT_SEED,
    cache_dir=None,
    progress: bool = True,
    data: str | Path = "builtin",
) -> tuple[CareViT, str, Preprocessing]:
    """The untrained model, a description of its backbone weights, and the default preprocessing.

    ``weights``: ``"builtin-pretrained"`` (a small ViT pre-trained on built-in classes, cached),
    ``"hub"`` (timm's pretrained weights), a local file, or None (random, for tests). The
    model's random initialisation (shared experts) depends on ``seed`` only. ``data`` picks the
    built-in pre-training (``pretrain.pretrain_config``: ``builtin-shift`` has its own).
    """
    if weights == BUILTIN_WEIGHTS:
        from .pretrain import builtin_preprocessing, pretrain_config, pretrained_backbone

        pre_cfg = pretrain_config(data, backbone)
        path = pretrained_backbone(pre_cfg, cache_dir, progress=progress)
        torch.manual_seed(seed)
        return (
            CareViT(backbone, moe, path),
            f"{BUILTIN_WEIGHTS}:{pre_cfg.key()}",
            builtin_preprocessing(backbone.img_size),
        )
    torch.manual_seed(seed)
    # The reference feeds unnormalised [0, 1] pixels to its ViTs.
    return CareViT(backbone, moe, weights), str(weights or "random"), Preprocessing.for_input(backbone.img_size)


def train_sequence(
    out: str | Path,
    *,
    data: str | Path = "builtin",
    builtin: dict | None = None,
    init_cls: int = 10,
    increment: int = 10,
    tasks: int | None = None,
    seed: int = DEFAULT_SEED,
    backbone: BackboneConfig | None = None,
    weights: str | Path | None = BUILTIN_WEIGHTS,
    moe: MoEConfig = MoEConfig(),
    cfg: TrainConfig = TrainConfig(),
    preprocessing: Preprocessing | None = None,
    cache_dir=None,
    device: str = "auto",
    progress: bool = True,
    group: Group = SINGLE,
) -> Path:
    """Learn the first ``tasks`` tasks (all by default) of a sequence into a new checkpoint ``out``.

    ``builtin``: settings of the built-in dataset (``num_classes``, ``train_per_class``,
    ``test_per_class``, ``seed``); its image size is the backbone's. ``preprocessing``: mean and
    std of the input (default: those of the backbone weights' training). ``group``: the
    processes training together (``distributed.from_environment()`` under torchrun).
    """
    out = Path(out)
    if (out / MANIFEST).exists():
        raise CareError(f"{out} already holds a checkpoint; resume it, or choose another directory")
    backbone = backbone or default_backbone(weights)
    source = open_source(
        data,
        sequence=dict(init_cls=init_cls, increment=increment, order_seed=seed),
        **dict(dict(num_classes=100), **(builtin or {}), image_size=backbone.img_size),
    )
    sequence = TaskSequence.build(source.num_classes, init_cls, increment, seed)
    limit = sequence.num_tasks if tasks is None else tasks
    if limit > sequence.num_tasks:
        raise CareError(
            f"--tasks {limit}: the sequence has only {sequence.num_tasks} tasks "
            f"({source.num_classes} classes, init {init_cls}, increment {increment})"
        )
    dev = group.device(resolve_device(device))
    if group.distributed and weights == BUILTIN_WEIGHTS:  # pre-trained once, by rank 0, into the cache
        if group.main:
            from .pretrain import pretrain_config, pretrained_backbone

            pretrained_backbone(pretrain_config(data, backbone), cache_dir, progress=progress)
        group.barrier()
    model, weights_desc, default_pre = build_care_vit(
        backbone, weights, moe, seed=seed, cache_dir=cache_dir, progress=progress and group.main, data=data
    )
    run = ContinualRun(
        out,
        model,
        sequence,
        source,
        preprocessing or default_pre,
        cfg,
        limit=limit,
        weights=weights_desc,
        device=dev,
        group=group,
    )
    run.run(progress)
    return out


def resume_sequence(
    directory: str | Path,
    *,
    tasks: int | None = None,
    overrides: dict | None = None,
    data: str | Path | None = None,
    skip_known: bool = False,
    device: str = "auto",
    progress: bool = True,
    group: Group = SINGLE,
) -> Path:
    """Go on learning a checkpoint made by :func:`train_sequence`.

    Without ``data``, or with ``data`` holding the classes of the recorded sequence (a folder
    that has moved): finish the run if it was interrupted, else learn the sequence's next task;
    with ``tasks``, learn until the checkpoint holds ``tasks`` tasks. With ``data`` holding other
    classes (a finished sequence only): learn the classes the checkpoint does not know as one
    new task; ``skip_known`` leaves known ones out instead of refusing. ``overrides`` replace
    stored training settings.
    """
    directory = Path(directory)
    manifest = read_checkpoint_manifest(directory)
    if "class_order" not in manifest.get("sequence", {}) or "training" not in manifest:
        raise CheckpointError(f"{directory}: not written by care-export train (no task sequence); cannot resume it")
    stored = manifest["sequence"]
    sequence = TaskSequence.from_dict(stored)
    training = dict(manifest["training"])
    cfg = TrainConfig.from_dict(training)
    if overrides:
        if overrides.get("ca_method", cfg.ca_method) != cfg.ca_method:
            raise CareError(f"{directory} stores class statistics for --ca-method {cfg.ca_method}; it cannot change")
        cfg = replace(cfg, **overrides)
    learned = len(manifest["tasks"])
    in_sequence = min(learned, sequence.num_tasks)
    if [int(t["classes"]) for t in manifest["tasks"][:in_sequence]] != list(sequence.sizes[:in_sequence]):
        raise CheckpointError(f"{directory}: its tasks do not match its recorded sequence")
    source = open_source(data) if data is not None else None
    new_data = source is not None and list(source.class_names) != stored["source_classes"]
    if new_data:
        if learned < sequence.num_tasks:
            raise CareError(
                f"the data's classes differ from those {directory} was trained on, and its sequence is "
                f"not finished ({learned} of {sequence.num_tasks} tasks): finish it first with "
                f"care-export train --resume {directory}"
            )
        if tasks is not None and tasks != learned + 1:
            raise CareError(f"--tasks {tasks}: new data is learned as one task (task {learned})")
        labels = _new_labels(source, manifest["classes"]["names"], data, directory, skip_known)
        plan, limit = {learned: (source, str(data), labels)}, learned + 1
    else:
        if learned >= sequence.num_tasks:
            raise CareError(
                f"{directory} already holds all {sequence.num_tasks} tasks of its sequence; learn new "
                f"classes with --data NEW_FOLDER"
            )
        source = source or source_from_dict(stored["data"])
        limit = tasks if tasks is not None else (stored["tasks"] if stored["tasks"] > learned else learned + 1)
        if limit > sequence.num_tasks:
            raise CareError(f"--tasks {limit}: the sequence of {directory} has only {sequence.num_tasks} tasks")
        if limit <= learned:
            raise CareError(f"--tasks {limit}: {directory} already holds {learned} tasks")
        plan = {
            t: (
                source,
                str(data or stored["data"].get("path", "builtin")),
                [sequence.order[g] for g in sequence.classes(t)],
            )
            for t in range(learned, limit)
        }
    model, _ = load_checkpoint(directory)
    dev = group.device(resolve_device(device))
    stats = [{k: v.to(dev) for k, v in load_statistics(directory / f).items()} for f in manifest["class_stats"]]
    run = ContinualRun(
        directory,
        model,
        sequence,
        source,
        Preprocessing.from_dict(manifest["preprocessing"]),
        cfg,
        limit=limit,
        weights=training["backbone_weights"],
        stats=stats,
        metrics=Metrics.from_dict(manifest.get("metrics")),
        device=dev,
        plan=plan,
        records=manifest.get("task_data") or sequence_records(stored, range(learned)),
        class_names=manifest["classes"]["names"],
        sequence_record={k: stored[k] for k in ("data", "source_classes")},
        group=group,
    )
    run.run(progress)
    return directory


def _new_labels(source, known_names: list[str], data, directory: Path, skip_known: bool) -> list[int]:
    """Labels of ``source``'s classes that the checkpoint does not know (refusing known ones
    unless ``skip_known``)."""
    known = set(known_names)
    overlap = [n for n in source.class_names if n in known]
    if overlap and not skip_known:
        more = f" (and {len(overlap) - 1} more)" if len(overlap) > 1 else ""
        raise CareError(
            f"class {overlap[0]!r} of {data} is already known to {directory}{more}; pass --skip-known "
            f"to leave known classes out"
        )
    labels = [i for i, n in enumerate(source.class_names) if n not in known]
    if not labels:
        raise CareError(f"{data} holds no class that {directory} does not know")
    if overlap:
        log.info(f"skipping {len(overlap)} class(es) {directory} already knows: {', '.join(overlap)}")
    return labels
