"""``Session``: run an exported artifact (docs/ARTIFACT.md) and grow it while it runs.

Growth and concurrency. ``add_task(ckpt)`` reads and packs the checkpoint's new tasks outside
any lock (``runtime.growth.plan_growth``, numpy only), then, holding the session's lock
exclusively, writes the new rows into the growth tensors the runner reads (see
``runtime.graph``) and swaps the class list. ``predict`` holds the same lock shared for the
whole call, all chunks included, so every answer is entirely the model before or entirely the
model after a growth, and calls that start after ``add_task`` returns see the new tasks.

Persistence. ``add_task`` works in memory by default: the session never writes into the
artifact it serves, so a read-only artifact on an edge box still grows (until the process
ends). ``add_task(ckpt, persist=True)`` first writes the tasks into the artifact directory with
``runtime.growth.add_tasks``, the crash-safe code path of ``care-export add-task``, so that a
later ``Session`` of that directory starts with them.
"""

from __future__ import annotations

import copy
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact
from .backends import open_runner
from .cache import default_cache_dir
from .errors import ArtifactError, ClosedError, InputError
from .graph import load_graph
from .layout import LOGITS, ROUTING_EXPERTS, ROUTING_TASKS, SCORES, score_output
from .numerics import COS_SCALE
from .preprocess import Preprocessing, to_input
from .routing import canonical_routing


@dataclass
class Prediction:
    """Top-k predictions of a batch, best first, the cosine logits behind them, and the routing
    when asked for.

    ``logits`` (N, learned classes) float32, as :meth:`Session.logits` returns them; ``tasks`` (N, depth, M): the routers (tasks) selected in each block, ascending, -1 where
    fewer than M tasks exist; ``experts`` (N, depth, M, K): the experts each kept, ascending,
    -1 where none. For an iterative-prediction artifact ``logits`` holds its ``scores``
    (``p_single + p_iter``) and ``probs`` their halves.
    """

    classes: np.ndarray  # (N, k) int64 class ids
    names: list[list[str]]  # (N, k) class names
    probs: np.ndarray  # (N, k) float32
    logits: np.ndarray  # (N, learned classes) float32
    tasks: np.ndarray | None = None
    experts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.classes)

    def to_list(self) -> list[dict]:
        """One JSON-ready dict per image."""
        out = []
        for i in range(len(self)):
            item: dict[str, object] = {
                "top": [
                    {"class": int(c), "name": n, "prob": float(p)}
                    for c, n, p in zip(self.classes[i], self.names[i], self.probs[i])
                ]
            }
            if self.tasks is not None and self.experts is not None:
                item["routing"] = {"tasks": self.tasks[i].tolist(), "experts": self.experts[i].tolist()}
            out.append(item)
        return out


