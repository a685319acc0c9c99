"""Error-compensated rounding of int8 weights (GPTQ, Frantar et al. 2022), scales unchanged.

Round-to-nearest makes each weight's error as small as it can be, but the errors of a row add up
in the layer's output ``x . w``. GPTQ rounds a row's input columns one at a time and moves each
rounding error onto the columns not rounded yet, weighted by the second moments of the layer's
inputs on the calibration images (``H = E[x x^T]``), which minimises the output error instead.
The scales stay those of round-to-nearest (``max |row| / 127``), so the stored format and every
reader are unchanged; only the int8 values differ. With ``H`` diagonal it is round-to-nearest.

CaRE's routing decisions are near ties (docs/CALIBRATION.md); on the demo model this rounding
takes the routing flips the int8 weights cause by themselves from 0.7-1.5 % to 0.2-0.7 % per block.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import model_session, node_attr

DAMP = 0.01  # share of the mean diagonal added to H: calibration sets are small next to the width
BATCH = 16  # every layer input of a batch is held at once


def gptq_round(rows: np.ndarray, scale: np.ndarray, h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """int8 ``q`` (shape of ``rows``: out x in) with ``rows ~ q * scale`` (``scale``: out x 1),
    rounded so that ``x . (rows - q * scale)`` is small for inputs ``x`` of second moment ``h``.
    Columns go in decreasing ``diag(h)`` ("act-order"): the largest inputs are rounded first,
    while the most columns are left to take their error."""
    order = np.argsort(-np.diag(h), kind="stable")
    back = np.argsort(order)
    return _gptq_in_order(np.asarray(rows)[:, order], scale, np.asarray(h)[np.ix_(order, order)], damp)[:, back]


def _gptq_in_order(rows: np.ndarray, scale: np.ndarray, h: np.ndarray, damp: float) -> np.ndarray:
    q = np.zeros(rows.shape, np.int8)
    live = np.abs(rows).max(1) > 0  # rows of empty slots stay zero
    w = np.asarray(rows, np.float64)[live]
    s = np.asarray(scale, np.float64).reshape(-1, 1)[live]
    n = w.shape[1]
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0  # inputs that are always zero: nothing to compensate through them
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    # Upper Cholesky factor of H^-1: row j holds how column j's error spreads to later columns.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    ql = np.zeros(w.shape, np.int8)
    for j in range(n):
        qj = np.clip(np.rint(w[:, j] / s[:, 0]), -127, 127)
        ql[:, j] = qj
        err = (w[:, j] - qj * s[:, 0]) / u[j, j]
        w[:, j + 1 :] -= np.outer(err, u[j, j + 1 :])
    q[live] = ql
    return q


def _patches(x: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """Non-overlapping ``kernel`` patches of NCHW ``x`` as rows in (channel, kh, kw) order."""
    b, c, hh, ww = x.shape
    kh, kw = kernel
    x = x[:, :, : hh - hh % kh, : ww - ww % kw]
    x = x.reshape(b, c, hh // kh, kh, ww // kw, kw).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c * kh * kw)


def patch_conv(node: onnx.NodeProto) -> tuple[int, int] | None:
    """The kernel of a Conv whose input rows are its non-overlapping patches (a ViT patch
    embedding: stride = kernel, no padding, dilation or groups); ``None`` for any other Conv."""
    k = tuple(node_attr(node, "kernel_shape", ()))
    if (
        len(k) != 2
        or tuple(node_attr(node, "strides", (1, 1))) != k
        or any(node_attr(node, "pads", (0,) * 4))
        or any(d != 1 for d in node_attr(node, "dilations", (1, 1)))
        or node_attr(node, "group", 1) != 1
    ):
        return None
    return k


def input_moments(
    model: onnx.ModelProto, nodes: dict[str, onnx.NodeProto], images, input_name: str, threads: int | None = None
) -> dict[str, np.ndarray]:
    """``E[a a^T]`` of the activation each of ``nodes`` (weight name -> MatMul / Gemm / patch
    Conv) reads, on ``images`` (an iterable of image arrays: ``calib_data.Chunks``)
    run through ``model`` (float, unmodified): weight name -> H. Sums are kept, not activations,
    so memory does not grow with the number of images."""
    acts = sorted({n.input[0] for n in nodes.values()})
    m = onnx.ModelProto()
    m.CopyFrom(model)
    fetch = [a for a in acts if a != input_name]  # the images come from the feed
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(a, TensorProto.FLOAT, None) for a in fetch if a not in known)
    kernels = {n.input[0]: patch_conv(n) for n in nodes.values() if n.op_type == "Conv"}
    sums = {a: 0.0 for a in acts}
    count = {a: 0 for a in acts}
    with model_session(m, threads) as sess:
        for chunk, i in ((c, i) for c in images for i in range(0, len(c), BATCH)):
            feed = {input_name: np.ascontiguousarray(chunk[i : i + BATCH], np.float32)}
            values = dict(zip(fetch, sess.run(fetch, feed)), **feed)
            for a in acts:
                v = values[a]
                v = _patches(v, kernels[a]) if a in kernels else v.reshape(-1, v.shape[-1])
                v = v.astype(np.float64)
                sums[a] = sums[a] + v.T @ v
                count[a] += len(v)
    return {w: sums[n.input[0]] / max(count[n.input[0]], 1) for w, n in nodes.items()}


def weight_readers(model: onnx.ModelProto, weights: set[str]) -> dict[str, onnx.NodeProto]:
    """For each of ``weights`` that exactly one MatMul, Gemm (without transA) or patch Conv reads
    as its weight: that node, whose input gives the moments. Other readers (a Gather of rows)
    are not counted; weights read by several linear nodes keep round-to-nearest."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if len(n.input) > 1 and n.input[1] in weights and n.op_type in ("MatMul", "Gemm", "Conv"):
            readers.setdefault(n.input[1], []).append(n)
    return {
        w: ns[0]
        for w, ns in readers.items()
        if len(ns) == 1 and not node_attr(ns[0], "transA", 0) and (ns[0].op_type != "Conv" or patch_conv(ns[0]))
    }


def output_axis(node: onnx.NodeProto) -> int:
    """The axis of its weight that holds ``node``'s outputs (the rows GPTQ rounds)."""
    return 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and node_attr(node, "transB", 0)) else 1


def as_rows(a: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    moved = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
    return np.moveaxis(rows.reshape(moved), 0, axis)


def gptq_qdq_weights(
    model: onnx.ModelProto, weights: dict[str, np.ndarray], moments: dict[str, np.ndarray]
) -> list[str]:
    """In place: the int8 weights ONNX Runtime's static quantization wrote (``W_quantized`` read
    by a per-channel ``DequantizeLinear``) re-rounded with :func:`gptq_round` from the float
    ``weights`` and their ``moments``, keeping ORT's scales. Returns the weights re-rounded."""
    inits = {t.name: t for t in model.graph.initializer}
    done = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or not n.input[0].endswith("_quantized"):
            continue
        w = n.input[0][: -len("_quantized")]
        if w not in weights or w not in moments:
            continue
        a, axis = weights[w], node_attr(n, "axis", 1)
        qt, st = inits[n.input[0]], inits[n.input[1]]
        scale = numpy_helper.to_array(st).astype(np.float64)
        if qt.data_type != TensorProto.INT8 or scale.shape != (a.shape[axis],):
            continue
        q = gptq_round(as_rows(a, axis), scale[:, None], moments[w])
        qt.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(from_rows(q, a.shape, axis)), qt.name))
        done.append(w)
    return done
