"""``care-export info``: describe a checkpoint or an artifact. Imports only the runtime (and
onnx, to count the graph's nodes), never torch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from runtime.outdir import ARTIFACT, directory_kind

from .log import disk_bytes, mib, say


def checkpoint_info(path: Path) -> dict:
    """The ``info --json`` object of a checkpoint (docs/CLI.md)."""
    from runtime.checkpoint_files import read_checkpoint_manifest

    m = read_checkpoint_manifest(path)
    parts = {
        "backbone": m["backbone"],
        "shared": m["shared"],
        "head": m["head"],
        **{f"task {t}": e for t, e in enumerate(m["tasks"])},
    }
    metrics = m.get("metrics")
    return {
        "kind": "checkpoint",
        "path": str(path),
        "format_version": m["format_version"],
        "backbone": {k: v for k, v in m["backbone"].items() if k not in ("file", "sha256", "bytes")},
        "brmoe": m["brmoe"],
        "tasks": len(m["tasks"]),
        "classes": sum(t["classes"] for t in m["tasks"]),
        "task_classes": [t["classes"] for t in m["tasks"]],
        "preprocessing": m["preprocessing"],
        "bytes": sum(e["bytes"] for e in parts.values()),
        "files": len(parts),
        "metrics": None if not metrics else {k: metrics.get(k) for k in ("a_bar", "a_last", "forgetting")},
        "manifest": m,
    }


def artifact_info(path: Path, verify: bool = False) -> dict:
    """The ``info --json`` object of an artifact (docs/CLI.md); ``check.ok`` is False for a
    damaged one (``verify``: every digest, else sizes and the graph's and state's digests)."""
    import onnx

    from runtime.artifact import Artifact
    from runtime.errors import CareError
    from runtime.layout import MODEL_FILE, Dims
    from runtime.manifest import read_manifest

    m = read_manifest(path)
    try:
        Artifact(path, verify=verify)
        error = None
    except CareError as exc:
        error = str(exc)
    try:
        graph = onnx.load(str(path / MODEL_FILE), load_external_data=False)
        nodes = len(graph.graph.node)
        opset = max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=None)
    except Exception as exc:  # noqa: BLE001 - a damaged graph is reported, not raised
        nodes = opset = None
        error = error or f"{path / MODEL_FILE}: unreadable ({exc})"
    dims, tasks = m["dims"], m["tasks"]
    return {
        "kind": "artifact",
        "path": str(path),
        "format_version": m["format_version"],
        "precision": m["precision"],
        "predict": m.get("predict", "single"),
        "batch": m["batch"],
        "capacity": dims["capacity"],
        "tasks": len(tasks),
        "classes": sum(t["classes"] for t in tasks),
        "class_capacity": Dims.from_dict(dims).class_capacity,
        "backbone": m["backbone"]["name"],
        "dims": dims,
        "brmoe": m["brmoe"],
        "preprocessing": m["preprocessing"],
        "files": {name: {"bytes": e["bytes"], "sha256": "sha256" in e} for name, e in m["files"].items()},
        "bytes": sum(e["bytes"] for e in m["files"].values()),
        "disk_bytes": disk_bytes(path),
        "graph": {"nodes": nodes, "opset": opset},
        "check": {"ok": error is None, "every_digest": verify, "error": error},
        "quantization": m.get("quantization"),
    }


def _size(n: int) -> str:
    return mib(n) if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _print_checkpoint(d: dict) -> None:
    bb, moe, sizes = d["backbone"], d["brmoe"], d["task_classes"]
    say(f"checkpoint   {d['path']} (format {d['format_version']})")
    say(
        f"backbone     {bb['name']} {bb['img_size']}px/{bb['patch_size']}, width {bb['embed_dim']}, "
        f"depth {bb['depth']}, {bb['num_heads']} heads"
    )
    say(f"BR-MoE       M={moe['topk_routers']} K={moe['topk_experts']} r={moe['expert_dim']} r_s={moe['shared_dim']}")
    say(f"tasks        {d['tasks']} ({d['classes']} classes; first {sizes[0]}, later {sorted(set(sizes[1:])) or '-'})")
    say(f"size         {d['bytes'] / 2**20:.1f} MiB in {d['files']} files")
    if d["metrics"]:
        mt = d["metrics"]
        say(f"accuracy     A-bar {mt['a_bar']:.2f}%  A_B {mt['a_last']:.2f}%  forgetting {mt['forgetting']:.2f}")


def _print_artifact(d: dict) -> None:
    dims, moe, pre = d["dims"], d["brmoe"], d["preprocessing"]
    say(
        f"artifact     {d['path']} (format {d['format_version']}), {d['precision'].upper()}, "
        f"{d['predict']} prediction, batch {d['batch']}"
    )
    say(
        f"backbone     {d['backbone']} {dims['img_size']}px/{dims['patch_size']}, width {dims['embed_dim']}, "
        f"depth {dims['depth']}, {dims['num_heads']} heads"
    )
    say(f"BR-MoE       M={moe['topk_routers']} K={moe['topk_experts']} r={moe['expert_dim']} r_s={moe['shared_dim']}")
    say(
        f"tasks        {d['tasks']} active of capacity {d['capacity']}; {d['classes']} classes of "
        f"{d['class_capacity']} (first task {dims['first_classes']}, later at most {dims['slot_classes']})"
    )
    say(f"graph        {d['graph']['nodes']} nodes, opset {d['graph']['opset']}")
    say(
        f"input        {pre['input_size']}px (resize {pre['resize']}, {pre['interpolation']}), mean {pre['mean']}, "
        f"std {pre['std']}"
    )
    say(
        f"size         {mib(d['bytes'])} ({mib(d['disk_bytes'])} on disk): "
        + ", ".join(f"{n} {_size(f['bytes'])}" for n, f in d["files"].items())
    )
    check = d["check"]
    what = "every digest" if check["every_digest"] else "file sizes, graph and state digests (--verify: every digest)"
    say(f"files        {'ok' if check['ok'] else 'DAMAGED'}: {what}" + ("" if check["ok"] else f": {check['error']}"))


@click.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Artifact: hash every file and task slot too (reads it all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (schema in docs/CLI.md).")
def info_command(path, verify, as_json):
    """Describe a checkpoint or an artifact directory; exits 1 for a damaged artifact.

    \b
    Example:
      care-export info ckpt/
      care-export info model/ --verify --json
    """
    from runtime.errors import ArtifactError

    d = artifact_info(path, verify) if directory_kind(path) == ARTIFACT else checkpoint_info(path)
    if as_json:
        click.echo(json.dumps(d, indent=1))
    else:
        (_print_artifact if d["kind"] == "artifact" else _print_checkpoint)(d)
    if d["kind"] == "artifact" and not d["check"]["ok"]:
        raise ArtifactError(d["check"]["error"])
