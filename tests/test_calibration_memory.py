"""INT8 calibration holds a bounded number of images whatever their count (calibration/calib_data.Chunks):
ONNX Runtime's calibrator, the GPTQ moments, the sensitivity search and the report each see one
chunk at a time, and the Python heap's peak does not grow with the number of images."""

import tracemalloc

import numpy as np
import onnxruntime as ort
import pytest
from onnxruntime.quantization.calibrate import HistogramCalibrater

from calibration.quantize import quantize_artifact
from test_calibration import images_for, trained  # noqa: F401  (the module's trained model)

CHUNK = 8  # also the report's latency batch


@pytest.fixture
def watch(monkeypatch):
    """The most images any ONNX Runtime run was fed at once, and the most intermediate outputs the
    histogram calibrator held before merging them."""
    seen = {"feed": 0, "held": 0}
    run, clear = ort.InferenceSession.run, HistogramCalibrater.clear_collected_data

    def watched_run(self, names, feed, *a, **k):
        seen["feed"] = max([seen["feed"]] + [len(v) for v in feed.values() if getattr(v, "ndim", 0) == 4])
        return run(self, names, feed, *a, **k)

    def watched_clear(self):
        seen["held"] = max(seen["held"], len(self.intermediate_outputs))
        return clear(self)

    monkeypatch.setattr(ort.InferenceSession, "run", watched_run)
    monkeypatch.setattr(HistogramCalibrater, "clear_collected_data", watched_clear)
    return seen


def quantize_peak(art, out, per_task):
    calib, held_out = images_for(art, per_task=per_task, eval_samples=24)
    tracemalloc.start()
    try:
        _, report = quantize_artifact(art, out, "int8", calib, held_out, chunk=CHUNK, latency_runs=1)
        return tracemalloc.get_traced_memory()[1], len(calib.labels), report
    finally:
        tracemalloc.stop()


def test_calibration_memory_does_not_grow_with_the_image_count(trained, tmp_path, watch):  # noqa: F811
    small, n_small, _ = quantize_peak(trained["fp32"], tmp_path / "small", per_task=3)
    assert watch["feed"] <= CHUNK and 0 < watch["held"] <= CHUNK, watch
    large, n_large, report = quantize_peak(trained["fp32"], tmp_path / "large", per_task=4 * CHUNK)
    assert n_large >= 4 * n_small and n_large > 4 * CHUNK
    # However many images: no run fed, and no calibrator flush held, more than one chunk.
    assert watch["feed"] <= CHUNK and 0 < watch["held"] <= CHUNK, watch
    assert large < 1.3 * small, (large / 2**20, small / 2**20)
    assert np.isfinite(report["top1_agreement"])
