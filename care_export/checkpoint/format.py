"""The growing checkpoint directory.

::

    ckpt/
      manifest.json              format version, configs, classes, file digests
      backbone.safetensors       frozen ViT (timm key names)
      task-0000.safetensors      expert, router and perceptor of task 0 in every block
      task-0001.safetensors      ...
      shared-<digest>.safetensors  shared expert of every block (retrained each task)
      head-<digest>.safetensors    cosine head, one block per task (realigned each task)

Task files are written once and never touched again. The shared expert and the head change with
every task, so their files are named by content: a save writes new ones, replaces the manifest
atomically, and only then removes the files the old manifest named. A crash at any point leaves a
directory whose manifest names a complete, consistent set of files.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from runtime.atomic import replacing, write_json_atomic
from runtime.checkpoint_files import CHECKPOINT_FORMAT as FORMAT
from runtime.checkpoint_files import CHECKPOINT_FORMAT_VERSION as FORMAT_VERSION
from runtime.checkpoint_files import check_file, check_state, read_checkpoint_manifest, sha256_file
from runtime.checkpoint_files import checkpoint_digest as _manifest_digest
from runtime.errors import CheckpointError
from runtime.preprocess import Preprocessing

from ..model.config import BackboneConfig, MoEConfig

MANIFEST = "manifest.json"


# ---------------------------------------------------------------------- files
def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """Write a safetensors file atomically; return its manifest entry."""
    with replacing(path, follow_umask=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _content_named(tensors: dict[str, torch.Tensor], directory: Path, stem: str) -> dict:
    tmp = directory / f".{stem}.tmp-{os.getpid()}.safetensors"
    entry = _save_tensors(tensors, tmp)
    final = directory / f"{stem}-{entry['sha256'][:16]}.safetensors"
    os.replace(tmp, final)
    return dict(entry, file=final.name)


# ---------------------------------------------------------------------- state split
def backbone_state(model) -> dict[str, torch.Tensor]:
    return dict(model.vit.state_dict())


def task_state(model, task: int) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in model.task_parameters(task).items()}


def shared_state(model) -> dict[str, torch.Tensor]:
    return {f"blocks.{i}.shared.{k}": v for i, m in enumerate(model.moe) for k, v in m.shared.state_dict().items()}


def head_state(model) -> dict[str, torch.Tensor]:
    return {f"head.{t}": w.detach() for t, w in enumerate(model.head.blocks)}


# ---------------------------------------------------------------------- manifest
def configs_from_manifest(manifest: dict) -> tuple[BackboneConfig, MoEConfig, Preprocessing]:
    bb = {k: v for k, v in manifest["backbone"].items() if k not in ("file", "sha256", "bytes")}
    return BackboneConfig(**bb), MoEConfig(**manifest["brmoe"]), Preprocessing.from_dict(manifest["preprocessing"])


def _read_tensors(path: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    check_state(tensors, expected, str(path))
    return tensors


# ---------------------------------------------------------------------- save / load
def save_checkpoint(
    model,
    directory: str | Path,
    *,
    class_names: list[str] | None = None,
    preprocessing: Preprocessing | None = None,
    extra: dict | None = None,
) -> dict:
    """Write ``model`` into ``directory``, adding the task files it lacks.

    Existing task files are kept byte for byte: a learned task's parts are frozen. Returns the new manifest. ``extra`` entries (task sequence, training settings,
    metrics) are stored in the manifest as given; keys of an existing manifest not named here
    are kept.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    old = read_checkpoint_manifest(directory) if (directory / MANIFEST).exists() else None
    if old is not None:
        if len(old["tasks"]) > model.num_tasks:
            raise CheckpointError(f"{directory}: holds {len(old['tasks'])} tasks, the model only {model.num_tasks}")
        if old["tasks"] and [t["classes"] for t in old["tasks"]] != model.task_classes[: len(old["tasks"])]:
            raise CheckpointError(f"{directory}: its tasks' class counts differ from the model's")
    names = list(class_names) if class_names is not None else (old["classes"]["names"] if old else [])
    if class_names is None:  # classes without a name yet are called by their id
        names += [f"class_{i}" for i in range(len(names), model.num_classes)]
    if len(names) != model.num_classes:
        raise CheckpointError(f"{len(names)} class names for {model.num_classes} classes")
    if preprocessing is None:
        preprocessing = (
            Preprocessing.from_dict(old["preprocessing"])
            if old
            else Preprocessing.for_input(model.backbone_cfg.img_size)
        )

    bpath = directory / "backbone.safetensors"
    if old is not None and old["backbone"].get("file") == bpath.name and bpath.is_file():
        bentry = {k: old["backbone"][k] for k in ("file", "sha256", "bytes")}
    else:
        bentry = _save_tensors(backbone_state(model), bpath)

    tasks = list(old["tasks"]) if old else []
    for t in range(len(tasks), model.num_tasks):
        entry = _save_tensors(task_state(model, t), directory / f"task-{t:04d}.safetensors")
        tasks.append(dict(entry, classes=model.task_classes[t]))

    manifest = dict(old or {})
    manifest.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        backbone=dict(asdict(model.backbone_cfg), **bentry),
        brmoe=asdict(model.moe_cfg),
        tasks=tasks,
        shared=_content_named(shared_state(model), directory, "shared"),
        head=_content_named(head_state(model), directory, "head"),
        classes={"names": names},
        preprocessing=preprocessing.to_dict(),
    )
    manifest.update(extra or {})
    write_json_atomic(directory / MANIFEST, manifest)
    _remove_unreferenced(directory, manifest)
    return manifest


