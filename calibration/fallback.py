"""Sensitivity-ranked fallback of INT8 activations to weight-only INT8, measured on the calibration set.

After static quantization every backbone MatMul / Gemm / Conv reads ``DQ(Q(activation))`` and
``DQ(int8 weight)``. Routing decisions of a CaRE model are near ties (perceptor entropies a few
1e-3 apart), so some layers' activation rounding flips them far more than others. As TensorRT
ModelOpt and Polygraphy do, each layer's sensitivity is measured alone and the most sensitive
layers fall back, in that order, until the calibration set's routing holds:

1. reference: the FP32 source graph's routing and logits on the calibration images;
2. floor: every layer weight-only (int8 weights, float activations): what the int8 weights of the
   backbone and the growth tensors flip by themselves, which no activation choice can remove;
3. sensitivity of layer L: routing flips on the calibration images (summed over blocks, then
   max |dlogit| to break ties) with only L's activations quantized, every other layer weight-only;
4. starting from all activations quantized, layers fall back in decreasing sensitivity until the
   largest per-block flip rate on the calibration images is at most ``target``; where the weights
   alone flip more than that, every layer falls back (activations can only add flips).

A fallen-back layer keeps its int8 weight and its DequantizeLinear (the artifact's size does not
change); only the activation's QuantizeLinear / DequantizeLinear pair in front of it goes.
"""

from __future__ import annotations

import numpy as np
import onnx

from runtime.layout import INPUT, LOGITS, ROUTING_EXPERTS, ROUTING_TASKS
from runtime.routing import canonical_routing

from .graph import model_session, producers, prune_qdq
from .margins import Reference, flip_rates


def _qdq_reads(model: onnx.ModelProto):
    """``(node, input index, x)`` for every input of a node that is ``DQ(Q(x))`` of an activation
    ``x`` (not of a weight initializer)."""
    producer = producers(model.graph)
    inits = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        for j, i in enumerate(n.input):
            dq = producer.get(i)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                yield n, j, q.input[0]


def activation_qdq(model: onnx.ModelProto, targets: set[str]) -> dict[str, tuple[int, str]]:
    """For each target node whose input is ``DQ(Q(x))`` of an activation: ``(input index, x)``."""
    return {n.name: (j, x) for n, j, x in _qdq_reads(model) if n.name in targets}


def only_targets_read_qdq(model: onnx.ModelProto, targets: set[str]) -> onnx.ModelProto:
    """In place: nodes other than ``targets`` that read ``DQ(Q(x))`` of an activation (ONNX
    Runtime lets e.g. a ``Shape`` of the image read it) read ``x`` itself."""
    for n, j, x in list(_qdq_reads(model)):
        if n.name not in targets:
            n.input[j] = x
    return prune_qdq(model)


def weight_only(model: onnx.ModelProto, nodes: set[str], act: dict[str, tuple[int, str]]) -> onnx.ModelProto:
    """A copy of ``model`` where ``nodes`` read their float activation (their weights stay int8);
    Q/DQ nodes left without consumers are removed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.name in nodes and n.name in act:
            j, x = act[n.name]
            n.input[j] = x
    return prune_qdq(m)


class Evaluator:
    """Routing and logits of graphs on the calibration images (``calib_data.Chunks``), compared
    with the FP32 source's. ``eps``: flips are counted margin-aware (``calibration.margins``)
    beyond this deciding gap; ``None``: every flip counts."""

    def __init__(
        self,
        images,
        reference: onnx.ModelProto,
        threads: int | None = None,
        eps: float | None = None,
        timed: bool = False,
    ):
        self.images, self.threads, self.eps = images, threads, eps
        self.ref = Reference(reference, images, threads)
        self.reference = None
        if timed:  # a copy: the caller rewrites its model in place
            self.reference = onnx.ModelProto()
            self.reference.CopyFrom(reference)

    def score(self, model: onnx.ModelProto) -> tuple[np.ndarray, float, float]:
        """``(flip rate per block, max |dlogit|, top-1 agreement)`` of ``model`` against the reference."""
        parts = []
        with model_session(model, self.threads) as sess:
            for x in self.images:
                parts.append(sess.run([LOGITS, ROUTING_TASKS, ROUTING_EXPERTS], {INPUT: x}))
        logits, tasks, experts = (np.concatenate(p) for p in zip(*parts))
        raw, margin = flip_rates(self.ref, *canonical_routing(tasks, experts), self.eps or 0.0)
        rl, cl = self.ref.logits, logits.astype(np.float64)
        learned = np.isfinite(rl) & np.isfinite(cl)  # classes not learned yet are -inf in both
        agreement = float((cl.argmax(1) == rl.argmax(1)).mean())
        return (raw if self.eps is None else margin), float(np.abs(cl[learned] - rl[learned]).max()), agreement

    def latency_ratio(self, model: onnx.ModelProto, batch: int = 8, runs: int = 5) -> dict[int, float]:
        """CPU latency of ``model`` over the reference's at batch 1 and ``batch`` (interleaved medians)."""
        from runtime.timing import median_times

        x = self.images.head(batch)
        with model_session(self.reference, self.threads) as ref, model_session(model, self.threads) as cand:
            out = {}
            for b in (1, len(x)):
                t = median_times(
                    {
                        "ref": lambda: ref.run([LOGITS], {INPUT: x[:b]}),
                        "cand": lambda: cand.run([LOGITS], {INPUT: x[:b]}),
                    },
                    runs,
                    warmup=1,
                )
                out[b] = t["cand"] / t["ref"]
        return out


