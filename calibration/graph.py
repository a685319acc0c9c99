"""ONNX graph helpers shared by every rewriting pass (int8, GPTQ, fallback, fp16, margins,
routing analysis, the artifact writer): who produces and who reads a tensor, node attributes,
pruning dead Q/DQ nodes, topological order, saving and running an in-memory model."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.errors import ArtifactError

# Protobuf refuses messages of 2 GiB; larger models keep their weights in a file beside them.
PROTO_LIMIT = (1 << 31) - (1 << 24)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that outputs it."""
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Tensor name -> ``(node, input index)`` of every node input that reads it (none: empty)."""
    out: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for n in graph.node:
        for j, i in enumerate(n.input):
            if i:
                out[i].append((n, j))
    return out


def node_attr(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def drop_unread(graph: onnx.GraphProto, op_types: tuple[str, ...]) -> None:
    """Remove nodes of ``op_types`` whose outputs nothing reads (a graph output counts as read),
    again until none is left (in place)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in op_types and not any(o in read for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def prune_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove QuantizeLinear / DequantizeLinear nodes whose outputs nothing reads, and the scales
    and zero points left unread (in place)."""
    graph = model.graph
    drop_unread(graph, ("QuantizeLinear", "DequantizeLinear"))
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used and t.name.endswith(("_scale", "_zero_point"))]:
        graph.initializer.remove(t)
    return model


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order ``graph``'s nodes topologically (rewrites append nodes), keeping the given order
    where it already is one."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, done = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in known for i in n.input):
                done.append(n)
                known.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"the rewritten graph has a cycle or a dangling input at node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(done)


def save_model(model: onnx.ModelProto, path) -> bool:
    """Write ``model`` to ``path``, its weights apart beside it (:func:`save_weights_apart`, which
    leaves ``model`` whole) when one protobuf cannot hold them; returns whether it did that."""
    large = model.ByteSize() > PROTO_LIMIT
    if large:
        save_weights_apart(model, path)
    else:
        onnx.save_model(model, str(path))
    return large


def save_weights_apart(model: onnx.ModelProto, path) -> None:
    """Write ``model`` to ``path`` with the raw data of its initializers of 1 KiB or more in
    ``<stem>.bin`` beside it, one tensor at a time: ``model`` is not changed (``onnx.save_model``
    with external data moves the weights out of it) and not copied."""
    path = Path(path)
    graph = model.graph
    light = onnx.ModelProto(
        ir_version=model.ir_version,
        opset_import=model.opset_import,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        functions=model.functions,
        metadata_props=model.metadata_props,
    )
    g = light.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    location = f"{path.stem}.bin"
    with open(path.parent / location, "wb") as f:
        for t in graph.initializer:
            raw = t.raw_data if t.HasField("raw_data") else b""
            if len(raw) < 1024:
                g.initializer.add().CopyFrom(t)
                continue
            apart = g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
            apart.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(f.tell())), ("length", str(len(raw)))):
                apart.external_data.add(key=key, value=value)
            f.write(raw)
    onnx.save_model(light, str(path))


def load_artifact_model(art) -> onnx.ModelProto:
    """The graph of artifact ``art`` (a ``runtime.artifact.Artifact``) with its weights, each read
    through the artifact's own tensor map rather than the locations written in the graph:
    ``onnx.load`` follows those and refuses tensor files with several hard links, which copies
    made with ``cp -al`` or ``rsync --link-dest`` have."""
    model = onnx.load(str(art.model_path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        if t.name not in art.tensors:
            raise ArtifactError(f"{art.dir}: the graph's tensor {t.name} is not in manifest.json")
        t.CopyFrom(numpy_helper.from_array(np.array(art.read(t.name)), t.name))  # a copy, 0-d kept
        t.data_location = TensorProto.DEFAULT  # as onnx.load leaves it
    return model


@contextmanager
def model_session(model: onnx.ModelProto, threads: int | None = None, outputs: tuple[str, ...] = ()):
    """A CPU ``InferenceSession`` of the in-memory ``model`` with the artifacts' session options,
    also outputting the float tensors named in ``outputs`` (added to ``model`` only while it is
    written). The model goes through a temporary file with its weights apart, which ONNX Runtime
    reads straight into its tensors: from serialized bytes it would hold the bytes, its own parsed
    copy and its tensors at once, 3 x 737 MiB beside ``model`` on ViT-B/16 at 301 tasks."""
    import tempfile

    import onnxruntime as ort

    from runtime.backends.onnxrt import session_options

    known = {o.name for o in model.graph.output}
    added = [
        helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in dict.fromkeys(outputs) if t not in known
    ]
    with tempfile.TemporaryDirectory(prefix="care-session-") as tmp:
        model.graph.output.extend(added)
        try:
            save_weights_apart(model, Path(tmp) / "m.onnx")
        finally:
            for _ in added:
                model.graph.output.pop()
        yield ort.InferenceSession(
            str(Path(tmp) / "m.onnx"), session_options(threads, quiet=True), providers=["CPUExecutionProvider"]
        )
