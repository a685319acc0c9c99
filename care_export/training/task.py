"""Learning one task of a CaRE model (docs/MODEL.md, "Training task T").

Per task ``T``: the expert, router and class perceptor of ``T`` in every block, the shared expert
and the whole cosine head train; the backbone and every older task part stay frozen. Task 0 trains
one round of ``epochs``; a later task trains two rounds of ``epochs // 2``, the first annealing
to half the learning rate, the second restarting from there with a fresh snapshot of the shared
expert, and each round is followed by classifier alignment on Gaussian pseudo-features.
``TrainConfig.method`` picks a baseline instead (``baselines.py``): the same schedule and alignment,
fewer parts trained.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from runtime.errors import CareError
from runtime.numerics import COS_SCALE

from .alignment import (
    ALIGN_DECAYS,
    CA_METHODS,
    PseudoFeatures,
    align_classifier,
    class_statistics,
    reference_mean_decay,
)
from .baselines import METHODS, trainable_parts, uses_routing
from .distributed import SINGLE, GlobalBatches, Group, SeededItems, ShardedIndices

log = logging.getLogger(__name__)

EVAL_MODES = ("single", "iterative")

# The reference distils with temperature 1 in the first six blocks and 2 in the later ones.
TAU_SWITCH_BLOCK = 6


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; defaults are the reference's (OmniBenchmark-1K configs)."""

    epochs: int = 20
    lr: float = 0.01
    min_lr: float = 0.0
    batch_size: int = 16
    weight_decay: float = 5e-4
    momentum: float = 0.9
    scale: float = COS_SCALE  # s of the angular loss and of the alignment logits
    margin: float = 0.0  # m of the CosFace loss
    ca_lr: float = 0.005
    ca_epochs: int = 3
    ca_method: str = "covariance"
    ca_per_class: int | None = None  # pseudo-features per class and epoch; None: 5 * batch_size
    # Steps per alignment epoch; None: one per learned class, the reference's, whose cost grows
    # with the square of the class count (steps times head size). See align_classifier.
    ca_steps: int | None = None
    crop_scale: tuple[float, float] = (0.05, 1.0)
    workers: int = 0
    method: str = "care"  # or a baseline (baselines.py)
    align_decay: str = "off"  # "reference": the reference's class-mean multipliers (its `decay: true`)
    amp: bool = False  # mixed-precision training forward (bfloat16 on CPU, float16 + GradScaler on CUDA)
    aux_cos_loss: bool = True  # perceptors' loss: CosFace (True) or cross-entropy on raw logits (False)
    self_dist_loss: bool = True  # the perceptors' KL term towards the head
    eval_mode: str = "single"  # after-task evaluation: "single" pass or the reference's "iterative"
    # Evaluate after every N-th task (and the last of a run): all seen classes' test images cost
    # time linear in the class count, which dominates a task's time after a few hundred tasks.
    eval_every: int = 1
    input_set: str = "common"  # the reference's per-dataset train transform (datasets.INPUT_SETS)

    def __post_init__(self):
        if self.epochs < 2:
            raise CareError(
                f"--epochs must be at least 2 (later tasks train two rounds of epochs // 2), got {self.epochs}"
            )
        if self.eval_every < 1:
            raise CareError(f"--eval-every must be at least 1, got {self.eval_every}")
        if self.batch_size < 1 or self.ca_epochs < 0 or self.lr <= 0 or self.ca_lr <= 0:
            raise CareError("--batch-size and the learning rates must be positive, --ca-epochs not negative")
        if self.ca_steps is not None and self.ca_steps < 1:
            raise CareError(f"--ca-steps must be at least 1, got {self.ca_steps}")
        if self.ca_method not in CA_METHODS:
            raise CareError(f"--ca-method must be one of {', '.join(CA_METHODS)}, got {self.ca_method!r}")
        if self.align_decay not in ALIGN_DECAYS:
            raise CareError(f"--align-decay must be one of {', '.join(ALIGN_DECAYS)}, got {self.align_decay!r}")
        if self.eval_mode not in EVAL_MODES:
            raise CareError(f"--eval must be one of {', '.join(EVAL_MODES)}, got {self.eval_mode!r}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise CareError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if self.method not in METHODS:
            raise CareError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @property
    def pseudo_per_class(self) -> int:
        return self.ca_per_class or 5 * self.batch_size

    def to_dict(self) -> dict:
        return dict(asdict(self), crop_scale=list(self.crop_scale))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "crop_scale" in d:
            d["crop_scale"] = tuple(d["crop_scale"])
        return cls(**d)


# ---------------------------------------------------------------------- losses
def angular_loss(logits: torch.Tensor, target: torch.Tensor, s: float, m: float = 0.0) -> torch.Tensor:
    """CosFace: cross-entropy on ``s * (logits - m * onehot(target))``."""
    if m:
        logits = logits - m * F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(s * logits, target)


def perceptor_loss(
    latents: list[torch.Tensor],
    head_logits: torch.Tensor,
    target: torch.Tensor,
    s: float,
    m: float,
    *,
    cos_loss: bool = True,
    self_dist: bool = True,
) -> torch.Tensor:
    """Mean over blocks of ``(angular loss + tau^2 KL(p_head || p_perceptor)) / 2``, the head's
    current-task cosine logits being the (detached) teacher.

    The reference's switches: ``cos_loss=False`` takes plain cross-entropy on the raw perceptor
    logits instead of the angular loss; ``self_dist=False`` drops the KL term (and the halving).
    """
    teacher = head_logits.detach()
    losses = []
    for i, latent in enumerate(latents):
        hard = angular_loss(latent, target, s, m) if cos_loss else F.cross_entropy(latent, target)
        if self_dist:
            tau = 1.0 if i < TAU_SWITCH_BLOCK else 2.0
            kl = F.kl_div(F.log_softmax(latent / tau, 1), F.softmax(teacher / tau, 1), reduction="batchmean")
            hard = (hard + tau**2 * kl) / 2
        losses.append(hard)
    return torch.stack(losses).mean()


def task_loss(out: dict, y: torch.Tensor, first_class: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of a training step from ``forward_train``'s output, and its main part."""
    cur = out["logits"][:, first_class:]
    local = y - first_class
    loss_main = angular_loss(cur, local, cfg.scale, cfg.margin)
    if not uses_routing(cfg.method):  # the baselines have no perceptors
        return loss_main, loss_main
    return loss_main + perceptor_loss(
        out["latents"], cur, local, cfg.scale, cfg.margin, cos_loss=cfg.aux_cos_loss, self_dist=cfg.self_dist_loss
    ), loss_main


def autocast_context(device, enabled: bool):
    """The training forward's mixed precision: float16 on CUDA, bfloat16 on CPU."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.float16 if kind == "cuda" else torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------- parameters
def set_trainable(model, task: int, method: str = "care") -> list[torch.nn.Parameter]:
    """Freeze everything but the parts ``task`` trains under ``method``; return those parameters."""
    model.requires_grad_(False)
    parts = trainable_parts(model, task, method)
    for p in parts:
        p.requires_grad_(True)
    return [p for part in parts for p in part.parameters()]


# ---------------------------------------------------------------------- one task
class TaskData:
    """The loaders of one task: augmented training images (this rank's share of every global
    batch, see ``distributed.py``), and the same images with the test transform for the class
    statistics (this rank's share, in order)."""

    def __init__(self, train, stats, cfg: TrainConfig, generator: torch.Generator, group: Group = SINGLE):
        # Every rank needs a part of every batch it steps on (else it would wait forever for the
        # others' gradients, or divide by nothing).
        if min(len(train), cfg.batch_size) < group.world:
            raise CareError(
                f"{group.world} processes need batches of at least {group.world} images: this task has "
                f"{len(train)} training images and --batch-size is {cfg.batch_size}; use fewer processes"
            )
        self.group = group
        self.batches = GlobalBatches(len(train), cfg.batch_size, generator, group)
        self.train = DataLoader(
            SeededItems(train, generator.initial_seed()), batch_sampler=self.batches, num_workers=cfg.workers
        )
        self.stats_order = ShardedIndices(len(stats), group)
        self.stats = DataLoader(stats, batch_size=3 * cfg.batch_size, sampler=self.stats_order, num_workers=cfg.workers)


class _TaskForward(torch.nn.Module):
    """``model.forward_train(x, task)`` as a module's forward, for DistributedDataParallel."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, task: int):
        return self.model.forward_train(x, task)


def _train_round(
    model,
    task: int,
    first_class: int,
    data: TaskData,
    cfg: TrainConfig,
    *,
    lr: float,
    eta_min: float,
    epochs: int,
    device,
    progress: bool,
) -> float:
    """SGD with a per-epoch cosine schedule from ``lr`` to ``eta_min`` of the parts ``task`` trains
    (``set_trainable``), frozen again at the end; returns the final lr."""
    params = set_trainable(model, task, cfg.method)
    group = data.group
    forward = model.forward_train
    if group.distributed:  # the ranks hold identical models: no initial broadcast of all tensors
        forward = torch.nn.parallel.DistributedDataParallel(
            _TaskForward(model),
            device_ids=[device.index] if torch.device(device).type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
            init_sync=False,
        )
    # foreach: one multi-tensor update for the task's parts of every block (about a hundred
    # tensors; the same arithmetic per element as the per-tensor loop CPU tensors get otherwise).
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=eta_min)
    # float16 gradients need loss scaling; bfloat16 has float32's range and does not.
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and torch.device(device).type == "cuda")
    # disable=None: bars only on a terminal; the log gets one line per epoch
    bar = tqdm(range(epochs), desc=f"task {task}", unit="epoch", leave=False, disable=None if progress else True)
    for epoch in bar:
        model.train()
        total = main = correct = seen = 0.0
        for (x, y), global_size in zip(data.train, data.batches.global_sizes()):
            x, y = x.to(device), y.to(device)
            with autocast_context(device, cfg.amp):
                out = forward(x, task)
                loss, loss_main = task_loss(out, y, first_class, cfg)
            if not torch.isfinite(loss):
                raise CareError(f"training diverged on task {task} (loss {loss.item()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            # The ranks' gradients are averaged: weighted by its share, a rank's mean loss makes
            # the average that of the global batch.
            share = loss * (len(y) * group.world / global_size) if group.distributed else loss
            scaler.scale(share).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.item() * len(y)
            main += loss_main.item() * len(y)
            correct += int((out["logits"].argmax(1) == y).sum())
            seen += len(y)
        sched.step()
        bar.set_postfix(
            loss=f"{total / seen:.3f}",
            main=f"{main / seen:.3f}",
            acc=f"{100 * correct / seen:.1f}%",
            lr=f"{opt.param_groups[0]['lr']:.2e}",
        )
        log.debug(
            "task %d epoch %d/%d: loss %.3f (main %.3f), train accuracy %.1f%%, lr %.2e",
            task,
            epoch + 1,
            epochs,
            total / seen,
            main / seen,
            100 * correct / seen,
            opt.param_groups[0]["lr"],
        )
    for p in params:  # the model leaves a round frozen, as it came
        p.requires_grad_(False)
    return opt.param_groups[0]["lr"]


@torch.no_grad()
def _task_statistics(model, task: int, first_class: int, num_classes: int, data: TaskData, method: str, device):
    """Feature statistics of ``task``'s classes, from the task's forward in eval mode, over the
    features of every rank."""
    model.eval()
    feats, labels = [], []
    for x, y in data.stats:
        feats.append(model.forward_train(x.to(device), task)["features"])
        labels.append(y.to(device))
    index = torch.tensor(data.stats_order.indices, device=device)
    feats, _ = data.group.gather_rows(torch.cat(feats), index)
    labels, _ = data.group.gather_rows(torch.cat(labels), index)
    return class_statistics(feats, labels, range(first_class, first_class + num_classes), method)


def learn_task(
    model, task: int, data: TaskData, stats: list[dict], cfg: TrainConfig, *, device, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Train ``task`` (already added to ``model``); return its classes' feature statistics.

    ``stats`` holds the statistics of tasks ``0..task-1`` for classifier alignment.
    """
    first_class = sum(model.task_classes[:task])
    num_classes = model.task_classes[task]

    def round_(lr, eta_min, epochs):
        for m in model.moe:  # task 0 trains the shared expert freely; later rounds pull it back
            m.anchor_shared(task > 0 and uses_routing(cfg.method))
        last_lr = _train_round(
            model, task, first_class, data, cfg, lr=lr, eta_min=eta_min, epochs=epochs, device=device, progress=progress
        )
        for m in model.moe:
            m.anchor_shared(False)
        return last_lr, _task_statistics(model, task, first_class, num_classes, data, cfg.ca_method, device)

    def align(own):
        decay = None
        if cfg.align_decay == "reference":
            decay = reference_mean_decay(first_class, first_class + num_classes, task)
        sampler = PseudoFeatures(stats + [own], device, mean_scale=decay)
        align_classifier(
            model.head,
            sampler,
            lr=cfg.ca_lr,
            epochs=cfg.ca_epochs,
            per_class=cfg.pseudo_per_class,
            steps=cfg.ca_steps,
            scale=cfg.scale,
            weight_decay=cfg.weight_decay,
            progress=progress,
        )
        data.group.broadcast_(model.head.parameters())  # the ranks' random streams may have parted

    if task == 0:
        _, own = round_(cfg.lr, cfg.min_lr, cfg.epochs)
        return own
    half = cfg.epochs // 2
    lr, own = round_(cfg.lr, cfg.lr / 2, half)
    align(own)
    _, own = round_(lr, cfg.min_lr, half)
    align(own)
    return own