class _SharedExclusiveLock:
    """Many holders shared (predict) or one exclusive (growth); a waiting writer goes first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class Session:
    """An artifact loaded for inference.

    ``device``: ``auto`` (a GPU when one is usable, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``. ``backend``: ``auto`` / ``onnxruntime`` (TensorRT EP, then CUDA EP, then CPU
    EP) or ``tensorrt`` (native TensorRT). ``providers``: ONNX Runtime providers by name,
    instead of choosing. ``threads``: CPU threads of ONNX Runtime (default: all cores).
    ``max_batch``: the largest batch one run takes (larger inputs are split; a static-batch
    artifact runs its own batch size). ``cache_dir``: where TensorRT engines and timing caches
    are kept. ``verify``: hash every weight file against the manifest before loading.

    After construction ``backend``, ``providers`` and ``device`` say what was chosen.
    """

    def __init__(
        self,
        artifact: str | os.PathLike,
        device: str = "auto",
        backend: str = "auto",
        threads: int | None = None,
        *,
        providers: list[str] | None = None,
        max_batch: int = 64,
        cache_dir: str | os.PathLike | None = None,
        verify: bool = False,
    ):
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        self._artifact = Artifact(Path(artifact), verify=verify)
        self.preprocessing = Preprocessing.from_dict(self._artifact.manifest["preprocessing"])
        self._graph = load_graph(self._artifact)
        self._runner = open_runner(
            self._graph,
            device=device,
            backend=backend,
            threads=threads,
            providers=providers,
            cache_root=Path(cache_dir or default_cache_dir()) / "trt",
            max_batch=max_batch,
        )
        self.backend: str = self._runner.backend
        self.providers: list[str] = list(self._runner.providers)
        self.device: str = self._runner.device
        self._chunk = self._graph.batch or max_batch
        self._lock = _SharedExclusiveLock()
        self._growing = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ what is loaded
    @property
    def artifact_dir(self) -> Path:
        return self._artifact.dir

    @property
    def manifest(self) -> dict:
        """The manifest of the model this session runs now (in-memory growth included)."""
        return self._artifact.manifest

    @property
    def num_tasks(self) -> int:
        return self._artifact.num_tasks

    @property
    def num_classes(self) -> int:
        return self._artifact.num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self._artifact.manifest["classes"]["names"])

    @property
    def capacity(self) -> int:
        return self._artifact.dims.capacity

    def __repr__(self) -> str:
        return (
            f"Session({str(self.artifact_dir)!r}, backend={self.backend!r}, device={self.device!r}, "
            f"tasks={self.num_tasks}/{self.capacity}, classes={self.num_classes})"
        )

    # ------------------------------------------------------------------ inference
    def _chunks(self, images):
        """The input in preprocessed chunks of at most one run each: uint8 images and files are
        preprocessed a chunk at a time, so memory follows the chunk, not the batch."""
        if isinstance(images, (list, tuple)) and images:
            for start in range(0, len(images), self._chunk):
                yield to_input(list(images[start : start + self._chunk]), self.preprocessing, first=start)
        elif isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and len(images):
            for start in range(0, len(images), self._chunk):
                yield to_input(images[start : start + self._chunk], self.preprocessing)
        else:
            x = to_input(images, self.preprocessing)
            for start in range(0, len(x), self._chunk):
                yield x[start : start + self._chunk]

    def _run(self, images, outputs: list[str]) -> list[np.ndarray]:
        """Run ``images`` in chunks (padding the last one for a static batch); caller holds the lock."""
        if self._closed:
            raise ClosedError("this Session is closed; open a new one")
        parts = []
        for chunk in self._chunks(images):
            n = len(chunk)
            if self._graph.batch and n < self._graph.batch:
                chunk = np.concatenate([chunk, np.zeros((self._graph.batch - n, *chunk.shape[1:]), chunk.dtype)])
            parts.append([o[:n] for o in self._runner.run(chunk, outputs)])
        return [np.concatenate(p) if len(p) > 1 else p[0] for p in zip(*parts)]

    def logits(self, images) -> np.ndarray:
        """Cosine logits (N, learned classes), float32; ``images`` as for :meth:`predict`."""
        if score_output(self._artifact.manifest) == SCORES:
            raise InputError("an iterative-prediction artifact outputs scores, not logits: use predict()")
        with self._lock.shared():
            (logits,) = self._run(images, [LOGITS])
            return logits[:, : self.num_classes]

    def predict(self, images, top_k: int = 1, return_routing: bool = False) -> Prediction:
        """Top-``top_k`` classes of each image.

        ``images``: one image or a batch: uint8 RGB arrays (HWC, or NHWC for a batch), PIL
        images, image file paths, or float32 arrays already preprocessed (CHW or NCHW). Images
        are resized, centre-cropped and normalised as the artifact's manifest says.
        """
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= self.num_classes:
            raise InputError(f"top_k must be between 1 and the {self.num_classes} learned classes, got {top_k}")
        ranked = score_output(self._artifact.manifest)
        outputs = [ranked, ROUTING_TASKS, ROUTING_EXPERTS] if return_routing else [ranked]
        with self._lock.shared():
            results = self._run(images, outputs)
            num_classes, names = self.num_classes, self._artifact.manifest["classes"]["names"]
        logits = results[0][:, :num_classes]
        if ranked == SCORES:  # p_single + p_iter (docs/MODEL.md): their mean is a distribution
            p = logits.astype(np.float64) / 2
        else:
            z = COS_SCALE * logits.astype(np.float64)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
        top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
        pred = Prediction(
            top.astype(np.int64),
            [[names[c] for c in row] for row in top],
            np.take_along_axis(p, top, 1).astype(np.float32),
            logits,
        )
        if return_routing:
            pred.tasks, pred.experts = canonical_routing(results[1], results[2])
        return pred

    # ------------------------------------------------------------------ growth
    def add_task(self, checkpoint: str | os.PathLike, persist: bool = False) -> list[int]:
        """Take the tasks that ``checkpoint`` has beyond this session's model; return their ids.

        The checkpoint must be the one the artifact was exported from, grown by later tasks
        (same backbone, settings and older tasks). Raises CapacityError when the artifact has no
        slot left and MismatchError for a checkpoint of another model; the session is unchanged
        then. ``persist``: also write the tasks into the artifact directory (module doc).
        """
        from .growth import add_tasks, plan_growth

        with self._growing:
            if self._closed:
                raise ClosedError("this Session is closed; open a new one")
            growth = plan_growth(self._artifact, Path(checkpoint))
            if growth is None:
                return []
            if persist:
                try:
                    add_tasks(self._artifact.dir, Path(checkpoint))
                except OSError as exc:
                    raise ArtifactError(f"cannot write the new tasks into {self._artifact.dir}: {exc}") from None
            g = self._graph
            regions = [(p.name, p.row, len(p.data)) for p in growth.patches]
            regions += [(name, 0, value.shape[0] if value.ndim else 1) for name, value in growth.state.items()]
            grown = copy.copy(self._artifact)
            grown.manifest = growth.manifest
            with self._lock.exclusive():
                for p in growth.patches:
                    g.weights[p.name][p.row : p.row + len(p.data)] = p.data
                for name, value in growth.state.items():
                    g.weights[name][...] = value
                self._runner.write_weights(regions)
                self._artifact = grown
            return growth.tasks

    def close(self) -> None:
        """Free the backend's memory (device buffers, sessions) now rather than at exit."""
        with self._lock.exclusive():
            if not self._closed:
                self._runner.close()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
