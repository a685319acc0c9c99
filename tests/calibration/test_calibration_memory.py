"""INT8 calibration holds a bounded number of images whatever their count (calibration/calib_data.Chunks):
ONNX Runtime's calibrator, the GPTQ moments, the sensitivity search and the report each see one
chunk at a time, and the Python heap's peak does not grow with the number of images."""

import json
import tracemalloc

import numpy as np
import onnxruntime as ort
import pytest
from helpers import images_for
from onnxruntime.quantization.calibrate import HistogramCalibrater

from calibration.quantize import quantize_artifact

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


def test_calibration_memory_does_not_grow_with_the_image_count(trained, tmp_path, watch):
    small, n_small, _ = quantize_peak(trained["fp32"], tmp_path / "small", per_task=3)
    assert watch["feed"] <= CHUNK and 0 < watch["held"] <= CHUNK, watch
    large, n_large, report = quantize_peak(trained["fp32"], tmp_path / "large", per_task=4 * CHUNK)
    assert n_large >= 4 * n_small and n_large > 4 * CHUNK
    # However many images: no run fed, and no calibrator flush held, more than one chunk.
    assert watch["feed"] <= CHUNK and 0 < watch["held"] <= CHUNK, watch
    assert large < 1.3 * small, (large / 2**20, small / 2**20)
    assert np.isfinite(report["top1_agreement"])


def test_tradeoff_curve_and_margin_aware_fallback(tmp_path):
    """A random small model kept all W8A8 (the patch Conv too: its bias stays float32): the
    fallback counts margin-aware flips and records its trade-off curve from no layer to every
    layer weight-only, with latency ratios at batch 1 and 8."""
    import subprocess
    import sys

    from calibration.quantize import Images
    from care_export.export.writer import export_artifact

    subprocess.run(
        [
            sys.executable,
            "-m",
            "care_export",
            "synth-ckpt",
            "-o",
            str(tmp_path / "ckpt"),
            "--backbone",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--patch-size",
            "8",
            "--depth",
            "2",
            "--init-cls",
            "4",
            "--increment",
            "2",
            "--tasks",
            "3",
        ],
        check=True,
        capture_output=True,
    )
    export_artifact(tmp_path / "ckpt", tmp_path / "fp32", 4)
    rng = np.random.default_rng(0)
    imgs = lambda n: Images(
        list(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)),  # noqa: E731
        np.arange(n) % 8,
        3,
        "random",
    )
    _, report = quantize_artifact(
        tmp_path / "fp32",
        tmp_path / "int8",
        "int8",
        imgs(24),
        imgs(16),
        chunk=CHUNK,
        fallback_target=1.0,
        fallback_eps=1e-3,
        tradeoff=True,
        latency_runs=1,
    )
    fb = json.loads((tmp_path / "int8" / "manifest.json").read_text())["quantization"]["fallback"]
    assert fb["flips"] == "margin-aware, eps 0.001" and fb["curve"] == report["tradeoff"]
    curve = report["tradeoff"]
    ks = [p["weight_only"] for p in curve]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == len(fb["sensitivity"]) > 0
    assert fb["weight_only"] == [] and len(fb["weight_only"]) in ks
    assert all(set(p["latency_ratio"]) == {"1", "8"} and 0 <= p["top1_agreement"] <= 1 for p in curve)
    margin = report["routing_flip_rate_margin"]
    assert margin["eps"] == 1e-3 and all(m <= r for m, r in zip(margin["per_block"], report["routing_flip_rate"]))