def _remove_unreferenced(directory: Path, manifest: dict) -> None:
    keep = {manifest["shared"]["file"], manifest["head"]["file"]}
    for p in list(directory.glob("shared-*.safetensors")) + list(directory.glob("head-*.safetensors")):
        if p.name not in keep:
            p.unlink()


def load_checkpoint(directory: str | Path, *, verify: bool = True, tasks: int | None = None):
    """Build the model stored in ``directory`` (eval mode). Returns ``(model, manifest)``.

    ``verify`` checks every file's sha256 against the manifest; ``tasks`` loads only the first
    ``tasks`` tasks (the head and shared expert of the full checkpoint are used).
    """
    from ..model.care_vit import empty_model

    directory = Path(directory)
    manifest = read_checkpoint_manifest(directory)
    backbone_cfg, moe_cfg, _ = configs_from_manifest(manifest)
    entries = manifest["tasks"] if tasks is None else manifest["tasks"][:tasks]
    if not entries:
        raise CheckpointError(f"{directory}: checkpoint has no task")

    model = empty_model(backbone_cfg, moe_cfg, [int(e["classes"]) for e in entries])

    def expect(state: dict) -> dict[str, torch.Size]:
        return {k: v.shape for k, v in state.items()}

    vit_state = _read_tensors(check_file(directory, manifest["backbone"], verify), expect(backbone_state(model)))
    model.vit.load_state_dict(vit_state)
    for t, e in enumerate(entries):
        params = model.task_parameters(t)
        loaded = _read_tensors(check_file(directory, e, verify), {k: p.shape for k, p in params.items()})
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(loaded[k])
    shared = _read_tensors(check_file(directory, manifest["shared"], verify), expect(shared_state(model)))
    for i, m in enumerate(model.moe):
        prefix = f"blocks.{i}.shared."
        m.shared.load_state_dict({k[len(prefix) :]: v for k, v in shared.items() if k.startswith(prefix)})
    head_path = check_file(directory, manifest["head"], verify)
    full = [int(t["classes"]) for t in manifest["tasks"]]
    head = _read_tensors(head_path, {f"head.{t}": torch.Size([c, backbone_cfg.embed_dim]) for t, c in enumerate(full)})
    with torch.no_grad():
        for t, w in enumerate(model.head.blocks):
            w.copy_(head[f"head.{t}"])
    model.requires_grad_(False)
    return model.eval(), manifest


def checkpoint_digest(directory: str | Path) -> str:
    """A digest naming the checkpoint's content (the manifest's file digests)."""
    return _manifest_digest(read_checkpoint_manifest(directory))
