"""A continual run: the tasks of a sequence, learned one by one into a growing checkpoint.

The checkpoint is written only when a task is finished (atomically, see ``checkpoint.py``), so
an interrupted task leaves it as it was after the last finished one, and ``resume_sequence``
goes on from there. Every task seeds its own randomness from ``(seed, task)``: a resumed run
learns the next task exactly as an uninterrupted run would.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from runtime.errors import CareError, CheckpointError

from .alignment import load_statistics, save_statistics
from .checkpoint import MANIFEST, load_checkpoint, read_manifest, save_checkpoint
from .config import BackboneConfig, MoEConfig, Preprocessing, backbone_config
from .datasets import (DEFAULT_SEED, LabelledImages, TaskSequence, eval_transform, open_source, source_from_dict,
                       train_transform)
from .evaluate import Metrics, accuracy_by_task, write_metrics
from .iterative import prediction_scores
from .model import CareViT
from .train import TaskData, TrainConfig, learn_task

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


class ContinualRun:
    """A checkpoint directory being grown, with everything needed to learn its next task.

    If learning a task fails, the model in memory holds a half-learned task: reopen the
    checkpoint with :func:`resume_sequence` rather than calling :meth:`learn_next` again.
    """

    def __init__(self, directory, model, sequence: TaskSequence, source, preprocessing: Preprocessing,
                 cfg: TrainConfig, *, limit: int, weights: str, stats=None, metrics: Metrics | None = None,
                 device="cpu"):
        if not model.num_tasks < limit <= sequence.num_tasks:
            raise CareError(f"cannot train up to task {limit}: the checkpoint has {model.num_tasks} tasks and the "
                            f"sequence {sequence.num_tasks}")
        self.directory = Path(directory)
        self.model = model.to(device)
        self.sequence, self.source, self.preprocessing, self.cfg = sequence, source, preprocessing, cfg
        self.limit, self.weights, self.device = limit, weights, device
        self.stats = list(stats or [])
        self.metrics = metrics or Metrics()

    # ------------------------------------------------------------------ one task
    def _images(self, split: str, classes, transform):
        return LabelledImages(self.source, split, self.sequence.order, classes, transform)

    def learn_next(self, progress: bool = True) -> None:
        task = self.model.num_tasks
        seq, cfg = self.sequence, self.cfg
        t0 = time.perf_counter()
        torch.manual_seed(_task_seed(seq.seed, task))
        self.model.add_task(seq.sizes[task])
        classes = seq.classes(task)
        augment = train_transform(self.preprocessing, cfg.crop_scale, cfg.input_set)
        data = TaskData(self._images("train", classes, augment),
                        self._images("train", classes, eval_transform(self.preprocessing)), cfg,
                        torch.Generator().manual_seed(_task_seed(seq.seed, task)))
        own = learn_task(self.model, task, data, self.stats, cfg, device=self.device, progress=progress)
        self.model.requires_grad_(False)

        test = DataLoader(self._images("test", seq.seen(task), eval_transform(self.preprocessing)),
                          batch_size=3 * cfg.batch_size, num_workers=cfg.workers)
        top1, per_task = accuracy_by_task(self.model, test, list(seq.sizes[: task + 1]), self.device,
                                          partial(prediction_scores, self.model, mode=cfg.eval_mode, scale=cfg.scale))
        self.metrics.add(top1, per_task)
        self.directory.mkdir(parents=True, exist_ok=True)
        save_statistics(own, self.directory / STATS_FILE.format(task))
        self.stats.append({k: v.to(self.device) for k, v in own.items()})
        self._save()
        old = f", old tasks {sum(per_task[:-1]) / task:.1f}%" if task else ""
        tqdm.write(f"task {task} ({task + 1}/{seq.num_tasks}): classes {classes.start}-{classes.stop - 1}, top-1 over "
                   f"{len(seq.seen(task))} seen classes {top1:.2f}% (new task {per_task[-1]:.1f}%{old}) "
                   f"in {time.perf_counter() - t0:.1f} s")

    def _save(self) -> None:
        seq = self.sequence
        names = [self.source.class_names[seq.order[g]] for g in range(self.model.num_classes)]
        extra = {
            "sequence": dict(seq.to_dict(), tasks=self.limit, data=self.source.describe(),
                             source_classes=list(self.source.class_names)),
            "training": dict(self.cfg.to_dict(), backbone_weights=self.weights),
            "class_stats": [STATS_FILE.format(t) for t in range(self.model.num_tasks)],
            "metrics": self.metrics.to_dict(),
        }
        save_checkpoint(self.model, self.directory, class_names=names, preprocessing=self.preprocessing, extra=extra)
        write_metrics(self.directory, self.metrics)

    def run(self, progress: bool = True) -> Metrics:
        """Learn tasks until ``limit``; the checkpoint is saved after each."""
        todo = range(self.model.num_tasks, self.limit)
        for _ in tqdm(todo, desc="tasks", unit="task", disable=not progress or len(todo) < 2):
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


def build_model(backbone: BackboneConfig, weights: str | Path | None, moe: MoEConfig, *, seed: int = DEFAULT_SEED,
                cache_dir=None, progress: bool = True) -> tuple[CareViT, str, Preprocessing]:
    """The untrained model, a description of its backbone weights, and the default preprocessing.

    ``weights``: ``"builtin-pretrained"`` (a small ViT pre-trained on built-in classes, cached),
    ``"hub"`` (timm's pretrained weights), a local file, or None (random, for tests). The
    model's random initialisation (shared experts) depends on ``seed`` only.
    """
    if weights == BUILTIN_WEIGHTS:
        from .pretrain import PretrainConfig, pretrained_backbone

        pre_cfg = PretrainConfig(backbone=backbone)
        path = pretrained_backbone(pre_cfg, cache_dir, progress=progress)
        torch.manual_seed(seed)
        pre = Preprocessing.for_input(backbone.img_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # as pre-training
        return CareViT(backbone, moe, path), f"{BUILTIN_WEIGHTS}:{pre_cfg.key()}", pre
    torch.manual_seed(seed)
    # The reference feeds unnormalised [0, 1] pixels to its ViTs.
    return CareViT(backbone, moe, weights), str(weights or "random"), Preprocessing.for_input(backbone.img_size)


def train_sequence(out: str | Path, *, data: str | Path = "builtin", builtin: dict | None = None,
                   init_cls: int = 10, increment: int = 10, tasks: int | None = None, seed: int = DEFAULT_SEED,
                   backbone: BackboneConfig | None = None, weights: str | Path | None = BUILTIN_WEIGHTS,
                   moe: MoEConfig = MoEConfig(), cfg: TrainConfig = TrainConfig(),
                   preprocessing: Preprocessing | None = None, cache_dir=None, device: str = "auto",
                   progress: bool = True) -> Path:
    """Learn the first ``tasks`` tasks (all by default) of a sequence into a new checkpoint ``out``.

    ``builtin``: settings of the built-in dataset (``num_classes``, ``train_per_class``,
    ``test_per_class``, ``seed``); its image size is the backbone's. ``preprocessing``: mean and
    std of the input (default: those of the backbone weights' training).
    """
    out = Path(out)
    if (out / MANIFEST).exists():
        raise CareError(f"{out} already holds a checkpoint; resume it, or choose another directory")
    backbone = backbone or default_backbone(weights)
    source = open_source(data, **dict(dict(num_classes=100), **(builtin or {}), image_size=backbone.img_size))
    sequence = TaskSequence.build(source.num_classes, init_cls, increment, seed)
    limit = sequence.num_tasks if tasks is None else tasks
    if limit > sequence.num_tasks:
        raise CareError(f"--tasks {limit}: the sequence has only {sequence.num_tasks} tasks "
                        f"({source.num_classes} classes, init {init_cls}, increment {increment})")
    dev = resolve_device(device)
    model, weights_desc, default_pre = build_model(backbone, weights, moe, seed=seed, cache_dir=cache_dir,
                                                   progress=progress)
    run = ContinualRun(out, model, sequence, source, preprocessing or default_pre, cfg, limit=limit,
                       weights=weights_desc, device=dev)
    run.run(progress)
    return out


def resume_sequence(directory: str | Path, *, tasks: int | None = None, overrides: dict | None = None,
                    data: str | Path | None = None, device: str = "auto", progress: bool = True) -> Path:
    """Go on learning the sequence of a checkpoint made by :func:`train_sequence`.

    Without ``tasks``: finish the run if it was interrupted, else learn one more task. With it:
    learn until the checkpoint holds ``tasks`` tasks. ``overrides`` replace stored training
    settings; ``data`` points to an image folder that has moved.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if "class_order" not in manifest.get("sequence", {}) or "training" not in manifest:
        raise CheckpointError(f"{directory}: not written by care-export train (no task sequence); cannot resume it")
    stored = manifest["sequence"]
    sequence = TaskSequence.from_dict(stored)
    source = source_from_dict(stored["data"]) if data is None else open_source(data)
    if list(source.class_names) != stored["source_classes"]:
        raise CareError(f"the data's classes differ from those {directory} was trained on")
    training = dict(manifest["training"])
    cfg = TrainConfig.from_dict(training)
    if overrides:
        if overrides.get("ca_method", cfg.ca_method) != cfg.ca_method:
            raise CareError(f"{directory} stores class statistics for --ca-method {cfg.ca_method}; it cannot change")
        cfg = replace(cfg, **overrides)
    model, _ = load_checkpoint(directory)
    learned = model.num_tasks
    if list(model.task_classes) != list(sequence.sizes[:learned]):
        raise CheckpointError(f"{directory}: its tasks do not match its recorded sequence")
    if learned == sequence.num_tasks:
        raise CareError(f"{directory} already holds all {learned} tasks of its sequence")
    if tasks is not None:
        limit = tasks
    else:
        limit = stored["tasks"] if stored["tasks"] > learned else learned + 1
    if limit > sequence.num_tasks:
        raise CareError(f"--tasks {limit}: the sequence of {directory} has only {sequence.num_tasks} tasks")
    if limit <= learned:
        raise CareError(f"--tasks {limit}: {directory} already holds {learned} tasks")
    dev = resolve_device(device)
    stats = [{k: v.to(dev) for k, v in load_statistics(directory / f).items()} for f in manifest["class_stats"]]
    run = ContinualRun(directory, model, sequence, source, Preprocessing.from_dict(manifest["preprocessing"]), cfg,
                       limit=limit, weights=training["backbone_weights"], stats=stats,
                       metrics=Metrics.from_dict(manifest.get("metrics")), device=dev)
    run.run(progress)
    return directory
