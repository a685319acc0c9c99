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


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A random 2-block ViT with 3 tasks, exported with room for 4: the tensors' values do not matter."""
    import subprocess
    import sys

    from care_export.export.writer import export_artifact

    d = tmp_path_factory.mktemp("synthetic")

    subprocess.run(
        [
            sys.executable,
            "-m",
            "care_export",
            "synth-ckpt",
            "-o",
            str(d / "ckpt"),
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
    export_artifact(d / "ckpt", d / "fp32", 4)
    return d / "fp32"


def test_tradeoff_curve_and_margin_aware_fallback(synthetic, tmp_path):
    """A random small model kept all W8A8 (the patch Conv too: its bias stays float32): the
    fallback counts margin-aware flips and records its trade-off curve from no layer to every
    layer weight-only, with latency ratios at batch 1 and 8."""
    from calibration.quantize import Images

    rng = np.random.default_rng(0)
    imgs = lambda n: Images(
        list(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)),  # noqa: E731
        np.arange(n) % 8,
        3,
        "random",
    )
    _, report = quantize_artifact(
        synthetic,
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


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_only_the_targets_activation_inputs_are_calibrated(synthetic, monkeypatch, method):
    """The calibrator takes the ranges of the quantized nodes' activation inputs only, and the graph
    quantize_static writes from them is the one it writes when every input and output of every
    MatMul/Gemm/Conv is calibrated (what ONNX Runtime's create_calibrator does)."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import calibrate

    from calibration import int8
    from calibration.routing_nodes import routing_nodes
    from runtime.artifact import Artifact
    from runtime.layout import INPUT

    model = onnx.load(str(synthetic / "model.onnx"))
    growth = {n for n, s in Artifact(synthetic).tensors.items() if s.role != "backbone"}
    targets = int8.weight_nodes(model, growth) - routing_nodes(model)
    rng = np.random.default_rng(0)
    images = [rng.normal(0, 1, (5, 3, 32, 32)).astype(np.float32) for _ in range(2)]
    ranges = []
    save = calibrate.save_tensors_data
    monkeypatch.setattr(calibrate, "save_tensors_data", lambda data, path: ranges.append(data) or save(data, path))

    def quantized():
        q = int8.quantize_qdq(onnx.ModelProto.FromString(model.SerializeToString()), images, targets, method, INPUT)
        return [(n.op_type, list(n.input), list(n.output)) for n in q.graph.node], {
            t.name: numpy_helper.to_array(t) for t in q.graph.initializer
        }

    nodes, inits = quantized()
    inputs = int8.activation_inputs(model, targets)
    assert set(ranges[0].keys()) == inputs and len(inputs) >= len(targets)
    weights = {t.name for t in model.graph.initializer}
    every = {
        t
        for n in model.graph.node
        if n.op_type in int8.QUANTIZED_OPS
        for t in [*n.input, *n.output]
        if t not in weights
    }
    monkeypatch.setattr(int8, "activation_inputs", lambda m, t: every)
    full_nodes, full_inits = quantized()
    assert set(ranges[1].keys()) > inputs  # the outputs too
    assert all(ranges[0][t].range_value == ranges[1][t].range_value for t in inputs)
    assert nodes == full_nodes and inits.keys() == full_inits.keys()
    assert all(np.array_equal(inits[k], full_inits[k]) for k in inits)


def test_model_session_runs_the_model_with_its_weights_apart_and_leaves_it_unchanged(synthetic, tmp_path):
    """model_session writes the weights beside a small graph (ONNX Runtime reads them straight into
    its tensors) and adds the extra outputs only to what it writes: same outputs as a session of
    the serialized model, and the in-memory model is byte for byte what it was."""
    import onnx
    from onnx import numpy_helper

    from calibration.graph import model_session, save_weights_apart
    from runtime.layout import INPUT, LOGITS

    model = onnx.load(str(synthetic / "model.onnx"))
    before = model.SerializeToString()
    extra = next(n.input[0] for n in model.graph.node if n.op_type == "TopK")
    x = np.random.default_rng(0).normal(0, 1, (3, 3, 32, 32)).astype(np.float32)
    with model_session(model, outputs=(extra,)) as sess:
        names = [o.name for o in sess.get_outputs()]
        logits, scores = sess.run([LOGITS, extra], {INPUT: x})
    assert model.SerializeToString() == before and extra in names
    plain = ort.InferenceSession(before, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(logits, plain.run([LOGITS], {INPUT: x})[0])
    assert scores.shape[0] == len(x)

    save_weights_apart(model, tmp_path / "m.onnx")
    apart = {
        t.name
        for t in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer
        if t.external_data
    }
    assert apart and (tmp_path / "m.bin").stat().st_size > (tmp_path / "m.onnx").stat().st_size
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert all(np.array_equal(numpy_helper.to_array(t), written[t.name]) for t in model.graph.initializer)


def test_save_model_of_a_model_beyond_one_protobuf_leaves_it_whole(synthetic, tmp_path, monkeypatch):
    """Past the protobuf limit the weights go beside the graph, and the caller's model keeps them
    (``onnx.save_model`` with external data would move them out of it)."""
    import onnx

    from calibration import graph

    model = onnx.load(str(synthetic / "model.onnx"))
    before = model.SerializeToString()
    monkeypatch.setattr(graph, "PROTO_LIMIT", 1 << 10)
    assert graph.save_model(model, tmp_path / "in.onnx")
    assert model.SerializeToString() == before and (tmp_path / "in.bin").exists()
    assert onnx.load(str(tmp_path / "in.onnx")).graph.initializer[0] == model.graph.initializer[0]
    monkeypatch.setattr(graph, "PROTO_LIMIT", 1 << 40)
    assert not graph.save_model(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.bin").exists()
