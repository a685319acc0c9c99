"""Write a rewritten graph as an artifact directory of the same format (docs/ARTIFACT.md).

The rewrite (FP16 or INT8) hands over an in-memory ``ModelProto`` whose initializers hold their
values. Every growth tensor (layout role other than ``backbone``) keeps its name, shape, role
and file; the rest of the weights, the backbone as rewritten, goes to backbone.bin. Every
external tensor starts at a 64 KiB boundary. The manifest is the source's, with the new
precision, tensor layout, file digests and task slot digests, plus a ``quantization`` block.
The directory is written under a temporary name beside ``out`` and renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from runtime.artifact import Artifact
from runtime.atomic import write_bytes, write_json
from runtime.layout import (
    ALIGN,
    BACKBONE_FILE,
    MANIFEST,
    MODEL_FILE,
    SLOTS_FILE,
    SMALL_ALIGN,
    STATE_FILE,
    TensorSpec,
    task_regions,
)
from runtime.outdir import ARTIFACT, output_dir
from runtime.tensor_files import file_entry, regions_digest, tensor_file_bytes

from .graph import sort_nodes

# New weights of a rewrite (quantized backbone tensors) go to backbone.bin from this size on;
# smaller ones (scales, zero points) stay inline in model.onnx.
EXTERNAL_MIN_BYTES = 1024
_FILE_OF_ROLE = {
    "backbone": BACKBONE_FILE,
    "first": SLOTS_FILE,
    "slot": SLOTS_FILE,
    "router": SLOTS_FILE,
    "state": STATE_FILE,
}


def _place(names: list[str], arrays: dict[str, np.ndarray], roles: dict[str, str], file: str) -> list[TensorSpec]:
    """Tensors of at least 64 KiB at 64 KiB boundaries (memory-mapped), smaller ones packed
    between them at 64-byte offsets (read whole): the small tensors of a reduced-precision
    artifact would otherwise be mostly padding."""
    large = [n for n in names if arrays[n].nbytes >= ALIGN]
    small = [n for n in names if arrays[n].nbytes < ALIGN]
    specs, offset = [], 0
    for name in large + small:
        a = arrays[name]
        align = ALIGN if a.nbytes >= ALIGN else SMALL_ALIGN
        offset = -(-offset // align) * align
        specs.append(TensorSpec(name, file, offset, tuple(a.shape), str(a.dtype), roles[name]))
        offset += a.nbytes
    return specs


def _external(tensor: TensorProto, spec: TensorSpec) -> None:
    """Turn ``tensor`` into a reference to ``spec``'s bytes."""
    tensor.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", spec.file), ("offset", str(spec.offset)), ("length", str(spec.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def growth_role(src: Artifact, name: str) -> str | None:
    """The role of an initializer of the rewritten graph: its source role, or that of the growth
    tensor it belongs to (``X.scale`` of ``X``); None for a new backbone tensor."""
    spec = src.tensors.get(name) or src.tensors.get(name.rsplit(".", 1)[0])
    return spec.role if spec is not None else None


def write_artifact(
    model: onnx.ModelProto,
    src: Artifact,
    out: Path,
    precision: str,
    quantization: dict,
    growth_values: dict[str, np.ndarray] | None = None,
    force: bool = False,
    finish: Callable[[Path], None] | None = None,
) -> dict:
    """Write ``model`` (initializers in memory) as an artifact at ``out``; return its manifest.

    ``growth_values``: values to store for growth tensors instead of the initializers' (the
    packing code's own rounding, see ``runtime.tensor_files.as_stored``); same dtype and shape.
    ``finish(tmp)``: called with the finished temporary directory before it is renamed to ``out``.
    """
    graph = model.graph
    sort_nodes(graph)
    inline = {
        t.name
        for t in onnx.load(str(src.model_path), load_external_data=False).graph.initializer
        if t.data_location != TensorProto.EXTERNAL
    }
    arrays, roles, order = {}, {}, {}
    source_order = {name: i for i, name in enumerate(src.tensors)}
    for i, t in enumerate(graph.initializer):
        role = growth_role(src, t.name)
        if role is None:  # not an external tensor of the source: the rewrite's own
            if t.name in inline or _nbytes(t) < EXTERNAL_MIN_BYTES:
                continue  # constants of the graph, scales and zero points: inline
            role = "backbone"
        a = numpy_helper.to_array(t)
        if growth_values and t.name in growth_values:
            a = np.asarray(growth_values[t.name])
            if a.dtype != numpy_helper.to_array(t).dtype or a.shape != tuple(t.dims):
                raise ValueError(f"growth value of {t.name}: {a.dtype}{a.shape}, graph has {tuple(t.dims)}")
        arrays[t.name], roles[t.name] = a, role
        order[t.name] = (source_order.get(t.name, len(source_order)), i)
    by_file: dict[str, list[str]] = {BACKBONE_FILE: [], SLOTS_FILE: [], STATE_FILE: []}
    for name in sorted(arrays, key=order.__getitem__):
        by_file[_FILE_OF_ROLE[roles[name]]].append(name)
    specs = {}
    for file, names in by_file.items():
        specs.update({s.name: s for s in _place(names, arrays, roles, file)})
    for t in graph.initializer:
        if t.name in specs:
            _external(t, specs[t.name])

    with output_dir(out, ARTIFACT, force=force, inputs=[src.dir]) as tmp:
        for file in by_file:
            write_bytes(tmp / file, tensor_file_bytes(file, specs, arrays))
        write_bytes(tmp / MODEL_FILE, model.SerializeToString())
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        manifest = _manifest(src, tmp, specs, precision, quantization)
        write_json(tmp / MANIFEST, manifest)
        if finish is not None:
            finish(tmp)
    return manifest


def _nbytes(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _manifest(src: Artifact, tmp: Path, specs: dict[str, TensorSpec], precision: str, quantization: dict) -> dict:
    m = dict(src.manifest)
    tasks = [
        dict(task, slot_sha256=regions_digest(tmp / SLOTS_FILE, specs, task_regions(t, src.dims)))
        for t, task in enumerate(m["tasks"])
    ]
    slots = file_entry(tmp / SLOTS_FILE) if precision == "int8" else {"bytes": (tmp / SLOTS_FILE).stat().st_size}
    m.update(
        precision=precision,
        tasks=tasks,
        files={
            MODEL_FILE: file_entry(tmp / MODEL_FILE),
            BACKBONE_FILE: file_entry(tmp / BACKBONE_FILE),
            SLOTS_FILE: slots,
            STATE_FILE: file_entry(tmp / STATE_FILE),
        },
        tensors={name: s.to_dict() for name, s in specs.items()},
        quantization=quantization,
    )
    return m
