"""The graph a backend runs: the artifact's ONNX model with its growth tensors as inputs.

Growth (a new task) changes the artifact's slot, router, first-task and state tensors (every
tensor whose layout role is not ``backbone``) and nothing else. Every backend receives those
tensors as graph *inputs* held in memory the session owns (numpy on the CPU, device buffers on
a GPU), bound once and passed to every run. Adding a task then writes into those buffers: no
new session, no new TensorRT engine and no refit. (TensorRT 11.3's refittable engines, built
with ``BuilderFlag.REFIT``, can silently drop a GEMM bias even when never refitted; see its
release notes. Inputs are ordinary tensors and carry no such risk.) The backbone stays constant
in the graph and keeps every optimisation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .errors import ArtifactError
from .layout import BACKBONE_FILE, INPUT, MODEL_FILE, ROUTING_EXPERTS, ROUTING_TASKS, score_output


@dataclass
class Graph:
    """What a runner is built from."""

    model: bytes  # serialized ModelProto; its external (backbone) data is read from `directory`
    directory: Path  # the artifact directory
    model_path: Path  # the artifact's model.onnx (parsers resolve external data against it)
    input: str  # the image input, float32 (N, 3, S, S)
    outputs: list[str]  # logits, routing tasks, routing experts
    batch: int | None  # the static batch, or None when the batch is dynamic
    input_size: int
    weights: dict[str, np.ndarray]  # the growth tensors' current values, by input name
    digest: str  # names the graph and its constants (engine cache key); growth does not change it

    def rows(self, name: str, row: int, rows: int) -> tuple[int, np.ndarray]:
        """Byte offset and values of rows ``[row, row + rows)`` along axis 0 of a growth tensor
        (a scalar is one row)."""
        value = self.weights[name]
        if value.ndim == 0:
            return 0, value
        return row * (value.nbytes // value.shape[0]), value[row : row + rows]


def growth_tensors(art: Artifact) -> list[str]:
    """The initializers that adding a task may change."""
    return [name for name, spec in art.tensors.items() if spec.role != "backbone"]


def load_graph(art: Artifact) -> Graph:
    """Read the artifact's graph, move its growth tensors to inputs and load their values."""
    import onnx

    try:
        model = onnx.load(str(art.model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a damaged file
        raise ArtifactError(f"{art.model_path}: not a readable ONNX model ({exc})") from None
    names = growth_tensors(art)
    graph = model.graph
    dims = [d for i in graph.input if i.name == INPUT for d in i.type.tensor_type.shape.dim][:1]
    batch = art.manifest["batch"]
    if not dims or (dims[0].dim_value or "dynamic") != batch:
        raise ArtifactError(f"{art.model_path}: the graph's batch differs from the manifest's ({batch!r})")
    inits = {t.name: t for t in graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ArtifactError(f"{art.model_path}: the graph lacks the tensor {missing[0]!r} that the manifest lays out")
    for name in names:
        graph.input.append(onnx.helper.make_tensor_value_info(name, inits[name].data_type, list(inits[name].dims)))
    keep = [t for t in graph.initializer if t.name not in set(names)]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # Copies, in native byte order: the session owns them and growth writes into them.
    weights = {}
    for name in names:
        stored = art.read(name)
        weights[name] = np.array(stored, dtype=stored.dtype.newbyteorder("="))
    m = art.manifest
    files = m["files"]
    key = f"{files[MODEL_FILE]['sha256']}:{files[BACKBONE_FILE].get('sha256', files[BACKBONE_FILE]['bytes'])}"
    return Graph(
        model=model.SerializeToString(),
        directory=art.dir,
        model_path=art.model_path,
        input=INPUT,
        outputs=[score_output(m), ROUTING_TASKS, ROUTING_EXPERTS],
        batch=None if m["batch"] == "dynamic" else int(m["batch"]),
        input_size=art.dims.img_size,
        weights=weights,
        digest=hashlib.sha256(key.encode()).hexdigest(),
    )
