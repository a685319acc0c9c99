"""Session on a GPU: ONNX Runtime's CUDA EP (IOBinding) and TensorRT EP, and native TensorRT.

Each test is marked and skips cleanly where its provider, package or GPU is absent. Parity
against the PyTorch model (run on the CPU), growth without an engine rebuild, concurrent
predicts during growth, and the engine cache.
"""

import threading
import time

import numpy as np
import pytest
from helpers import ATOL, SESSION_GROWN, assert_equals_reference

from runtime import Session
from runtime.backends.gpu import gpu_names


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _ort_has(provider: str) -> bool:
    import onnxruntime

    return provider in onnxruntime.get_available_providers()


HAS_GPU = bool(gpu_names())
HAS_CUDA_EP = HAS_GPU and _ort_has("CUDAExecutionProvider")
HAS_TRT = HAS_GPU and _importable("tensorrt")
HAS_TRT_EP = HAS_CUDA_EP and HAS_TRT and _ort_has("TensorrtExecutionProvider")
HAS_NATIVE_TRT = HAS_TRT and (_importable("cuda.bindings.runtime") or _importable("cuda.cudart"))

needs_cuda_ep = pytest.mark.skipif(not HAS_CUDA_EP, reason="needs a CUDA GPU and onnxruntime-gpu")
needs_trt_ep = pytest.mark.skipif(not HAS_TRT_EP, reason="needs a CUDA GPU, onnxruntime-gpu and tensorrt")
needs_native_trt = pytest.mark.skipif(not HAS_NATIVE_TRT, reason="needs a CUDA GPU, tensorrt and cuda-python")

# TensorRT chooses its own kernels and fusions; routing and top-1 must still agree exactly.
TRT_ATOL = 1e-3


def parity_and_growth(session: Session, built, atol: float) -> None:  # noqa: F811
    assert_equals_reference(session, built["x"], built["before"], atol)
    assert session.add_task(built["grown"]) == [4, 5] and session.num_tasks == SESSION_GROWN
    assert_equals_reference(session, built["x"], built["after"], atol)


@pytest.mark.gpu
@pytest.mark.cuda_ep
@needs_cuda_ep
def test_cuda_ep_parity_and_growth(built):  # noqa: F811
    session = Session(built["art"], device="cuda", providers=["cuda"])
    assert session.providers[0] == "CUDAExecutionProvider" and session.device == "cuda:0"
    parity_and_growth(session, built, ATOL)


@pytest.mark.gpu
@pytest.mark.cuda_ep
@needs_cuda_ep
@pytest.mark.parametrize("n", [1, 7, 130])
def test_cuda_ep_batch_sizes(built, n):  # noqa: F811
    x = np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)
    gpu = Session(built["art"], device="cuda", providers=["cuda"])
    np.testing.assert_allclose(gpu.logits(x), Session(built["art"], device="cpu").logits(x), atol=ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.cuda_ep
@needs_cuda_ep
def test_cuda_ep_threads_during_growth(built):  # noqa: F811
    session = Session(built["art"], device="cuda", providers=["cuda"])
    x = built["x"][:8]
    before, after = built["before"][0][:8], built["after"][0][:8]
    answers, stop = [], threading.Event()

    def worker():
        while not stop.is_set():
            answers.append(session.logits(x))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    session.add_task(built["grown"])
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    for a in answers:
        ref = before if a.shape[1] == before.shape[1] else after
        assert np.abs(a - ref).max() <= ATOL
    assert {a.shape[1] for a in answers} == {before.shape[1], after.shape[1]}


@pytest.mark.gpu
@pytest.mark.cuda_ep
@needs_cuda_ep
def test_auto_picks_the_best_gpu_provider(built):  # noqa: F811
    session = Session(built["art"], cache_dir=None)
    want = "TensorrtExecutionProvider" if HAS_TRT_EP else "CUDAExecutionProvider"
    assert session.providers[0] == want and session.device == "cuda:0"


@pytest.mark.gpu
@pytest.mark.trt_ep
@needs_trt_ep
def test_trt_ep_parity_growth_and_engine_cache(built, tmp_path):  # noqa: F811
    import tensorrt

    session = Session(built["art"], device="cuda", providers=["tensorrt", "cuda"], cache_dir=tmp_path)
    assert session.providers[0] == "TensorrtExecutionProvider"
    (cache,) = (tmp_path / "trt").iterdir()
    assert tensorrt.__version__ in cache.name and any(cache.iterdir()), "no engine cached"
    parity_and_growth(session, built, TRT_ATOL)
    t0 = time.perf_counter()
    Session(built["art"], device="cuda", providers=["tensorrt", "cuda"], cache_dir=tmp_path)
    print(f"TensorRT EP session from its cache: {time.perf_counter() - t0:.1f} s")
    assert len(list((tmp_path / "trt").iterdir())) == 1


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_native_trt
def test_native_tensorrt_parity_growth_and_engine_cache(built, tmp_path):  # noqa: F811
    t0 = time.perf_counter()
    session = Session(built["art"], backend="tensorrt", max_batch=16, cache_dir=tmp_path)
    build_s = time.perf_counter() - t0
    assert session.backend == "tensorrt" and session.device == "cuda:0"
    (cache,) = (tmp_path / "trt").iterdir()
    assert {p.name for p in cache.iterdir()} >= {"engine-b1-16.plan", "timing.cache"}
    engine = (cache / "engine-b1-16.plan").read_bytes()
    parity_and_growth(session, built, TRT_ATOL)
    assert (cache / "engine-b1-16.plan").read_bytes() == engine  # growth wrote inputs, not the engine
    t0 = time.perf_counter()
    again = Session(built["art"], backend="tensorrt", max_batch=16, cache_dir=tmp_path)
    print(f"native TensorRT: build {build_s:.1f} s, from cache {time.perf_counter() - t0:.1f} s")
    x = built["x"][:40]  # more than max_batch: three runs
    np.testing.assert_allclose(again.logits(x), built["before"][0][:40], atol=TRT_ATOL, rtol=0)
