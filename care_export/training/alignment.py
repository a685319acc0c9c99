"""Classifier alignment: per-class feature statistics and head retraining on pseudo-features.

After a task, the mean and covariance (or only the variance) of every new class's features are
stored. Alignment then draws Gaussian pseudo-features for every class learned so far and retrains
only the cosine head on them, so that old classes keep competing with new ones without replaying
images. Statistics of a class are computed once, when its task is learned, as the reference does.
"""

from __future__ import annotations

import itertools
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from care_export.model.cpu_linear import linear, padded_rows
from runtime.atomic import replacing
from runtime.errors import CareError, CheckpointError
from runtime.numerics import NORM_EPS

CA_METHODS = ("covariance", "variance")
COV_JITTER = 1e-4  # added to the diagonal, as the reference does
# The reference anneals the alignment lr with a cosine of period 5 epochs whatever their number.
CA_SCHEDULE_PERIOD = 5


@torch.no_grad()
def class_statistics(features: torch.Tensor, labels: torch.Tensor, classes, method: str) -> dict[str, torch.Tensor]:
    """``mean`` (C, d) and ``cov`` (C, d, d) or ``var`` (C, d) of each class in ``classes``."""
    means, spreads = [], []
    eye = torch.eye(features.shape[1], device=features.device)
    for c in classes:
        f = features[labels == c].double()
        if len(f) == 0:
            raise CareError(f"class {c} has no training image to compute its statistics from")
        cov = torch.cov(f.T) if len(f) > 1 else torch.zeros_like(eye, dtype=torch.float64)
        cov = (cov + COV_JITTER * eye).float()
        means.append(f.mean(0).float())
        spreads.append(cov if method == "covariance" else cov.diagonal().clone())
    key = "cov" if method == "covariance" else "var"
    return {"mean": torch.stack(means), key: torch.stack(spreads)}


def save_statistics(stats: dict[str, torch.Tensor], path: Path) -> None:
    with replacing(path, follow_umask=True) as tmp:  # follow the umask like the checkpoint
        save_file({k: v.detach().contiguous().cpu() for k, v in stats.items()}, str(tmp))


