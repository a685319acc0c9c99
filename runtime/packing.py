"""Checkpoint tensors (numpy) -> artifact tensors: folding and packing, shared by export and growth.

All folding is done in float64 and stored as float32.

Experts. ``E(x) = scale * (ReLU(LN(x) W_d^T + b_d) W_u^T + b_u)`` with ``LN(x) = g * xh + beta``
(``xh`` the affine-free LayerNorm, shared by every expert of a block) is stored as
``down = W_d * g``, ``down_bias = W_d beta + b_d``, ``up = W_u^T * scale``, ``up_bias = b_u * scale``,
so that ``E(x) = ReLU(xh down^T + down_bias) up + up_bias``.

Routers and perceptors read ``c = h U + u`` only (``h`` the expert's hidden CLS activation, r
values; ``U = up``, ``u = up_bias``), so ``U`` is folded into them and ``c`` is never formed:

* router t: ``c Wr^T + br = h (U Wr^T) + (u Wr^T + br)``: r numbers per expert scored instead of d
  (the quadratic router table shrinks by d/r, 48x for ViT-B);
* perceptor t: ``fc(LN(c))``. With ``Uc``, ``uc`` the row-centred ``U``, ``u`` (so that
  ``c - mean(c) = h Uc + uc`` exactly) and ``P = (W_p * g_p)^T``, ``p = W_p beta_p + b_p``:
  ``logits = (h Uc P + uc P) / sqrt(var + 1e-5) + p`` and
  ``var = ||h Uc + uc||^2 / d = h.(h G + 2 v) + q`` with ``G = Uc Uc^T / d``, ``v = Uc uc / d``,
  ``q = ||uc||^2 / d``. Stored per task: ``proj = [Uc P | G | 0]`` (r x (C + r + 1)),
  ``shift = [uc P | 2 v | q + 1e-5]`` (the LayerNorm's epsilon included) and ``bias = p``; the
  graph computes ``Y = h proj + shift``, splits it into ``num, hg, lin`` and takes
  ``logits = num / sqrt(sum(h * hg) + lin) + p``. Padded classes get zero columns and bias
  ``PAD_LOGIT`` (probability exactly 0).

The cosine head is stored row-normalised and transposed, ``(d, class capacity)``.
"""

from __future__ import annotations

import numpy as np

from .checkpoint_files import require
from .errors import CapacityError
from .layout import Dims, task_regions
from .numerics import NORM_EPS, PAD_LOGIT, PART_LN_EPS
from .tensor_files import Patch

_F64 = np.float64


def fold_expert(t: dict[str, np.ndarray], prefix: str, d: int, r: int, where: str):
    """``(down (r, d), down_bias (r,), up (r, d), up_bias (d,))`` of the expert under ``prefix``."""

    def get(name, shape):
        return require(t, prefix + name, shape, where).astype(_F64)

    g, beta = get("norm.weight", (d,)), get("norm.bias", (d,))
    wd, bd = get("down.weight", (r, d)), get("down.bias", (r,))
    wu, bu, scale = get("up.weight", (d, r)), get("up.bias", (d,)), get("scale", (d,))
    return wd * g, wd @ beta + bd, wu.T * scale, bu * scale


def fold_perceptor(up: np.ndarray, up_bias: np.ndarray, weight: np.ndarray, bias: np.ndarray, width: int):
    """``(proj (r, width + r + 1), shift (width + r + 1,), bias (width,))`` of a perceptor
    ``(weight (d, C), bias (C,))`` (LN affine folded in) reading expert output ``h up + up_bias``."""
    d, classes = weight.shape
    uc = up - up.mean(1, keepdims=True)
    bc = up_bias - up_bias.mean()
    r = len(up)
    proj = np.zeros((r, width + r + 1))
    proj[:, :classes] = uc @ weight
    proj[:, width : width + r] = uc @ uc.T / d
    shift = np.zeros(width + r + 1)
    shift[:classes] = bc @ weight
    shift[width : width + r] = 2 * (uc @ bc) / d
    shift[width + r] = bc @ bc / d + PART_LN_EPS
    padded = np.full(width, PAD_LOGIT)
    padded[:classes] = bias
    return proj, shift, padded


