"""``care-export train``: learn a task sequence into a growing checkpoint, or resume one."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import click
from click.core import ParameterSource

from runtime.numerics import COS_SCALE

from ..data import DEFAULT_SEED, INPUT_SETS
from .checkpoint import moe_options, reference_options
from .log import hint, say

log = logging.getLogger(__name__)

# Options that define the model or the sequence: a resumed run takes them from the checkpoint.
_FIXED_ON_RESUME = (
    "builtin_classes",
    "builtin_train",
    "builtin_test",
    "init_cls",
    "increment",
    "seed",
    "backbone",
    "img_size",
    "patch_size",
    "depth",
    "backbone_weights",
    "topk_routers",
    "topk_experts",
    "expert_dim",
    "shared_dim",
    "mean",
    "std",
    "method",
)
# Training settings: on resume, the ones given replace the stored ones.
_TRAINING = (
    "epochs",
    "lr",
    "min_lr",
    "batch_size",
    "weight_decay",
    "ca_lr",
    "ca_epochs",
    "ca_steps",
    "ca_method",
    "min_crop",
    "workers",
    "align_decay",
    "amp",
    "eval_mode",
    "eval_every",
    "scale",
    "margin",
    "aux_cos_loss",
    "self_dist_loss",
    "input_set",
)


@click.command("train")
@reference_options()
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="New checkpoint directory.")
@click.option("--resume", type=click.Path(path_type=Path), help="Checkpoint whose sequence to continue.")
@click.option(
    "--data",
    default="builtin",
    show_default=True,
    help="'builtin' (procedural images), 'builtin-shift' (procedural images the built-in backbone "
    "never saw, one domain per task, classes told apart by hue; its own hue-invariant backbone) or "
    "an image folder: one sub-folder per class, or train/ and test/ each holding them. With "
    "--resume: a folder of classes the checkpoint does not know is learned as its next task.",
)
@click.option(
    "--skip-known",
    is_flag=True,
    help="With --resume --data NEW: leave out the classes of NEW that the "
    "checkpoint already knows (default: refuse them).",
)
@click.option(
    "--builtin-classes",
    default=100,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Classes of the built-in dataset.",
)
@click.option(
    "--builtin-train",
    default=60,
    show_default=True,
    type=click.IntRange(min=2),
    help="Built-in training images per class.",
)
@click.option(
    "--builtin-test", default=20, show_default=True, type=click.IntRange(min=1), help="Built-in test images per class."
)
@click.option(
    "--init-cls", default=10, show_default=True, type=click.IntRange(min=1), help="Classes of the first task."
)
@click.option(
    "--increment",
    default=10,
    show_default=True,
    type=click.IntRange(min=1),
    help="Classes of every later task (the remainder forms a last task).",
)
@click.option(
    "--learn-tasks",
    "--tasks",
    "tasks",
    type=click.IntRange(min=1),
    help="Learn until the checkpoint "
    "holds this many tasks (default: the whole sequence; with --resume: finish an interrupted run, else one "
    "more task). --tasks is the old name.",
)
@click.option("--seed", default=DEFAULT_SEED, show_default=True, help="Class order and training randomness.")
@click.option(
    "--backbone",
    default=None,
    help="timm ViT name [default: the built-in ViT with builtin-pretrained weights, else vit_base_patch16_224].",
)
@click.option("--img-size", type=int, default=None, help="Override the input size.")
@click.option("--patch-size", type=int, default=None, help="Override the patch size.")
@click.option("--depth", type=int, default=None, help="Override the number of blocks.")
@click.option(
    "--backbone-weights",
    default=None,
    help="A file (safetensors or timm checkpoint), 'hub' (timm's "
    "pretrained weights), or 'builtin-pretrained' (pre-trained here on built-in classes no sequence "
    "uses, cached) [default: builtin-pretrained with built-in data, else hub].",
)
@moe_options
@click.option(
    "--epochs",
    default=20,
    show_default=True,
    type=click.IntRange(min=2),
    help="Epochs of task 0; later tasks train two rounds of epochs // 2.",
)
@click.option("--lr", default=0.01, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--min-lr", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Final lr of the cosine.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--weight-decay", default=5e-4, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--ca-lr",
    default=0.005,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Classifier-alignment lr.",
)
@click.option(
    "--ca-epochs",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Classifier-alignment epochs after each round of a task > 0.",
)
@click.option(
    "--ca-steps",
    type=click.IntRange(min=1),
    help="Cap on the steps per alignment epoch (default: one per learned class, the reference's; "
    "its cost grows with the square of the class count).",
)
@click.option(
    "--ca-method",
    default="covariance",
    show_default=True,
    type=click.Choice(["covariance", "variance"]),
    help="Class statistics kept for alignment (variance: d numbers per class instead of d*d).",
)
@click.option(
    "--min-crop",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Smallest area fraction of the random-resized-crop augmentation.",
)
@click.option(
    "--method",
    default="care",
    show_default=True,
    type=click.Choice(["care", "frozen", "shared-adapter"]),
    help="care, or a baseline with the same data and budget: frozen (cosine head and classifier "
    "alignment on the frozen backbone) or shared-adapter (one adapter fine-tuned through all tasks).",
)
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="Data-loading processes.")
@click.option(
    "--scale",
    default=COS_SCALE,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="s of the angular loss and of the alignment logits.",
)
@click.option("--margin", default=0.0, show_default=True, type=float, help="CosFace margin m (reference key 'm').")
@click.option(
    "--aux-cos-loss/--no-aux-cos-loss",
    default=True,
    show_default=True,
    help="Perceptors' loss: the angular loss, or plain cross-entropy on their raw logits.",
)
@click.option(
    "--self-dist-loss/--no-self-dist-loss",
    default=True,
    show_default=True,
    help="The perceptors' KL term towards the head.",
)
@click.option(
    "--align-decay",
    default="off",
    show_default=True,
    type=click.Choice(["reference", "off"]),
    help="Scale class means before alignment sampling as the reference's 'decay: true' does (docs/MODEL.md).",
)
@click.option(
    "--amp/--no-amp",
    default=False,
    show_default=True,
    help="Mixed-precision training forward: float16 with a gradient scaler on CUDA, bfloat16 on CPU.",
)
@click.option(
    "--eval",
    "eval_mode",
    default="single",
    show_default=True,
    type=click.Choice(["single", "iterative"]),
    help="After-task evaluation: the single pass, or the reference's iterative prediction (tasks 1..60; "
    "a configuration implies iterative unless it says iter_pred: false).",
)
@click.option(
    "--eval-every",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Evaluate after every N-th task and the last task of the run (other tasks record no accuracy; "
    "A-bar averages the evaluated ones). Evaluating all seen classes grows with their number.",
)
@click.option(
    "--input-set",
    default="common",
    show_default=True,
    type=click.Choice(INPUT_SETS),
    help="The reference's training transform of that dataset (a configuration's dataset sets it).",
)
@click.option("--mean", nargs=3, type=float, default=None, help="Input normalisation mean [default: the weights'].")
@click.option("--std", nargs=3, type=float, default=None, help="Input normalisation std [default: the weights'].")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="Where the built-in pre-trained ViT is cached "
    "[default: $CARE_EXPORT_CACHE, else $XDG_CACHE_HOME/care-export, else ~/.cache/care-export].",
)
@click.option(
    "--quiet",
    is_flag=True,
    help="No progress bars (the per-task lines stay; bars are drawn only on a terminal anyway).",
)
def train_command(
    out,
    resume,
    data,
    skip_known,
    builtin_classes,
    builtin_train,
    builtin_test,
    init_cls,
    increment,
    tasks,
    seed,
    backbone,
    img_size,
    patch_size,
    depth,
    backbone_weights,
    topk_routers,
    topk_experts,
    expert_dim,
    shared_dim,
    epochs,
    lr,
    min_lr,
    batch_size,
    weight_decay,
    ca_lr,
    ca_epochs,
    ca_steps,
    ca_method,
    min_crop,
    method,
    workers,
    scale,
    margin,
    aux_cos_loss,
    self_dist_loss,
    align_decay,
    amp,
    eval_mode,
    eval_every,
    input_set,
    mean,
    std,
    device,
    cache_dir,
    quiet,
):
    """Learn a class-incremental task sequence, task after task, into a checkpoint directory.

    After every task the checkpoint is saved and evaluated (top-1 over all classes seen so far,
    single-pass inference, or --eval iterative: the reference's iterative prediction) on the test images of every task's recorded data (a task whose data
    is gone is skipped, and named); the accuracy table goes to CKPT/metrics.json. An interrupted
    task leaves the checkpoint as it was after the last finished task: --resume goes on from there.

    \b
    Example (built-in data, 100 classes in tasks of 10; learn 8 tasks, then the 9th):
      care-export train -o ckpt/ --data builtin --init-cls 10 --increment 10 --learn-tasks 8 --epochs 4
      care-export train --resume ckpt/
    \b
    Example (classes that arrive later: a folder of new classes becomes the next task):
      care-export train --resume ckpt/ --data new-classes/
    \b
    Example (an image folder, ImageNet-21K ViT-B/16 from the hub, reference settings):
      care-export train -o ckpt/ --data images/ --init-cls 100 --increment 3 \\
          --backbone vit_base_patch16_224.augreg_in21k --backbone-weights hub
    \b
    Example (a reference configuration; options given override it):
      care-export train -o ckpt/ --data omnibench1k/ --preset ob1k_b100inc3 --learn-tasks 5
      care-export train -o ckpt/ --data cifar-100-python/ --config care_cifar_inc10.json --epochs 10
    """
    from ..training.continual import resume_sequence
    from ..training.distributed import from_environment
    from ..training.evaluate import Metrics

    ctx = click.get_current_context()
    group = from_environment()  # several processes under torchrun

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)

    training = dict(
        epochs=epochs,
        lr=lr,
        min_lr=min_lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        ca_lr=ca_lr,
        ca_epochs=ca_epochs,
        ca_steps=ca_steps,
        ca_method=ca_method,
        crop_scale=(min_crop, 1.0),
        workers=workers,
        scale=scale,
        margin=margin,
        aux_cos_loss=aux_cos_loss,
        self_dist_loss=self_dist_loss,
        align_decay=align_decay,
        amp=amp,
        eval_mode=eval_mode,
        eval_every=eval_every,
        input_set=input_set,
        method=method,
    )
    progress = not quiet and group.main
    try:
        if (out is None) == (resume is None):
            raise click.UsageError("give either -o/--output (a new run) or --resume CKPT")
        if resume is not None:
            if skip_known and not given("data"):
                raise click.UsageError("--skip-known needs --data NEW")
            if ctx.meta.get("care_reference"):
                raise click.UsageError(
                    "--config/--preset start a new run; a resumed run keeps its checkpoint's "
                    "settings (override single ones with their options)"
                )
            fixed = [n for n in _FIXED_ON_RESUME if given(n)]
            if fixed:
                raise click.UsageError(f"--{fixed[0].replace('_', '-')} is fixed by the checkpoint being resumed")
            overrides = {}
            for name in _TRAINING:
                if given(name):
                    key = "crop_scale" if name == "min_crop" else name
                    overrides[key] = training[key]
            directory = resume_sequence(
                resume,
                tasks=tasks,
                overrides=overrides,
                data=data if given("data") else None,
                skip_known=skip_known,
                device=device,
                progress=progress,
                group=group,
            )
        else:
            directory = _start(ctx.params, training, progress, group)
    except KeyboardInterrupt:
        where = resume or out
        click.echo(
            f"\ninterrupted: {where} holds the tasks finished before; continue with care-export train --resume {where}",
            err=True,
        )
        sys.exit(130)
    if not group.main:
        return
    from runtime.checkpoint_files import read_checkpoint_manifest

    metrics = Metrics.from_dict(read_checkpoint_manifest(directory)["metrics"])
    say(metrics.table())
    say(f"checkpoint {directory}: {len(metrics.top1)} tasks; metrics in {directory / 'metrics.json'}")
    hint(f"care-export onnx {directory} --tasks CAPACITY   (or care-export plot {directory})")


def _start(options: dict, training: dict, progress: bool, group) -> Path:
    """A new run from the command's options (click's values, by name) and its training settings."""
    from dataclasses import replace

    from runtime.preprocess import Preprocessing

    from ..data import BUILTIN_KINDS
    from ..model.config import MoEConfig, backbone_config
    from ..training.continual import BUILTIN_WEIGHTS, default_backbone, train_sequence
    from ..training.task import TrainConfig

    o = SimpleNamespace(**options)
    weights = o.backbone_weights or (BUILTIN_WEIGHTS if o.data in BUILTIN_KINDS else "hub")
    sizes = dict(img_size=o.img_size, patch_size=o.patch_size, depth=o.depth)
    if o.backbone is not None:
        try:
            cfg = backbone_config(o.backbone, **sizes)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--backbone") from None
    else:
        cfg = replace(default_backbone(weights), **{k: v for k, v in sizes.items() if v is not None})
    if weights == BUILTIN_WEIGHTS and cfg != default_backbone(weights):
        # A reference preset sets ViT-B/16 at 224 px: pre-training that from scratch takes hours.
        log.warning(
            f"pre-training {cfg.name} ({cfg.img_size} px, depth {cfg.depth}) on the built-in dataset "
            "(cached afterwards); for real weights pass --backbone-weights FILE|hub"
        )
    preprocessing = None
    if o.mean is not None or o.std is not None:
        preprocessing = Preprocessing.for_input(cfg.img_size, o.mean or (0.0, 0.0, 0.0), o.std or (1.0, 1.0, 1.0))
    builtin = dict(num_classes=o.builtin_classes, train_per_class=o.builtin_train, test_per_class=o.builtin_test)
    return train_sequence(
        o.out,
        data=o.data,
        builtin=builtin,
        init_cls=o.init_cls,
        increment=o.increment,
        tasks=o.tasks,
        seed=o.seed,
        backbone=cfg,
        weights=weights,
        moe=MoEConfig(o.topk_routers, o.topk_experts, o.expert_dim, o.shared_dim),
        cfg=TrainConfig(**training),
        preprocessing=preprocessing,
        cache_dir=o.cache_dir,
        device=o.device,
        progress=progress,
        group=group,
    )
