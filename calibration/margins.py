"""How close each routing decision of the FP32 graph is to a tie, and flips counted only beyond it.

A block decides twice: its task TopK (the ``M`` lowest perceptor entropies) and, per selected
task, its expert TopK (the ``K`` largest router logits). The *deciding gap* of a TopK is the
distance between the last value it keeps and the first it drops (``inf`` where nothing is
dropped). CaRE's decisions are often near ties (entropies within ~1e-3 of each other), and a flip
between two near-equal choices changes little, so beside the raw flip rate the report gives a
*margin-aware* one: a task flip counts only where FP32's task gap exceeds ``eps``, an expert flip
(same tasks, other experts) only where the smallest expert gap of its selected tasks does.
Entropies and router logits are both O(1) quantities, so one ``eps`` serves both.

The TopKs are found in the graph (every TopK, in graph order, two per block: tasks, then
experts), their inputs and kept values fetched as extra outputs.
"""

from __future__ import annotations

import numpy as np
import onnx

from runtime.layout import INPUT, LOGITS, ROUTING_EXPERTS, ROUTING_TASKS
from runtime.routing import canonical_routing, same_routing

from .graph import model_session, node_attr

EPSILON = 1e-3


def _topks(model: onnx.ModelProto) -> list[tuple[str, str, bool]]:
    """``(input, kept values, largest)`` of every TopK over the last axis, in graph order."""
    out = []
    for n in model.graph.node:
        if n.op_type == "TopK":
            if node_attr(n, "axis", -1) != -1:
                raise ValueError(f"TopK {n.name} is not over the last axis")
            out.append((n.input[0], n.output[0], bool(node_attr(n, "largest", 1))))
    return out


def topk_gap(values: np.ndarray, kept: np.ndarray, largest: bool) -> np.ndarray:
    """Per row (all axes but the last): the last kept value's distance to the first dropped one."""
    k, n = kept.shape[-1], values.shape[-1]
    if k >= n:
        return np.full(values.shape[:-1], np.inf)
    v = np.sort(np.asarray(values, np.float64), axis=-1)
    if largest:
        v = -v[..., ::-1]  # ascending in "worse"
    with np.errstate(invalid="ignore"):
        gap = v[..., k] - v[..., k - 1]
    return np.where(np.isnan(gap), np.inf, gap)  # two masked (infinite) scores: nothing to decide


class Reference:
    """The FP32 graph's logits, canonical routing and deciding gaps on images, in chunks."""

    def __init__(self, model: onnx.ModelProto, images, threads: int | None = None):
        specs = _topks(model)
        fetch = [LOGITS, ROUTING_TASKS, ROUTING_EXPERTS] + [t for s in specs for t in s[:2]]
        parts = []
        with model_session(model, threads, outputs=tuple(fetch[3:])) as sess:
            for x in images:
                v = dict(zip(fetch, sess.run(fetch, {INPUT: x})))
                gaps = [topk_gap(v[i], v[o], largest) for i, o, largest in specs]
                depth = v[ROUTING_TASKS].shape[1]
                if len(gaps) != 2 * depth:
                    raise ValueError(f"expected two routing TopKs per block, found {len(gaps)} for {depth} blocks")
                task_gap = np.stack([g.reshape(len(x), -1).min(1) for g in gaps[0::2]], 1)
                expert_gap = np.stack([g.reshape(len(x), -1).min(1) for g in gaps[1::2]], 1)
                parts.append((v[LOGITS], v[ROUTING_TASKS], v[ROUTING_EXPERTS], task_gap, expert_gap))
        logits, tasks, experts, self.task_gap, self.expert_gap = (np.concatenate(p) for p in zip(*parts))
        self.logits = logits.astype(np.float64)
        self.tasks, self.experts = canonical_routing(tasks, experts)


def flip_rates(ref: Reference, tasks: np.ndarray, experts: np.ndarray, eps: float = EPSILON):
    """``(raw, margin-aware)`` flip rate per block of a canonical routing against ``ref``."""
    raw = ~same_routing((ref.tasks, ref.experts), (tasks, experts))  # (N, L)
    task_flip = (ref.tasks != tasks).any(-1)
    expert_flip = raw & ~task_flip
    counted = (task_flip & (ref.task_gap > eps)) | (expert_flip & (ref.expert_gap > eps))
    return raw.mean(0), counted.mean(0)
