"""Runners: one per way of executing the graph, behind one small interface.

A runner is built from a :class:`~runtime.graph.Graph` and has ``backend``, ``providers``,
``device``, ``run(x, outputs) -> list[np.ndarray]`` (thread-safe), ``write_weights(regions)``
(push changed rows of the growth tensors; the session keeps runs off meanwhile) and ``close()``.
``onnxrt`` holds ONNX Runtime (CPU, CUDA EP, TensorRT EP), ``tensorrt`` native TensorRT; each is
imported only when :func:`open_runner` picks it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import BackendError
from .gpu import gpu_names, parse_device

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def _warm_up(runner, graph) -> None:
    """One run of a blank batch: GPU providers build or load their engines here, not in predict."""
    batch = graph.batch or 1
    try:
        runner.run(np.zeros((batch, 3, graph.input_size, graph.input_size), np.float32), graph.outputs[:1])
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - each backend raises its own types
        raise BackendError(f"{runner.providers[0]} failed its first run: {str(exc).strip().splitlines()[0]}") from None


def open_runner(
    graph,
    *,
    device: str = "auto",
    backend: str = "auto",
    threads: int | None = None,
    providers: list[str] | None = None,
    cache_root: Path,
    max_batch: int = 64,
):
    """The runner for ``device`` and ``backend``.

    ``backend="auto"`` and ``"onnxruntime"`` use ONNX Runtime with the best provider for the
    device: TensorRT EP, then CUDA EP, then (device ``auto`` only) CPU. ``"tensorrt"`` is native
    TensorRT. ``providers`` names ONNX Runtime providers explicitly (``tensorrt``, ``cuda``,
    ``cpu`` or full names). Whatever is asked for explicitly and is not available raises
    :class:`BackendError`; only ``auto`` moves on to the next choice.
    """
    kind, index = parse_device(device)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        if providers:
            raise BackendError("providers choose ONNX Runtime execution providers; backend tensorrt has none")
        if kind == "cpu":
            raise BackendError("backend tensorrt runs on a CUDA GPU, not on device cpu")
        if not gpu_names():
            raise BackendError("backend tensorrt needs a CUDA GPU, and none is visible")
        from .tensorrt import TensorRTRunner

        trt = TensorRTRunner(graph, device_index=index, cache_root=cache_root, max_batch=max_batch)
        _warm_up(trt, graph)
        return trt

    from .onnxrt import CPU, OrtRunner, provider_candidates

    candidates = provider_candidates(kind, providers)
    for i, chosen in enumerate(candidates):
        last = providers or i == len(candidates) - 1
        try:
            runner = OrtRunner(
                graph, chosen, device_index=index, threads=threads, cache_root=cache_root, max_batch=max_batch
            )
            if runner.on_gpu:
                _warm_up(runner, graph)
            return runner
        except BackendError as exc:
            if last:
                raise
            if candidates[i + 1][0] == CPU:
                warnings.warn(f"{exc}; running on the CPU instead", RuntimeWarning, stacklevel=3)
