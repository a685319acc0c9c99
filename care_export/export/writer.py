"""``care-export onnx``: a checkpoint directory -> an artifact directory (docs/ARTIFACT.md).

Reads the checkpoint with numpy (no model is built), packs the backbone, every task and the
state into the artifact's layout, writes the graph, checks it, and renames the finished
directory into place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from runtime.atomic import write_bytes, write_json
from runtime.checkpoint_files import load_tensors, read_checkpoint_manifest
from runtime.errors import CapacityError, CareError
from runtime.growth import backbone_fields, brmoe_fields, checkpoint_fields, load_state_sources
from runtime.layout import (
    BACKBONE_FILE,
    FORMAT,
    FORMAT_VERSION,
    INPUT,
    LOGITS,
    MANIFEST,
    MODEL_FILE,
    ROUTING_EXPERTS,
    ROUTING_TASKS,
    SCORES,
    SLOTS_FILE,
    STATE_FILE,
    Dims,
    backbone_shapes,
    file_size,
    layout,
)
from runtime.numerics import COS_SCALE
from runtime.outdir import ARTIFACT, output_dir
from runtime.packing import pack_state, pack_task
from runtime.tensor_files import file_entry, tensor_file_bytes, write_patches

from .graph import MIN_OPSET, build_model, routing_widths
from .iterative_graph import build_iterative_model, check_capacity

PRECISION = "fp32"


def export_dims(ckpt: dict, capacity: int, slot_classes: int | None = None) -> Dims:
    """The artifact sizes for checkpoint manifest ``ckpt`` at ``capacity`` tasks.

    The slot width (classes a later task may have) is ``slot_classes``, else the largest later
    task of the checkpoint, else the recorded increment of its sequence, else the first task's.
    """
    bb, moe = ckpt["backbone"], ckpt["brmoe"]
    classes = [int(t["classes"]) for t in ckpt["tasks"]]
    if capacity < len(classes):
        raise CapacityError(f"capacity {capacity} is below the checkpoint's {len(classes)} tasks")
    if slot_classes is None:
        slot_classes = max(classes[1:], default=None) or ckpt.get("sequence", {}).get("increment") or classes[0]
    if any(c > slot_classes for c in classes[1:]):
        raise CapacityError(
            f"--task-classes {slot_classes} is below the checkpoint's largest later task ({max(classes[1:])} classes)"
        )
    if bb["embed_dim"] % bb["num_heads"]:
        raise CareError(f"embed_dim {bb['embed_dim']} is not a multiple of num_heads {bb['num_heads']}")
    return Dims(
        embed_dim=bb["embed_dim"],
        depth=bb["depth"],
        num_heads=bb["num_heads"],
        mlp_dim=int(bb["embed_dim"] * bb["mlp_ratio"]),
        img_size=bb["img_size"],
        patch_size=bb["patch_size"],
        capacity=capacity,
        expert_dim=moe["expert_dim"],
        shared_dim=moe["shared_dim"],
        topk_routers=moe["topk_routers"],
        topk_experts=moe["topk_experts"],
        first_classes=classes[0],
        slot_classes=int(slot_classes),
    )


def _timm_keys(depth: int) -> set[str]:
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        keys |= {
            f"blocks.{i}.{k}"
            for k in (
                "norm1.weight",
                "norm1.bias",
                "attn.qkv.weight",
                "attn.qkv.bias",
                "attn.proj.weight",
                "attn.proj.bias",
                "norm2.weight",
                "norm2.bias",
                "mlp.fc1.weight",
                "mlp.fc1.bias",
                "mlp.fc2.weight",
                "mlp.fc2.bias",
            )
        }
    return keys


def backbone_arrays(state: dict[str, np.ndarray], dims: Dims, where: str) -> dict[str, np.ndarray]:
    """timm ViT weights -> graph layout: projections transposed to (in, out), the attention scale
    folded into the q projection."""
    want = _timm_keys(dims.depth)
    extra = sorted(set(state) - want)
    if extra:
        raise CareError(
            f"{where}: unsupported backbone feature (tensor {extra[0]}); only plain timm ViTs with a CLS token export"
        )
    missing = sorted(want - set(state))
    if missing:
        raise CareError(f"{where}: backbone lacks {missing[0]}")
    d = dims.embed_dim
    scale = np.ones(3 * d)
    scale[:d] = (d // dims.num_heads) ** -0.5
    out = {
        "vit.patch_embed.weight": state["patch_embed.proj.weight"],
        "vit.patch_embed.bias": state["patch_embed.proj.bias"],
        "vit.cls_token": state["cls_token"],
        "vit.pos_embed": state["pos_embed"],
        "vit.norm.weight": state["norm.weight"],
        "vit.norm.bias": state["norm.bias"],
    }
    for i in range(dims.depth):
        t, b = f"blocks.{i}.", f"vit.blocks.{i}."
        out.update(
            {
                b + "norm1.weight": state[t + "norm1.weight"],
                b + "norm1.bias": state[t + "norm1.bias"],
                b + "attn.qkv": (state[t + "attn.qkv.weight"].astype(np.float64) * scale[:, None]).T,
                b + "attn.qkv_bias": state[t + "attn.qkv.bias"].astype(np.float64) * scale,
                b + "attn.proj": state[t + "attn.proj.weight"].T,
                b + "attn.proj_bias": state[t + "attn.proj.bias"],
                b + "norm2.weight": state[t + "norm2.weight"],
                b + "norm2.bias": state[t + "norm2.bias"],
                b + "mlp.fc1": state[t + "mlp.fc1.weight"].T,
                b + "mlp.fc1_bias": state[t + "mlp.fc1.bias"],
                b + "mlp.fc2": state[t + "mlp.fc2.weight"].T,
                b + "mlp.fc2_bias": state[t + "mlp.fc2.bias"],
            }
        )
    for name, shape in backbone_shapes(dims).items():
        if tuple(out[name].shape) != shape:
            raise CareError(f"{where}: backbone tensor for {name} has shape {tuple(out[name].shape)}, expected {shape}")
    return out


def _write_graph(
    directory: Path,
    dims: Dims,
    specs,
    opset: int,
    batch: int | None,
    moe: bool,
    predict: str = "single",
    scale: float = COS_SCALE,
) -> None:
    path = directory / MODEL_FILE
    if predict == "iterative":
        model = build_iterative_model(dims, specs, opset, batch, scale)
    else:
        model = build_model(dims, specs, opset, batch, moe)
    write_bytes(path, model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)  # the path form: external data is not loaded


def first_tasks(ckpt: dict, tasks: int) -> dict:
    """The checkpoint manifest as if it held its first ``tasks`` tasks (head and shared experts
    stay those of the full checkpoint, as ``load_checkpoint(..., tasks=)`` does)."""
    if not 1 <= tasks <= len(ckpt["tasks"]):
        raise CareError(f"the checkpoint has {len(ckpt['tasks'])} tasks, cannot take the first {tasks}")
    entries = ckpt["tasks"][:tasks]
    names = ckpt["classes"]["names"][: sum(int(e["classes"]) for e in entries)]
    return dict(ckpt, tasks=entries, classes=dict(ckpt["classes"], names=names))


def export_artifact(
    ckpt_dir: str | Path,
    out: str | Path,
    capacity: int,
    *,
    opset: int = MIN_OPSET,
    batch: int | None = None,
    slot_classes: int | None = None,
    tasks: int | None = None,
    force: bool = False,
    progress=None,
    predict: str = "single",
) -> dict:
    """Write the artifact of checkpoint ``ckpt_dir`` for ``capacity`` tasks into ``out``.

    ``predict``: ``"single"`` (output ``logits``) or ``"iterative"`` (the reference's iterative
    prediction, output ``scores``; capacity at most 61, see ``iterative_graph.py``).

    ``tasks``: export only the checkpoint's first tasks (benchmarks). ``progress``: an optional
    callable ``progress(done, total, what)`` called as tasks are packed. Returns the manifest.
    """
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    ckpt = read_checkpoint_manifest(ckpt_dir)
    if tasks is not None:
        ckpt = first_tasks(ckpt, tasks)
    dims = export_dims(ckpt, capacity, slot_classes)
    if predict not in ("single", "iterative"):
        raise CareError(f"predict must be single or iterative, got {predict!r}")
    if predict == "iterative":
        check_capacity(capacity)
    scale = float(ckpt.get("training", {}).get("scale", COS_SCALE))
    if opset < MIN_OPSET:
        raise CareError(f"opset {opset} is below {MIN_OPSET} (LayerNormalization)")
    if opset > onnx.defs.onnx_opset_version():
        raise CareError(f"opset {opset} is newer than this onnx package knows ({onnx.defs.onnx_opset_version()})")
    specs = layout(dims)
    with output_dir(out, ARTIFACT, force=force, inputs=[ckpt_dir]) as tmp:
        where = str(ckpt_dir / ckpt["backbone"]["file"])
        vit = backbone_arrays(load_tensors(ckpt_dir, ckpt["backbone"]), dims, where)
        write_bytes(tmp / BACKBONE_FILE, tensor_file_bytes(BACKBONE_FILE, specs, vit))
        del vit

        with open(tmp / SLOTS_FILE, "wb") as f:  # sparse: unused slots are holes that read as zeros
            f.truncate(file_size(specs, SLOTS_FILE))
        digests = []
        entries = ckpt["tasks"]
        for t, e in enumerate(entries):
            patches = pack_task(load_tensors(ckpt_dir, e), t, int(e["classes"]), dims, str(ckpt_dir / e["file"]))
            digests.append(write_patches(tmp / SLOTS_FILE, specs, patches))
            if progress:
                progress(t + 1, len(entries), "tasks")

        shared, head = load_state_sources(ckpt_dir, ckpt)
        state = pack_state(shared, head, [int(e["classes"]) for e in entries], dims, str(ckpt_dir))
        write_bytes(tmp / STATE_FILE, tensor_file_bytes(STATE_FILE, specs, state))
        _write_graph(tmp, dims, specs, opset, batch, moe=True, predict=predict, scale=scale)

        m, k = routing_widths(dims)
        bdim = batch if batch is not None else "batch"
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "precision": PRECISION,
            **({"predict": "iterative", "scale": scale} if predict == "iterative" else {}),
            "opset": opset,
            "batch": "dynamic" if batch is None else batch,
            "dims": dims.to_dict(),
            "backbone": backbone_fields(ckpt),
            "brmoe": brmoe_fields(ckpt),
            "preprocessing": ckpt["preprocessing"],
            **checkpoint_fields(ckpt, digests),
            "inputs": {INPUT: {"shape": [bdim, dims.in_chans, dims.img_size, dims.img_size], "dtype": "float32"}},
            "outputs": {
                (SCORES if predict == "iterative" else LOGITS): {
                    "shape": [bdim, dims.class_capacity],
                    "dtype": "float32",
                },
                ROUTING_TASKS: {"shape": [bdim, dims.depth, m], "dtype": "int64"},
                ROUTING_EXPERTS: {"shape": [bdim, dims.depth, m, k], "dtype": "int64"},
            },
            "files": {
                MODEL_FILE: file_entry(tmp / MODEL_FILE),
                BACKBONE_FILE: file_entry(tmp / BACKBONE_FILE),
                SLOTS_FILE: {"bytes": (tmp / SLOTS_FILE).stat().st_size},
                STATE_FILE: file_entry(tmp / STATE_FILE),
            },
            "tensors": {name: s.to_dict() for name, s in specs.items()},
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def export_backbone(ckpt_dir: str | Path, out: str | Path, *, opset: int = MIN_OPSET, batch: int | None = None) -> Path:
    """The plain backbone (no BR-MoE) built the same way: ``out/model.onnx`` + ``backbone.bin``,
    output ``features``. For benchmarks; returns the model path."""
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    ckpt = read_checkpoint_manifest(ckpt_dir)
    dims = export_dims(ckpt, len(ckpt["tasks"]))
    specs = layout(dims, moe=False)
    out.mkdir(parents=True, exist_ok=True)
    vit = backbone_arrays(load_tensors(ckpt_dir, ckpt["backbone"]), dims, str(ckpt_dir))
    write_bytes(out / BACKBONE_FILE, tensor_file_bytes(BACKBONE_FILE, specs, vit))
    _write_graph(out, dims, specs, opset, batch, moe=False)
    return out / MODEL_FILE
