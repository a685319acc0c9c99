"""The static ONNX graph of the iterative prediction (``care-export onnx --predict iterative``).

The same network as :func:`graph.build_model`, run once over the input tiled ``capacity + 1``
times along the batch axis: row group ``i < capacity`` is the training-time pass of task ``i``
(router ``i`` forced by an entropy of -inf, candidates ``0..i-1``, so experts ``0..i``), the last
group the ordinary single pass. Then, per input: ``p_i = softmax(scale * cos_i)``, passes of
tasks not learned yet get entropy +inf, ``i* = ArgMin_i H_i`` and ``scores = p_single + p_{i*}``
(docs/MODEL.md). Shapes are static but for the batch; no Loop, If or NonZero; the number of
learned tasks stays data (``active_tasks``), so growth in place works as for single-pass graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from runtime.errors import CareError
from runtime.layout import INPUT, ROUTING_EXPERTS, ROUTING_TASKS, SCORES, Dims, TensorSpec
from runtime.numerics import COS_SCALE, ENTROPY_EPS

from .graph import MIN_OPSET, Builder, _Shared, cosine_logits, finish, network, routing_shapes, routing_widths

MAX_ITERATIVE_CAPACITY = 61  # tasks 0..60 (care_export.model.iterative.MAX_ITERATIVE_TASK; no torch import here)


def check_capacity(capacity: int) -> None:
    if capacity > MAX_ITERATIVE_CAPACITY:
        raise CareError(
            f"--predict iterative runs one pass per task slot: capacity {capacity} exceeds "
            f"{MAX_ITERATIVE_CAPACITY} tasks, past which the reference predicts in a single pass"
        )


def build_iterative_model(
    dims: Dims, specs: dict[str, TensorSpec], opset: int = MIN_OPSET, batch: int | None = None, scale: float = COS_SCALE
) -> onnx.ModelProto:
    """Outputs ``scores`` (B, class capacity) and the single pass's routing."""
    check_capacity(dims.capacity)
    cap, passes = dims.capacity, dims.capacity + 1
    g = Builder(specs)
    tiled = g.op("Tile", INPUT, g.i64([passes, 1, 1, 1]))  # row p * B + b: pass p of input b
    s = _Shared(g, dims, True, image=tiled)
    b = g.op("Squeeze", g.op("Shape", INPUT, start=0, end=1), g.i64([0]))
    rows = g.op("Range", g.i64(0), s.scalar_batch, g.i64(1))
    pass_id = g.op("Div", rows, b)  # (P*B,)
    learned = s.active_tasks
    # Candidate routers per row: 0..i for pass i (i forced), the learned ones for the single pass.
    limit = g.op("Where", g.op("Less", pass_id, g.i64(cap)), g.op("Add", pass_id, g.i64(1)), learned)
    s.active_tasks = g.op("Unsqueeze", limit, g.i64([1]))  # (P*B, 1)
    s.slot_active = g.op("Less", g.op("Unsqueeze", s.iota, g.i64([1])), g.op("Unsqueeze", limit, g.i64([0])))
    s.inf = g.const(np.inf)
    s.forced = g.op("Equal", g.op("Unsqueeze", s.iota, g.i64([0])), g.op("Unsqueeze", pass_id, g.i64([1])))

    feat, tasks, experts = network(g, dims, s, tiled, opset)
    g.scope = "iterative"
    logits = g.op("Mul", cosine_logits(g, dims, feat, s), g.const(scale))
    probs = g.op("Softmax", g.op("Reshape", logits, g.i64([passes, -1, dims.class_capacity])), axis=-1)  # (P, B, C)
    p_pass = g.op("Slice", probs, g.i64([0]), g.i64([cap]), g.i64([0]))
    plogp = g.op("Mul", p_pass, g.op("Log", g.op("Add", p_pass, g.const(ENTROPY_EPS))))
    ent = g.op("Neg", g.op("ReduceSum", plogp, g.i64([-1]), keepdims=0))  # (cap, B)
    ent = g.op("Where", g.op("Less", g.i64(np.arange(cap)[:, None]), learned), ent, s.inf)  # unlearned never win
    best = g.op("ArgMin", ent, axis=0, keepdims=1)  # (1, B), first on ties as torch.argmin
    gather_idx = g.op(
        "Expand",
        g.op("Unsqueeze", best, g.i64([2])),
        g.op("Concat", g.i64([1]), g.op("Shape", p_pass, start=1), axis=0),
    )
    p_iter = g.op("Squeeze", g.op("GatherElements", p_pass, gather_idx, axis=0), g.i64([0]))
    p_single = g.op("Gather", probs, g.i64(cap), axis=0)
    g.nodes.append(helper.make_node("Add", [p_single, p_iter], [SCORES], name="iterative/scores"))

    start = g.op("Mul", g.op("Unsqueeze", b, g.i64([0])), g.i64([cap]))  # the single pass's rows
    end = g.i64([np.iinfo(np.int64).max])
    for name, routing, shape in zip((ROUTING_TASKS, ROUTING_EXPERTS), (tasks, experts), routing_shapes(dims)):
        routing = g.op("Reshape", routing, g.i64(shape))
        g.nodes.append(helper.make_node("Slice", [routing, start, end, g.i64([0])], [name], name=f"iterative/{name}"))
    bdim = batch if batch is not None else "batch"
    m, k = routing_widths(dims)
    image = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [bdim, dims.in_chans, dims.img_size, dims.img_size])
    outputs = [
        helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, [bdim, dims.class_capacity]),
        helper.make_tensor_value_info(ROUTING_TASKS, TensorProto.INT64, [bdim, dims.depth, m]),
        helper.make_tensor_value_info(ROUTING_EXPERTS, TensorProto.INT64, [bdim, dims.depth, m, k]),
    ]
    return finish(g, "care_iterative", [image], outputs, opset)
