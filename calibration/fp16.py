"""FP16: the backbone and the experts compute in half precision, the routing path in float32.

ONNX Runtime's converter (``onnxruntime.transformers.float16``) rewrites every float tensor
and node to float16 except the nodes it is told to keep, and puts explicit ``Cast`` nodes on
every edge between the two; the graph's inputs and outputs stay float32. Routing nodes
(``calibration.routing_nodes``) are kept in float32 unless ``routing="reduced"``, which
converts them too (TopK included).

Growth tensors that end up in float16 are stored with ``runtime.tensor_files.as_stored`` (float32
first, saturating at the largest half), the rounding that growth uses for new tasks, so an FP16
artifact that takes a task equals the FP16 rewrite of the grown FP32 artifact.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from runtime.artifact import Artifact
from runtime.tensor_files import as_stored

from .graph import drop_unread, node_attr, producers


def to_fp16(model: onnx.ModelProto, keep: set[str], reduced: bool) -> onnx.ModelProto:
    """The float16 rewrite of ``model`` (weights loaded), nodes named in ``keep`` left in float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # The converter keeps TopK in float32 by default; "reduced" routing means all of it.
    blocked = [op for op in DEFAULT_OP_BLOCK_LIST if not (reduced and op == "TopK")]
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=sorted(keep), op_block_list=blocked)
    drop_duplicate_casts(model)
    drop_round_trips(model)
    return model


def drop_duplicate_casts(model: onnx.ModelProto) -> int:
    """Remove ``Cast`` nodes that repeat an earlier one's output name; returns how many.

    ONNX Runtime's converter before 1.32 gives a float32 initializer read by several kept nodes
    one ``NAME_cast_to_fp32`` Cast per reader, all with the same output: not SSA, and the
    checker refuses it. They are identical, so the first (earliest in node order) serves all."""
    seen: dict[str, onnx.NodeProto] = {}
    keep = []
    for n in model.graph.node:
        first = seen.get(n.output[0]) if n.output else None
        if first is None:
            seen.update((o, n) for o in n.output)
        elif n.op_type == first.op_type == "Cast" and n.input == first.input and n.attribute == first.attribute:
            continue
        keep.append(n)
    dropped = len(model.graph.node) - len(keep)
    if dropped:  # by position: protobuf's remove() would take the first equal node
        kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in keep]
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return dropped


def drop_round_trips(model: onnx.ModelProto) -> int:
    """Remove float32 -> float16 -> float32 ``Cast`` pairs; returns how many.

    The converter wraps every kept node in its own casts (float32 in, float16 out), so a chain of
    kept nodes, the routing path, would still round each intermediate tensor to half precision:
    enough to move perceptor entropies by 1e-4 and flip routing choices. Readers of such a pair
    read the float32 tensor itself instead."""
    graph = model.graph
    f32 = {
        v.name
        for v in list(graph.value_info) + list(graph.input) + list(graph.output)
        if v.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    f32 |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    producer = producers(graph)
    replace = {}
    for n in graph.node:
        if _cast_to(n, TensorProto.FLOAT):
            first = producer.get(n.input[0])
            if _cast_to(first, TensorProto.FLOAT16) and (
                first.input[0] in f32 or _cast_to(producer.get(first.input[0]), TensorProto.FLOAT)
            ):
                replace[n.output[0]] = first.input[0]
    for n in graph.node:
        for j, i in enumerate(n.input):
            if i in replace:
                n.input[j] = replace[i]
    drop_unread(graph, ("Cast",))  # casts nobody reads any more
    return len(replace)


def _cast_to(node: onnx.NodeProto | None, dtype: int) -> bool:
    """Whether ``node`` is a Cast to ``dtype``."""
    return node is not None and node.op_type == "Cast" and node_attr(node, "to", None) == dtype


def fp16_growth_values(model: onnx.ModelProto, src: Artifact) -> dict[str, np.ndarray]:
    """Each float16 growth tensor of ``model``, from the source's float32 value (see module doc)."""
    out = {}
    for t in model.graph.initializer:
        spec = src.tensors.get(t.name)
        if spec is not None and spec.role != "backbone" and t.data_type == onnx.TensorProto.FLOAT16:
            out[t.name] = as_stored(np.asarray(src.read(t.name), np.float32), "float16")
    return out
