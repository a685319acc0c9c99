"""``quantize_artifact``: an FP32 artifact -> an FP16 or INT8 artifact of the same format, with a report.

The source is only read. The result is written under a temporary name beside ``out``, measured
against the source there (``calibration.report``), and renamed into place with its
``calibration_report.json``; a failure leaves nothing at ``out``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from runtime.artifact import Artifact
from runtime.errors import ArtifactError, InputError
from runtime.layout import INPUT
from runtime.outdir import ARTIFACT, check_output
from runtime.preprocess import Preprocessing

from . import calib_data
from .artifact_out import write_artifact
from .graph import load_artifact_model
from .int8 import METHODS
from .margins import EPSILON, Reference
from .report import REPORT_FILE, compare

PRECISIONS = ("fp16", "int8")
ROUTING_MODES = ("fp32", "reduced")
ROUNDINGS = ("gptq", "nearest")
# Routing flips per block allowed on the calibration images: half the 1 % wanted on held-out
# images, as a few hundred calibration images measure 1 % only to about +-0.5 %.
FALLBACK_TARGET = 0.005


@dataclass
class Images:
    """Labelled images to calibrate with or to evaluate on; ``describe`` names where they came from."""

    items: list
    labels: np.ndarray
    tasks_covered: int
    describe: str


def source_digest(art: Artifact) -> str:
    """Names an artifact's content: the digest of its manifest (which holds its files' digests)."""
    return hashlib.sha256(json.dumps(art.manifest, sort_keys=True).encode()).hexdigest()


def check_quantize_output(src: Artifact, out: Path, precision: str, force: bool) -> None:
    """Refuse an output that is, holds or lies in the source, or that --force may not replace."""
    if Path(out).resolve() == src.dir.resolve():
        raise ArtifactError(f"{out} is the source artifact; write the {precision.upper()} artifact elsewhere")
    check_output(out, ARTIFACT, force, inputs=[src.dir])


def open_source_artifact(artifact_dir: str | Path) -> Artifact:
    art = Artifact(artifact_dir, verify=True)  # never build on a corrupt artifact
    if art.manifest["precision"] != "fp32":
        raise ArtifactError(
            f"{art.dir} is already quantized ({art.manifest['precision'].upper()}); quantize the "
            f"FP32 artifact it came from"
        )
    if art.manifest.get("predict") == "iterative":
        raise ArtifactError(f"{art.dir} is an iterative-prediction artifact; quantize a single-pass export")
    return art


def draw_images(
    art: Artifact,
    calib_pool: calib_data.Pool,
    eval_pool: calib_data.Pool,
    per_task: int,
    eval_samples: int,
    seed: int,
    calib_name: str,
    eval_name: str,
) -> tuple[Images, Images]:
    """Calibration images (``per_task`` per learned task) and held-out evaluation images
    (``eval_samples`` in all, spread over the tasks), never the same image twice."""
    tasks = calib_data.task_classes(art.manifest)
    items, labels, covered, chosen = calib_data.sample(calib_pool, tasks, per_task, seed)
    if not items:
        raise InputError(f"{calib_name}: no calibration images of the artifact's classes")
    skip = chosen if eval_pool is calib_pool else None
    per_eval = -(-eval_samples // len(tasks))
    e_items, e_labels, e_covered, _ = calib_data.sample(eval_pool, tasks, per_eval, seed + 1, skip)
    if not e_items:
        raise InputError(f"{eval_name}: no held-out images left for the report (calibration used them all)")
    return (
        Images(items, labels, covered, calib_name),
        Images(e_items[:eval_samples], e_labels[:eval_samples], e_covered, eval_name),
    )


def quantize_artifact(
    src_dir: str | Path | Artifact,
    out: str | Path,
    precision: str,
    calib: Images,
    held_out: Images,
    *,
    routing: str = "fp32",
    method: str = "percentile",
    seed: int = 0,
    force: bool = False,
    fallback_target: float | None = FALLBACK_TARGET,
    rounding: str = "gptq",
    fallback_eps: float | None = EPSILON,
    flip_eps: float = EPSILON,
    chunk: int = calib_data.CHUNK,
    tradeoff: bool = False,
    progress: Callable[[int], None] | None = None,
    latency_runs: int = 7,
    threads: int | None = None,
) -> tuple[dict, dict]:
    """Write the ``precision`` rewrite of the FP32 artifact ``src_dir`` (a directory, or an artifact that
    :func:`open_source_artifact` opened) to ``out``.

    ``calib``: images the INT8 activation ranges are taken from (FP16 needs none). ``held_out``:
    labelled images for the report. ``progress(n)``: called as calibration images are used.
    ``fallback_target``: INT8 layers fall back to weight-only until the calibration images' routing
    flips per block are at most this, or no more than the int8 weights alone flip (``None``: no
    fallback). ``fallback_eps``: the fallback counts flips margin-aware beyond this deciding gap
    (``calibration.margins``; ``None``: every flip; by default flips between near ties, which
    change little, do not count, so fewer layers lose their int8 speed: docs/CALIBRATION.md).
    ``flip_eps``: the report's margin-aware flips.
    ``tradeoff``: the fallback record (and the report) also hold its trade-off curve.
    ``chunk``: images held at once (calibration memory does not grow with their number).
    ``rounding``: ``gptq`` (error-compensated, ``calibration.gptq``) or ``nearest``.
    ``threads``: intra-op threads of every ONNX Runtime session it opens (``None``: ORT's default).
    Returns ``(manifest, report)``.
    """
    from .routing_nodes import routing_nodes

    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}: choose one of {', '.join(METHODS)}")
    if rounding not in ROUNDINGS:
        raise InputError(f"unknown rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
    if routing not in ROUTING_MODES:
        raise InputError(f"unknown routing mode {routing!r}: choose one of {', '.join(ROUTING_MODES)}")
    # A caller that opened (and so verified) the source already passes it: hash it once.
    src = src_dir if isinstance(src_dir, Artifact) else open_source_artifact(src_dir)
    out = Path(out)
    check_quantize_output(src, out, precision, force)
    pre = Preprocessing.from_dict(src.manifest["preprocessing"])
    eval_images = calib_data.Chunks(held_out.items, pre, chunk)

    model = load_artifact_model(src)
    reference = Reference(model, eval_images, threads)  # the FP32 graph on the held-out images, before any rewrite
    keep = routing_nodes(model) if routing == "fp32" else set()
    info = {
        "routing": routing,
        "routing_nodes": len(keep),
        "source_artifact_digest": source_digest(src),
        "onnxruntime": _ort_version(),
        "seed": seed,
        "evaluation": {"data": held_out.describe, "samples": int(len(held_out.labels))},
    }
    growth_values = None
    if precision == "fp16":
        from .fp16 import fp16_growth_values, to_fp16

        model = to_fp16(model, keep, reduced=routing == "reduced")
        growth_values = fp16_growth_values(model, src)
        info.update(method=None, calibration=None)
    else:
        from .fallback import Evaluator, only_targets_read_qdq, sensitivity_fallback
        from .gptq import gptq_qdq_weights, input_moments, output_axis, weight_readers
        from .int8 import QUANTIZED_OPS, quantize_qdq, routing_fp16, store_growth_int8, stored_kind, weight_nodes

        growth = {name for name, s in src.tensors.items() if s.role != "backbone"}
        backbone = weight_nodes(model, growth) - keep
        targets = set(backbone)
        if routing == "reduced":  # the routing path's products too, but for those reading float growth tensors
            path = routing_nodes(model)
            targets |= {
                n.name
                for n in model.graph.node
                if n.op_type in QUANTIZED_OPS and n.name in path and not growth & set(n.input)
            }
        calib_images = calib_data.Chunks(calib.items, pre, chunk)
        fp16 = routing_fp16(growth) if routing == "fp32" else set()
        moments = {}
        if rounding == "gptq":
            weights = {n.input[1] for n in model.graph.node if n.name in targets} | {
                g for g in growth - fp16 if stored_kind(g) == (1,)
            }
            readers = {
                w: n for w, n in weight_readers(model, weights).items() if w not in growth or output_axis(n) == 0
            }
            moments = input_moments(model, readers, calib_images, INPUT, threads)
        floats = {
            t.name: onnx.numpy_helper.to_array(t)
            for t in model.graph.initializer
            if t.name in moments and t.name not in growth
        }
        # The fallback compares with the FP32 graph: measure it before the rewrite changes it in place.
        evaluator = (
            Evaluator(calib_images, model, threads, eps=fallback_eps, timed=tradeoff)
            if fallback_target is not None
            else None
        )
        store_growth_int8(model, growth, fp16, moments)
        model = quantize_qdq(model, calib_images, targets, method, INPUT, progress, threads)
        gptq_qdq_weights(model, floats, moments)
        model = only_targets_read_qdq(model, targets)
        if evaluator is not None:
            model, info["fallback"] = sensitivity_fallback(model, backbone, evaluator, fallback_target, curve=tradeoff)
        info.update(
            rounding=rounding,
            float16_routing_weights=sorted(fp16),
            method=method,
            calibration={
                "data": calib.describe,
                "samples": int(len(calib.labels)),
                "per_task": int(np.bincount(_task_of(src, calib.labels)).max()),
                "tasks_covered": calib.tasks_covered,
                "tasks": src.num_tasks,
                "chunk": chunk,
            },
        )
    report: dict = {}

    def measure(tmp: Path) -> None:
        report.update(
            compare(
                src.dir,
                tmp,
                reference,
                eval_images,
                held_out.labels,
                latency_runs=latency_runs,
                eps=flip_eps,
                threads=threads,
            )
        )
        report.update(precision=precision, routing=routing, method=info["method"], source=str(src.dir))
        if info.get("fallback") is not None:  # layers kept at weight-only int8 (float activations)
            report["weight_only"] = info["fallback"]["weight_only"]
            if "curve" in info["fallback"]:
                report["tradeoff"] = info["fallback"]["curve"]
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")

    manifest = write_artifact(model, src, out, precision, info, growth_values, force=force, finish=measure)
    return manifest, report


def _task_of(art: Artifact, labels: np.ndarray) -> np.ndarray:
    bounds = np.cumsum([t["classes"] for t in art.manifest["tasks"]])
    return np.searchsorted(bounds, labels, side="right")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