def sensitivity_fallback(
    model: onnx.ModelProto, targets: set[str], evaluator: Evaluator, target: float, progress=None, curve: bool = False
) -> tuple[onnx.ModelProto, dict]:
    """``model`` (after static quantization of ``targets``) with its most routing-sensitive layers
    at weight-only INT8 (module doc), and a JSON-ready record of the decision. ``curve`` (needs an
    evaluator made ``timed``): the record also holds the trade-off of falling back the first k
    layers of the ranking, for a few k: calibration flips, top-1 agreement and latency over FP32."""
    act = activation_qdq(model, targets)
    layers = sorted(act)
    full, *_ = evaluator.score(model)
    record = {
        "rule": "layers fall back to weight-only int8 in decreasing routing sensitivity (calibration "
        "images) until max per-block flips <= target (all of them if the floor is above it)",
        "target": target,
        "floor": None,  # not measured when W8A8 already holds: one pass over the images saved
        "w8a8": float(full.max()),
        "calibration_images": int(len(evaluator.images)),
        "flips": "raw" if evaluator.eps is None else f"margin-aware, eps {evaluator.eps:g}",
    }
    limit = target
    if full.max() <= limit and not curve:
        return prune_qdq(model), dict(record, weight_only=[], calibration_flips=float(full.max()))
    floor, *_ = evaluator.score(weight_only(model, set(layers), act))
    record["floor"] = float(floor.max())
    sensitivity = {}
    for name in layers:
        flips, dlogit, _ = evaluator.score(weight_only(model, set(layers) - {name}, act))
        sensitivity[name] = (float(flips.sum()), dlogit)
        if progress:
            progress(name)
    ranked = sorted(layers, key=lambda n: sensitivity[n], reverse=True)
    # Fewest fallen-back layers that hold: bisect over the prefix length of the ranking.
    lo, hi, best = 1, len(ranked), (len(ranked), floor)
    if full.max() <= limit:
        lo, best = len(ranked) + 1, (0, full)
    while lo <= hi:
        k = (lo + hi) // 2
        flips, *_ = evaluator.score(weight_only(model, set(ranked[:k]), act))
        if flips.max() <= limit:
            best, hi = (k, flips), k - 1
        else:
            lo = k + 1
    k, flips = best
    record.update(
        weight_only=ranked[:k],
        calibration_flips=float(flips.max()),
        sensitivity={n: round(sensitivity[n][0], 4) for n in ranked},
    )
    if curve:
        record["curve"] = []
        n = len(ranked)
        for j in sorted({0, n // 4, n // 2, 3 * n // 4, n, k}):
            m = weight_only(model, set(ranked[:j]), act)
            f, _, agree = evaluator.score(m)
            lat = evaluator.latency_ratio(m)
            record["curve"].append(
                {
                    "weight_only": j,
                    "calibration_flips": float(f.max()),
                    "top1_agreement": agree,
                    "latency_ratio": {str(b): round(r, 3) for b, r in lat.items()},
                }
            )
    return weight_only(model, set(ranked[:k]), act), record
