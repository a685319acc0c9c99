"""ONNX Runtime: the CPU, CUDA and TensorRT execution providers.

The growth tensors (see ``runtime.graph``) are OrtValues made once: on the CPU they wrap the
host arrays (no copy; a write to the array is what the next run sees), on a GPU they live in
device memory and each run binds them with IOBinding, together with the input copied to the
device and outputs allocated there: no per-call host copy of any weight.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import BackendError
from .gpu import gpu_names

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
SHORT_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TRT}


def _ort():
    import onnxruntime

    return onnxruntime


def session_options(threads: int | None = None, quiet: bool = False):
    """The ONNX Runtime session options every session of an artifact gets: all graph optimisations,
    ``threads`` intra-op threads (``None``: ORT's default), warnings off when ``quiet``."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT fuses DequantizeLinear(int8 weight) -> MatMul into MatMulNBits, by default at accuracy
    # level 4: the activation is then quantized to int8 on the fly. A weight-only int8 layer
    # must compute in float32 as its graph says; the int8 activations flip routing choices.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads:
        opts.intra_op_num_threads = int(threads)
    if quiet:
        opts.log_severity_level = 3
    return opts


def tensorrt_version() -> str | None:
    """The version of the ``tensorrt`` package (whose libraries the TensorRT EP loads), or None."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def provider_candidates(kind: str, explicit: list[str] | None) -> list[list[str]]:
    """Provider lists to try in order for a device kind (``auto``, ``cpu``, ``cuda``).

    ``explicit``: short or full provider names the user asked for; then that one list only.
    """
    available = _ort().get_available_providers()
    if explicit:
        wanted = []
        for name in explicit:
            full = SHORT_NAMES.get(name.lower(), name)
            if full not in available:
                raise BackendError(f"ONNX Runtime here has no {full} (it has {', '.join(available)})")
            wanted.append(full)
        if kind == "cpu" and wanted != [CPU]:
            raise BackendError(f"device cpu cannot use {', '.join(p for p in wanted if p != CPU)}")
        if kind == "cuda" and wanted[0] == CPU:
            raise BackendError("device cuda asked for, but the first provider named is the CPU's")
        return [wanted]
    gpu = []
    if kind != "cpu" and gpu_names():
        if TRT in available and CUDA in available and tensorrt_version():
            gpu.append([TRT, CUDA, CPU])
        if CUDA in available:
            gpu.append([CUDA, CPU])
    if kind == "cuda" and not gpu:
        why = "no CUDA GPU is visible" if not gpu_names() else f"ONNX Runtime here has only {', '.join(available)}"
        raise BackendError(f"device cuda asked for, but {why} (install onnxruntime-gpu on a machine with a GPU)")
    return gpu + ([[CPU]] if kind != "cuda" else [])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def trt_cache_dir(root: Path, digest: str, device_index: int) -> Path:
    """Engine and timing caches of one graph on one GPU model with one TensorRT version."""
    names = gpu_names()
    gpu = names[device_index] if device_index < len(names) else f"gpu{device_index}"
    return Path(root) / f"{digest[:16]}-{_slug(gpu)}-trt{_slug(tensorrt_version() or 'unknown')}"


class OrtRunner:
    """One ``onnxruntime.InferenceSession`` over a :class:`~runtime.graph.Graph`."""

    backend = "onnxruntime"

    def __init__(
        self,
        graph,
        providers: list[str],
        *,
        device_index: int = 0,
        threads: int | None = None,
        cache_root: Path | None = None,
        max_batch: int = 64,
    ):
        ort = _ort()
        self.graph = graph
        self.device_index = device_index
        opts = session_options(threads)
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.directory))
        self.cache_dir = None
        options = []
        for p in providers:
            if p == TRT:
                if cache_root is None:
                    raise BackendError("the TensorRT execution provider needs a cache directory (cache_root)")
                self.cache_dir = trt_cache_dir(cache_root, graph.digest, device_index)
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                options.append(self._trt_options(max_batch))
            elif p == CUDA:
                # FP32 means FP32: TF32 matmuls (the EP's default) can flip a routing choice.
                options.append({"device_id": device_index, "use_tf32": 0})
            else:
                options.append({})
        if providers[0] != CPU and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels, when that is where they are
        try:
            self.sess = ort.InferenceSession(
                graph.model, sess_options=opts, providers=providers, provider_options=options, enable_fallback=0
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BackendError(
                f"ONNX Runtime cannot load the graph with {providers[0]}: {str(exc).strip().splitlines()[0]}"
            ) from None
        self.providers = self.sess.get_providers()
        if self.providers[0] != providers[0]:
            raise BackendError(
                f"{providers[0]} did not start (ONNX Runtime runs {', '.join(self.providers)}); "
                f"check the CUDA, cuDNN and TensorRT libraries"
            )
        self.on_gpu = self.providers[0] != CPU
        self.device = f"cuda:{device_index}" if self.on_gpu else "cpu"
        self._weights = {name: self._ortvalue(v) for name, v in graph.weights.items()}

    def _trt_options(self, max_batch: int) -> dict:
        g = self.graph
        cache = str(self.cache_dir)
        options = {
            "device_id": self.device_index,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
        }
        if g.batch is None:  # one profile over the batch; the growth tensors have static shapes
            shape = f"x3x{g.input_size}x{g.input_size}"
            options.update(
                trt_profile_min_shapes=f"{g.input}:1{shape}",
                trt_profile_opt_shapes=f"{g.input}:{max_batch}{shape}",
                trt_profile_max_shapes=f"{g.input}:{max_batch}{shape}",
            )
        return options

    def _ortvalue(self, array: np.ndarray):
        ort = _ort()
        if self.on_gpu:
            return ort.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_index)
        return ort.OrtValue.ortvalue_from_numpy(array)  # wraps the array: no copy

    def run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """Run one batch; ``x`` float32 NCHW on the host. Thread-safe."""
        if not self.on_gpu:
            feed = dict(self._weights)
            feed[self.graph.input] = _ort().OrtValue.ortvalue_from_numpy(x)
            return [v.numpy() for v in self.sess.run_with_ort_values(outputs, feed)]
        io = self.sess.io_binding()
        x_device = self._ortvalue(x)  # one host-to-device copy of the batch, alive until the run ends
        io.bind_ortvalue_input(self.graph.input, x_device)
        for name, value in self._weights.items():
            io.bind_ortvalue_input(name, value)
        for name in outputs:
            io.bind_output(name, "cuda", self.device_index)
        self.sess.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()

    def write_weights(self, regions: list[tuple[str, int, int]]) -> None:
        """Make runs see the graph's growth tensors as they now are; ``regions`` name what changed
        (tensor, first row, rows). The session keeps every run off meanwhile."""
        if not self.on_gpu:
            return  # the OrtValues wrap the host arrays themselves
        for name in dict.fromkeys(name for name, _, _ in regions):
            self._weights[name].update_inplace(self.graph.weights[name])

    def close(self) -> None:
        self._weights.clear()
        self.sess = None