def load_statistics(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: class statistics missing (needed to align the classifier)")
    return load_file(str(path))


ALIGN_DECAYS = ("reference", "off")


def reference_mean_decay(known: int, total: int, task: int) -> torch.Tensor:
    """The reference's per-class multiplier of the class means under ``decay: true``.

    Exactly what LMMMEng/CaRE computes while aligning after ``task`` (0-based), ``known`` classes
    learned before it and ``total`` after: ``task_size = known - total`` (negative), ``t_id =
    c // task_size`` (floor division), multiplier ``0.9 + (t_id + 1) / (task + 1) * 0.1``. The
    negative divisor makes ``t_id`` negative for every class but 0, so the multiplier falls
    below 0.9 and, with many classes per task size, below zero (docs/MODEL.md).
    """
    task_size = known - total
    if task_size >= 0:
        raise CareError(f"mean decay needs new classes (known {known}, total {total})")
    t_id = torch.arange(total, dtype=torch.float64).div(task_size, rounding_mode="floor")
    return 0.9 + (t_id + 1) / (task + 1) * 0.1


class PseudoFeatures:
    """Gaussian samplers for every class of a list of per-task statistics.

    ``mean_scale`` (one float64 number per class) multiplies each class mean before sampling,
    as the reference's ``decay`` does (:func:`reference_mean_decay`).
    """

    def __init__(self, stats: list[dict[str, torch.Tensor]], device, mean_scale: torch.Tensor | None = None):
        self.mean = torch.cat([s["mean"] for s in stats]).to(device)
        if mean_scale is not None:
            if mean_scale.shape != (self.mean.shape[0],):
                raise ValueError(f"mean_scale has shape {tuple(mean_scale.shape)}, expected ({self.mean.shape[0]},)")
            # The reference scales in float64, then samples in float32.
            self.mean = (self.mean.double() * mean_scale.to(device, torch.float64)[:, None]).float()
        self.device = device
        if "cov" in stats[0]:
            self.covs: list[torch.Tensor] | None = [s["cov"] for s in stats]
            _factors(self.covs, device)  # factored now, so that a bad covariance fails here
        else:
            self.std = torch.cat([s["var"] for s in stats]).to(device).sqrt()
            self.covs = None

    @property
    def trils(self) -> torch.Tensor | None:
        """(C, d, d) the Cholesky factors of the classes' covariances (``None``: variances)."""
        return None if self.covs is None else _factors(self.covs, self.device)

    @property
    def num_classes(self) -> int:
        return self.mean.shape[0]

    def sample(self, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` features of every class, class-major, with their labels."""
        c, d = self.mean.shape
        noise = torch.randn(c, per_class, d, device=self.mean.device)
        trils = self.trils
        if trils is not None:
            x = self.mean[:, None] + noise @ trils.transpose(1, 2)
        else:
            x = self.mean[:, None] + noise * self.std[:, None]
        labels = torch.arange(c, device=x.device).repeat_interleave(per_class)
        return x.reshape(c * per_class, d), labels


# The Cholesky factors of a sequence's covariances, in one tensor that grows with it: a class's
# statistics never change once its task is learned, and factoring every class again at every
# alignment (1000 float64 192x192 factorizations), copying the factors into one tensor (147 MB at
# 1000 classes), or multiplying per task (a small product per task and epoch) each grew a task's
# time with the class count. Keyed by the first covariance tensor and the device; rows are
# claimed by the covariance tensors they were factored from (weak references), so that a list
# that differs from the held one after some task rewrites only the rows from there.
_FACTOR_STACKS: dict[tuple[int, str], dict] = {}


def _factors(covs: list[torch.Tensor], device) -> torch.Tensor:
    """(C, d, d) the factors of ``covs`` (each (C_t, d, d)) on ``device``, a view of a cached stack."""
    key = (id(covs[0]), str(torch.device(device)))
    entry = _FACTOR_STACKS.get(key)
    if entry is None or entry["refs"][0]() is not covs[0]:
        entry = {"refs": [], "rows": [], "buffer": None}
        _FACTOR_STACKS[key] = entry
        weakref.finalize(covs[0], _FACTOR_STACKS.pop, key, None)
    keep = 0
    for ref, cov in zip(entry["refs"], covs):
        if ref() is not cov:
            break
        keep += 1
    start = sum(entry["rows"][:keep])
    rows = [len(c) for c in covs[keep:]]
    end = start + sum(rows)
    buf = entry["buffer"]
    if buf is None or end > len(buf):
        grown = torch.empty((end + max(64, end // 4), *covs[0].shape[1:]), device=device)
        if start:
            grown[:start] = buf[:start]
        entry["buffer"] = buf = grown
    for cov, at in zip(covs[keep:], itertools.accumulate(rows, initial=start)):
        buf[at : at + len(cov)] = torch.linalg.cholesky(cov.to(device, torch.float64))  # one task's at a time
    entry["refs"] = entry["refs"][:keep] + [weakref.ref(c) for c in covs[keep:]]
    entry["rows"] = entry["rows"][:keep] + rows
    return buf[:end]


def cosine_ce_grad(weight: torch.Tensor, xn: torch.Tensor, y: torch.Tensor, scale: float, classes: int | None = None):
    """``scale * cos`` logits of the unit rows ``xn`` (B, d) against the rows of ``weight`` (C, d),
    and the gradient of their mean cross-entropy with labels ``y`` with respect to ``weight``.
    Rows from ``classes`` on are padding (zeros): their logits are ``-inf``, their gradient zero.

    Derived by hand (no autograd): with ``n = max(|w_c|, eps)`` and ``u_c = w_c / n``, the loss
    reads the logits ``scale * xn . u_c``; ``G = (softmax - onehot) / B`` gives ``dL/du =
    scale * G' xn``, and through the normalisation ``dL/dw_c = (dL/du_c - u_c (dL/du_c . u_c)) / n``
    (``dL/du_c / eps`` where the norm is below ``eps``). Neither ``u`` nor ``dL/du`` is formed:
    ``1 / n`` scales the logits and the columns of ``G`` (``B x C``, not ``C x d``), which leaves
    ``a_c = dL/du_c / n`` and ``dL/dw_c = a_c - w_c (a_c . w_c) / n^2``: three passes over the head
    besides the two matrix products (oneDNN's where large, ``cpu_linear``). Autograd's graph of
    the same formula spent more time in elementwise passes over the head than in the products,
    which grow with the class count. Equal to autograd's to float rounding
    (tests/care_export/test_train.py).
    """
    norm = torch.linalg.vector_norm(weight, dim=1)
    inv = norm.clamp_min(NORM_EPS).reciprocal()
    logits = linear(xn, weight).mul_(inv * scale)
    if classes is not None:
        logits[:, classes:] = float("-inf")
    g = torch.softmax(logits, 1)
    g[torch.arange(len(y), device=y.device), y] -= 1
    grad = linear(g.mul_(inv * (scale / len(y))).T, xn.T)  # dL/du_c / n_c
    along = torch.linalg.vecdot(grad, weight).mul_(inv.square()).mul_(norm > NORM_EPS)
    return logits, grad.addcmul_(weight, along[:, None], value=-1)


def align_classifier(
    head,
    sampler: PseudoFeatures,
    *,
    lr: float,
    epochs: int,
    per_class: int,
    scale: float,
    weight_decay: float,
    steps: int | None = None,
    progress: bool = False,
) -> float:
    """Retrain ``head`` (a ``CosineHead``) alone with cross-entropy on ``scale * cos`` over
    pseudo-features (gradients from :func:`cosine_ce_grad`).

    Every epoch draws ``per_class`` features for each class and takes one step per class'
    worth of samples, ``per_class`` features a step (the reference's schedule). ``steps`` caps
    the steps per epoch: each class then draws only what those steps use (at least one
    feature), so an epoch costs the same at any class count but a step's head. Returns the last
    epoch's accuracy on the features used.
    """
    classes = sampler.num_classes
    # Zero rows pad the head to the sizes oneDNN's kernels are kept for (cpu_linear.padded_rows):
    # they stay zero (no gradient, no decay) and out of the softmax.
    weight = torch.nn.Parameter(head.weight.new_zeros(padded_rows(classes, per_class * head.dim), head.dim))
    with torch.no_grad():
        weight[:classes] = head.weight
    opt = torch.optim.SGD([weight], lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=CA_SCHEDULE_PERIOD)
    steps = classes if steps is None else min(steps, classes)
    draws = -(-steps * per_class // classes)  # per class, enough for ``steps`` batches
    acc = 0.0
    for epoch in tqdm(
        range(epochs), desc="aligning classifier", unit="epoch", leave=False, disable=None if progress else True
    ):
        last = epoch == epochs - 1  # only the last epoch's accuracy is returned: argmax over the head costs
        x, y = sampler.sample(draws)
        order = torch.randperm(len(y), device=x.device)
        x, y = F.normalize(x[order], dim=-1, eps=NORM_EPS), y[order]
        correct = 0
        for i in range(steps):
            xb, yb = x[i * per_class : (i + 1) * per_class], y[i * per_class : (i + 1) * per_class]
            with torch.no_grad():
                logits, weight.grad = cosine_ce_grad(weight, xb, yb, scale, classes)
            opt.step()
            if last:
                correct += int((logits.argmax(1) == yb).sum())
        sched.step()
        if last:
            acc = 100.0 * correct / (steps * per_class)
    with torch.no_grad():
        head.weight.copy_(weight[:classes])
    return acc
