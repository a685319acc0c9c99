"""Native TensorRT: an engine built from the graph, cached on disk, run from device buffers.

``tensorrt`` and ``cuda-python`` (``cuda.bindings``) are imported when this backend is asked
for, never before. The engine has one optimisation profile over the batch; the growth tensors
are engine inputs in device buffers bound once, so growth never rebuilds or refits the engine.
The engine and the builder's timing cache live in a directory named by the graph digest, the
GPU and the TensorRT version (``onnxrt.trt_cache_dir``); an engine that no longer deserialises
(a driver or TensorRT change) is rebuilt.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..atomic import write_atomic
from ..errors import BackendError
from .onnxrt import trt_cache_dir


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise BackendError("backend tensorrt needs the tensorrt package (pip install tensorrt-cu13)") from None
    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendError("backend tensorrt needs cuda-python (pip install cuda-python)") from None
    return cudart


class Cuda:
    """The few CUDA runtime calls this backend makes, with errors as :class:`BackendError`."""

    def __init__(self, device_index: int):
        self.rt = _cudart()
        self.device_index = device_index
        self.activate()
        self.stream = self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def activate(self) -> None:
        """Make the device current in the calling thread (CUDA's current device is per thread)."""
        self.check(self.rt.cudaSetDevice(self.device_index), "cudaSetDevice")

    def check(self, result, what: str):
        err, *rest = result
        if int(err) != 0:
            msg = self.rt.cudaGetErrorString(err)[1].decode()
            raise BackendError(f"CUDA {what} failed: {msg}")
        return rest[0] if len(rest) == 1 else None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def upload(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream), "upload")

    def download(self, out: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, kind, self.stream), "download")

    def synchronize(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)


class TensorRTRunner:
    """One engine and one execution context; runs are serialised (one CUDA stream)."""

    backend = "tensorrt"

    def __init__(self, graph, *, device_index: int = 0, cache_root: Path, max_batch: int = 64):
        trt = _trt()
        self.trt = trt
        self.graph = graph
        self.cuda = Cuda(device_index)
        self.device = f"cuda:{device_index}"
        self.providers = [f"TensorRT {trt.__version__}"]
        self.cache_dir = trt_cache_dir(cache_root, graph.digest, device_index)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.max_batch = graph.batch or max_batch
        lo = graph.batch or 1
        engine_path = self.cache_dir / f"engine-b{lo}-{self.max_batch}.plan"
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes()) if engine_path.is_file() else None
        if engine is None:
            engine = self.runtime.deserialize_cuda_engine(self._build(engine_path))
        if engine is None:
            raise BackendError("TensorRT could not deserialise the engine it built")
        self.engine = engine
        self.context = engine.create_execution_context()
        self._lock = threading.Lock()
        self._ptrs: dict[str, int] = {}
        for name, value in graph.weights.items():
            self._ptrs[name] = self.cuda.malloc(value.nbytes)
            self.cuda.upload(self._ptrs[name], value)
            self.context.set_tensor_address(name, self._ptrs[name])
        size = graph.input_size
        self.context.set_input_shape(graph.input, (self.max_batch, 3, size, size))
        self._ptrs[graph.input] = self.cuda.malloc(self.max_batch * 3 * size * size * 4)
        self.context.set_tensor_address(graph.input, self._ptrs[graph.input])
        for name in graph.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            self._ptrs[name] = self.cuda.malloc(int(np.prod(shape)) * dtype.itemsize)
            self.context.set_tensor_address(name, self._ptrs[name])
        self.cuda.synchronize()

    def _build(self, engine_path: Path) -> bytes:
        trt, g = self.trt, self.graph
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(g.model, str(g.model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse the graph: {errors}")
        config = builder.create_builder_config()
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # FP32 means FP32: TF32 can flip a routing choice
        if g.batch is None:  # one profile over the batch; every other input has a static shape
            profile = builder.create_optimization_profile()
            shape = (3, g.input_size, g.input_size)
            profile.set_shape(g.input, (1, *shape), (self.max_batch, *shape), (self.max_batch, *shape))
            config.add_optimization_profile(profile)
        timing_path = self.cache_dir / "timing.cache"
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=True)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError("TensorRT could not build an engine from the graph (see its log above)")
        plan = bytes(plan)
        write_atomic(engine_path, plan)
        write_atomic(timing_path, bytes(config.get_timing_cache().serialize()))
        return plan

    def run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """Run one batch (at most the profile's maximum); ``x`` float32 NCHW on the host."""
        g = self.graph
        with self._lock:
            self.cuda.activate()
            self.context.set_input_shape(g.input, x.shape)
            self.cuda.upload(self._ptrs[g.input], x)
            if not self.context.execute_async_v3(int(self.cuda.stream)):
                raise BackendError("TensorRT failed to run the engine")
            results = []
            for name in outputs:
                dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
                out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype)
                self.cuda.download(out, self._ptrs[name])
                results.append(out)
            self.cuda.synchronize()
        return results

    def write_weights(self, regions: list[tuple[str, int, int]]) -> None:
        """Copy the changed rows (tensor, first row, rows) of the growth tensors to the device."""
        with self._lock:
            self.cuda.activate()
            for name, row, rows in regions:
                offset, values = self.graph.rows(name, row, rows)
                self.cuda.upload(self._ptrs[name] + offset, values)
            self.cuda.synchronize()

    def close(self) -> None:
        for ptr in self._ptrs.values():
            self.cuda.free(ptr)
        self._ptrs.clear()
        self.context = self.engine = None
