"""A Triton Inference Server model repository from an artifact (no PyTorch).

::

    REPO/NAME/
      config.pbtxt      backend onnxruntime, `images` in, logits and routing out, dynamic batching
      labels.txt        class names, one per line (Triton's classification extension)
      1/                version 1: the artifact (model.onnx and its data files)
      2/                version 2: grown by `care-export add-task --triton REPO/NAME CKPT`

The artifact's model.onnx keeps its growth tensors as initializers (the runtime moves them to
inputs in memory only), so Triton sees `images` as the one required input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .artifact import Artifact
from .atomic import write_atomic
from .errors import ArtifactError
from .layout import INPUT, MODEL_FILE

CONFIG = "config.pbtxt"
LABELS = "labels.txt"
_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32"}  # onnx.TensorProto -> Triton


def versions(model_dir: Path) -> list[int]:
    """The model's version numbers, ascending."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def model_config(art: Artifact, name: str, max_batch: int, instances: int, device: str) -> str:
    """config.pbtxt for the artifact: tensor types and shapes read from its graph."""
    import onnx

    if art.manifest["batch"] != "dynamic":
        raise ArtifactError(
            f"{art.dir} has a fixed batch of {art.manifest['batch']}: export with --batch dynamic "
            f"for Triton's dynamic batching"
        )
    graph = onnx.load(str(art.model_path), load_external_data=False).graph

    def entry(v, extra: str = "") -> str:
        t = v.type.tensor_type
        dims = [d.dim_value or -1 for d in t.shape.dim][1:]  # without the batch dimension
        return f'  {{ name: "{v.name}" data_type: {_TYPES[t.elem_type]} dims: {dims}{extra} }}'

    outputs = [entry(o, f' label_filename: "{LABELS}"' if o.name == "logits" else "") for o in graph.output]
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    return "\n".join(
        [
            f'name: "{name}"',
            'backend: "onnxruntime"',
            f"max_batch_size: {max_batch}",
            f'default_model_filename: "{MODEL_FILE}"',
            "input [",
            ",\n".join(entry(i) for i in graph.input if i.name == INPUT),
            "]",
            "output [",
            ",\n".join(outputs),
            "]",
            "dynamic_batching { }",
            f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
            "version_policy: { latest: { num_versions: 1 } }",
            "",
        ]
    )


def write_labels(model_dir: Path, art: Artifact) -> None:
    # Classes are only ever appended, so the newest version's labels serve the older ones too.
    write_atomic(model_dir / LABELS, "".join(f"{n}\n" for n in art.manifest["classes"]["names"]).encode())


def add_version(model_dir: Path, ckpt: Path, keep: int | None) -> tuple[int, list[int], list[int]]:
    """Write version N+1 of a Triton model from its newest version N grown by ``ckpt``; keep the
    ``keep`` newest versions. Returns the new version, the tasks added and the versions removed."""
    from .growth import add_tasks_to_copy

    if not (model_dir / CONFIG).is_file() or not versions(model_dir):
        raise ArtifactError(f"{model_dir}: not a Triton model written by care-export triton (no {CONFIG} or version)")
    newest = versions(model_dir)[-1]
    added, _, _ = add_tasks_to_copy(model_dir / str(newest), ckpt, model_dir / str(newest + 1))
    write_labels(model_dir, Artifact(model_dir / str(newest + 1)))
    removed = versions(model_dir)[:-keep] if keep else []
    for v in removed:  # only once the new version is complete
        shutil.rmtree(model_dir / str(v))
    return newest + 1, added, removed