def check_task_classes(task: int, classes: int, dims: Dims) -> None:
    if task >= dims.capacity:
        raise CapacityError(f"task {task} does not fit: the artifact holds {dims.capacity} tasks")
    if task == 0 and classes != dims.first_classes:
        raise CapacityError(f"task 0 has {classes} classes, the artifact's first task {dims.first_classes}")
    if task > 0 and classes > dims.slot_classes:
        raise CapacityError(
            f"task {task} has {classes} classes, a task slot holds {dims.slot_classes} "
            f"(export with --task-classes {classes} or more)"
        )


def pack_task(tensors: dict[str, np.ndarray], task: int, classes: int, dims: Dims, where: str) -> list[Patch]:
    """The patches that write task ``task`` (its checkpoint file's tensors) into slots.bin, in
    the order of :func:`~runtime.layout.task_regions`."""
    check_task_classes(task, classes, dims)
    d, r = dims.embed_dim, dims.expert_dim
    data = {}
    for i in range(dims.depth):
        b, m = f"blocks.{i}.", f"moe.{i}."
        down, down_b, up, up_b = fold_expert(tensors, b + "experts.", d, r, where)
        data[m + "experts.down"], data[m + "experts.down_bias"] = down, down_b
        data[m + "experts.up"], data[m + "experts.up_bias"] = up[None], up_b[None, None]

        wr = require(tensors, b + "routers.weight", (task + 1, d), where).astype(_F64)
        br = require(tensors, b + "routers.bias", (task + 1,), where).astype(_F64)
        data[m + "routers.weight"], data[m + "routers.bias"] = wr @ up.T, wr @ up_b + br

        g = require(tensors, b + "perceptors.norm.weight", (d,), where).astype(_F64)
        beta = require(tensors, b + "perceptors.norm.bias", (d,), where).astype(_F64)
        w = require(tensors, b + "perceptors.fc.weight", (classes, d), where).astype(_F64)
        bias = require(tensors, b + "perceptors.fc.bias", (classes,), where).astype(_F64)
        width = dims.first_classes if task == 0 else dims.slot_classes
        proj, shift, pbias = fold_perceptor(up, up_b, (w * g).T, w @ beta + bias, width)
        if task == 0:
            data[m + "perceptor0.proj"], data[m + "perceptor0.shift"], data[m + "perceptor0.bias"] = proj, shift, pbias
        else:
            data[m + "perceptors.proj"], data[m + "perceptors.shift"] = proj[None], shift[None, None]
            data[m + "perceptors.bias"] = pbias[None, None]
    return [Patch(name, row, data[name]) for name, row, _ in task_regions(task, dims)]


def pack_state(
    shared: dict[str, np.ndarray], head: dict[str, np.ndarray], task_classes: list[int], dims: Dims, where: str
) -> dict[str, np.ndarray]:
    """Every state.bin tensor for a model with ``task_classes``: counts, shared experts, head."""
    for t, c in enumerate(task_classes):
        check_task_classes(t, c, dims)
    d = dims.embed_dim
    out: dict[str, np.ndarray] = {
        "active_tasks": np.array(len(task_classes), np.int64),
        "active_classes": np.array(sum(task_classes), np.int64),
    }
    for i in range(dims.depth):
        down, down_b, up, up_b = fold_expert(shared, f"blocks.{i}.shared.", d, dims.shared_dim, where)
        m = f"moe.{i}.shared."
        out.update(
            {m + "down": down[None], m + "down_bias": down_b[None, None], m + "up": up[None], m + "up_bias": up_b}
        )
    rows = np.concatenate([require(head, f"head.{t}", (c, d), where).astype(_F64) for t, c in enumerate(task_classes)])
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), NORM_EPS)
    w = np.zeros((d, dims.class_capacity))
    w[:, : len(rows)] = rows.T
    out["head.weight"] = w
    return out
