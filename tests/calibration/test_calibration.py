"""FP16 and INT8 rewrites of an artifact (calibration/): they keep top-1 and routing decisions of
FP32 on a small model trained on the built-in dataset, load where FP32 loads, follow the growth
rule (FP16 grows like FP32, INT8 refuses) and turn bad input into one-line errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import CALIB_BACKBONE, ROOT, images_for
from PIL import Image

from calibration.calib_data import sample, task_classes
from calibration.quantize import quantize_artifact
from calibration.report import REPORT_FILE
from calibration.routing_nodes import routing_nodes
from care_export.cli import main
from care_export.data.builtin import builtin_pool
from runtime import Session
from runtime.artifact import Artifact
from runtime.errors import ArtifactError, InputError
from runtime.growth import add_tasks


@pytest.fixture(scope="module")
def quantized(trained):
    calib, held_out = images_for(trained["fp32"])
    out = {}
    for precision in ("fp16", "int8"):
        path = trained["dir"] / precision
        _, report = quantize_artifact(trained["fp32"], path, precision, calib, held_out, routing="fp32")
        out[precision] = (path, report)
    return out


# ---------------------------------------------------------------------- routing path
def test_routing_nodes_are_the_routing_path(trained):
    model = onnx.load(str(trained["fp32"] / "model.onnx"), load_external_data=False)
    routing = routing_nodes(model)
    nodes = {n.name: n for n in model.graph.node}
    reads = lambda n, suffix: any(i.endswith(suffix) for i in n.input)  # noqa: E731
    topk = [n for n in nodes.values() if n.op_type == "TopK"]
    assert len(topk) == 2 * CALIB_BACKBONE.depth and all(n.name in routing for n in topk)
    for suffix in ("perceptor0.proj", "perceptors.proj", "experts.down"):  # perceptor MatMuls, CLS expert pass
        users = [n for n in nodes.values() if reads(n, suffix) and n.op_type in ("MatMul", "Gemm")]
        assert users and all(n.name in routing for n in users), suffix
    # Router logits: the MatMul over the gathered rows of the router table.
    gathered = {n.output[0] for n in nodes.values() if n.op_type == "Gather" and reads(n, "routers.weight")}
    router_mm = [n for n in nodes.values() if n.op_type == "MatMul" and gathered & set(n.input)]
    assert len(router_mm) == CALIB_BACKBONE.depth and all(n.name in routing for n in router_mm)
    # Nothing of the backbone (attention, MLP, norms, embedding, head) nor the token path's products.
    backbone = [n for n in nodes.values() if any(i.startswith("vit.") for i in n.input)]
    assert backbone and not any(n.name in routing for n in backbone)
    assert not any(nodes[name].op_type == "LayerNormalization" for name in routing)
    assert "head/logits" not in routing


# ---------------------------------------------------------------------- the must-show thresholds
def test_fp16_keeps_top1(quantized):
    path, report = quantized["fp16"]
    assert report["top1_agreement"] >= 0.995, report
    assert report["accuracy"]["fp32"] > 0.5  # a trained model, not chance (15 classes)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["quantization"]["routing"] == "fp32"
    t = manifest["tensors"]
    assert t["moe.0.experts.up"]["dtype"] == "float16" and t["vit.blocks.0.mlp.fc1"]["dtype"] == "float16"
    assert t["moe.0.routers.weight"]["dtype"] == "float32" and t["moe.0.perceptors.proj"]["dtype"] == "float32"
    assert json.loads((path / REPORT_FILE).read_text())["top1_agreement"] == report["top1_agreement"]


def test_int8_keeps_top1_and_routing_and_is_small(quantized):
    path, report = quantized["int8"]
    assert report["top1_agreement"] >= 0.99, report
    assert max(report["routing_flip_rate"]) <= 0.01, report
    assert report["bytes"]["ratio"] <= 0.35, report
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    zero_points = [
        t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and "zero_point" in t.name
    ]
    assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
    m = json.loads((path / "manifest.json").read_text())
    t = m["tensors"]
    assert t["moe.0.experts.up"]["dtype"] == "int8" and t["moe.0.experts.down"]["dtype"] == "int8"
    # Only the routing path reads the router table: float16 when routing stays FP32.
    assert t["moe.0.routers.weight"]["dtype"] == "float16" and t["moe.0.perceptors.proj"]["dtype"] == "float32"
    assert m["quantization"]["method"] == "percentile" and m["quantization"]["rounding"] == "gptq"
    assert m["quantization"]["calibration"]["tasks_covered"] == 3


def test_int8_quantizes_only_weight_layer_inputs_and_records_the_fallback(quantized):
    """Activation Q/DQ feeds only MatMul / Gemm / Conv; layers that fell back read a float
    activation and an int8 weight; the manifest and the report name them."""
    path, report = quantized["int8"]
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = {
        c.op_type
        for c in model.graph.node
        for i in c.input
        if i in producer and producer[i].op_type == "DequantizeLinear" and producer[i].input[0] not in inits
    }
    assert readers and readers <= {"MatMul", "Gemm", "Conv"}, readers
    fb = json.loads((path / "manifest.json").read_text())["quantization"]["fallback"]
    assert {"floor", "w8a8", "calibration_flips", "weight_only", "target"} <= set(fb)
    # The rule: flips within the target, or every layer weight-only when the weights alone exceed it.
    assert fb["calibration_flips"] <= fb["target"] or set(fb["weight_only"]) == set(fb["sensitivity"])
    assert report["weight_only"] == fb["weight_only"]
    for name in fb["weight_only"]:
        x, w = (producer.get(i) for i in nodes[name].input[:2])
        assert (x is None or x.op_type != "DequantizeLinear") and w.op_type == "DequantizeLinear", name


def test_quantized_artifacts_run_in_session_and_cli(quantized, trained, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(img)
    for precision in ("fp16", "int8"):
        path = quantized[precision][0]
        with Session(path, device="cpu", verify=True) as s:
            pred = s.predict(str(img), top_k=3, return_routing=True)
            assert pred.classes.shape == (1, 3) and s.num_classes == 15
        res = CliRunner().invoke(main, ["run", str(path), str(img), "--device", "cpu"])
        assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------- growth
def test_fp16_grows_like_fp32_and_int8_refuses(trained, quantized, tmp_path):
    calib, held_out = images_for(trained["fp32-2"], eval_samples=40)
    small = tmp_path / "fp16-2"
    quantize_artifact(trained["fp32-2"], small, "fp16", calib, held_out)
    in_memory = Session(shutil.copytree(small, tmp_path / "fp16-mem"), device="cpu")
    assert add_tasks(small, trained["ckpt"])[0] == [2]
    assert in_memory.add_task(trained["ckpt"]) == [2]
    x = np.random.default_rng(1).standard_normal((6, 3, 32, 32), dtype=np.float32)
    with Session(quantized["fp16"][0], device="cpu") as whole_session:
        assert np.array_equal(in_memory.logits(x), whole_session.logits(x))
    in_memory.close()
    whole = quantized["fp16"][0]
    for name in ("model.onnx", "slots.bin", "state.bin"):
        assert (small / name).read_bytes() == (whole / name).read_bytes(), name
    assert [t["slot_sha256"] for t in Artifact(small, verify=True).manifest["tasks"]] == [
        t["slot_sha256"] for t in Artifact(whole).manifest["tasks"]
    ]

    int8 = tmp_path / "int8"
    shutil.copytree(quantized["int8"][0], int8)
    before = {p.name: p.read_bytes() for p in int8.iterdir()}
    with pytest.raises(ArtifactError, match="care-export quantize again"):
        add_tasks(int8, trained["ckpt"])
    with Session(int8, device="cpu") as s, pytest.raises(ArtifactError, match="cannot take new tasks"):
        s.add_task(trained["ckpt"])
    assert {p.name: p.read_bytes() for p in int8.iterdir()} == before
    res = CliRunner().invoke(main, ["add-task", str(int8), str(trained["ckpt"])])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "FP32 artifact" in res.output


# ---------------------------------------------------------------------- bad input
def test_bad_input_gives_one_line_errors(trained, quantized, tmp_path):
    def run(*args):
        return CliRunner().invoke(main, ["quantize", *map(str, args)])

    res = run(tmp_path / "missing", "-o", tmp_path / "o", "--precision", "fp16", "--calib-data", "builtin")
    assert res.exit_code == 1 and "artifact not found" in res.output and res.output.count("\n") == 1
    res = run(trained["fp32"], "-o", quantized["fp16"][0], "--precision", "fp16", "--calib-data", "builtin")
    assert res.exit_code == 1 and "already exists; pass --force" in res.output
    res = run(trained["fp32"], "-o", tmp_path / "o", "--precision", "int4", "--calib-data", "builtin")
    assert res.exit_code == 2 and "int4" in res.output
    (tmp_path / "empty").mkdir()
    res = run(trained["fp32"], "-o", tmp_path / "o", "--precision", "int8", "--calib-data", tmp_path / "empty")
    assert res.exit_code == 1 and "no images of the artifact's classes" in res.output
    res = run(quantized["int8"][0], "-o", tmp_path / "o", "--precision", "fp16", "--calib-data", "builtin")
    assert res.exit_code == 1 and "already quantized (INT8)" in res.output
    res = run(trained["fp32"], "-o", trained["fp32"], "--precision", "fp16", "--calib-data", "builtin", "--force")
    assert res.exit_code == 1 and "is the source artifact" in res.output
    calib, held_out = images_for(trained["fp32"], per_task=1, eval_samples=3)
    for bad in (dict(method="mse"), dict(rounding="stochastic"), dict(routing="int4")):
        with pytest.raises(InputError, match="unknown"):
            quantize_artifact(trained["fp32"], tmp_path / "o", "int8", calib, held_out, **bad)
    assert not (tmp_path / "o").exists()


def test_a_hard_linked_copy_quantizes_as_its_source(trained, quantized, tmp_path):
    """Copies made with ``cp -al`` (tensor files with several links, which ``onnx.load`` refuses)
    are read through the artifact's tensor map: the same graph, and the same FP16 artifact."""
    import os

    from calibration.graph import load_artifact_model

    src = onnx.load(str(trained["fp32"] / "model.onnx"))  # before the links: it refuses both copies after
    copy = tmp_path / "linked"
    copy.mkdir()
    for f in trained["fp32"].iterdir():
        os.link(f, copy / f.name)
    try:
        assert load_artifact_model(Artifact(copy)).SerializeToString() == src.SerializeToString()
        calib, held_out = images_for(trained["fp32"])
        quantize_artifact(copy, tmp_path / "fp16", "fp16", calib, held_out, latency_runs=1)
    finally:  # the other tests' source has one link again
        shutil.rmtree(copy)
    for f in ("model.onnx", "backbone.bin", "slots.bin", "state.bin"):
        assert (tmp_path / "fp16" / f).read_bytes() == (quantized["fp16"][0] / f).read_bytes(), f


def test_cli_quantize_with_an_image_folder(trained, tmp_path):
    """Calibration from a folder of images named by class; the output is a complete artifact."""
    art = Artifact(trained["fp32"])
    names = art.manifest["classes"]["names"]
    pool = builtin_pool(names, 32, "test")
    for c, name in enumerate(names):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            pool[c][i]().save(tmp_path / "imgs" / name / f"{i}.png")
    out = tmp_path / "q"
    res = CliRunner().invoke(
        main,
        [
            "quantize",
            str(trained["fp32"]),
            "-o",
            str(out),
            "--precision",
            "int8",
            "--calib-data",
            str(tmp_path / "imgs"),
            "--per-task",
            "6",
            "--method",
            "minmax",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "routing flips" in res.output and (out / REPORT_FILE).is_file()
    m = json.loads((out / "manifest.json").read_text())["quantization"]
    assert m["calibration"]["samples"] == 18 and m["evaluation"]["samples"] == 60 - 18
    assert m["fallback"]["flips"] == "margin-aware, eps 0.001"  # the default: near-tie flips do not count
    assert not list(tmp_path.glob(".q.tmp-*"))


def test_sampling_covers_every_task_and_is_disjoint():
    manifest = {"tasks": [{"classes": 3}, {"classes": 2}]}
    pool = {c: [f"{c}-{i}" for i in range(5)] for c in range(5)}
    tasks = task_classes(manifest)
    items, labels, covered, chosen = sample(pool, tasks, 4, seed=1)
    assert covered == 2 and len(items) == 8 and sorted(np.bincount(labels)) == [1, 1, 2, 2, 2]
    again = sample(pool, tasks, 4, seed=1)
    assert again[0] == items
    rest, *_ = sample(pool, tasks, 100, seed=2, skip=chosen)
    assert len(rest) == 25 - 8 and not set(rest) & set(items)
    with pytest.raises(InputError):
        from calibration.calib_data import folder_pool

        folder_pool("/nonexistent-dir", ["a"])


def test_calibration_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import importlib, pkgutil, calibration\n"
        "for m in pkgutil.walk_packages(calibration.__path__): importlib.import_module('calibration.' + m.name)\n"
        "import care_export.cli.quantize\n"
        "assert sys.modules.get('torch') is None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_reduced_routing_rewrites_the_routing_path_too(trained, tmp_path):
    """``--routing reduced``: FP16 runs the TopKs in half precision, INT8 puts the router logits
    under Q/DQ; both still load and answer."""
    calib, held_out = images_for(trained["fp32"], per_task=4, eval_samples=60)
    for precision in ("fp16", "int8"):
        out = tmp_path / precision
        manifest, report = quantize_artifact(trained["fp32"], out, precision, calib, held_out, routing="reduced")
        assert manifest["quantization"]["routing"] == "reduced" and report["top1_agreement"] >= 0.9
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        nodes = {n.name: n for n in model.graph.node}
        producers = {o: n for n in model.graph.node for o in n.output}
        if precision == "fp16":
            assert manifest["tensors"]["moe.0.routers.weight"]["dtype"] == "float16"
            # No Cast back to float32 in front of a TopK: it runs in float16.
            assert not any(producers[n.input[0]].op_type == "Cast" for n in nodes.values() if n.op_type == "TopK")
        else:
            src = onnx.load(str(trained["fp32"] / "model.onnx"), load_external_data=False)
            gathered = {n.output[0] for n in src.graph.node if n.op_type == "Gather" and "routers.weight" in n.input[0]}
            router_mm = [n.name for n in src.graph.node if n.op_type == "MatMul" and gathered & set(n.input)]
            assert len(router_mm) == CALIB_BACKBONE.depth
            assert manifest["tensors"]["moe.0.routers.weight"]["dtype"] == "int8"
            for name in router_mm:
                assert all(producers[i].op_type == "DequantizeLinear" for i in nodes[name].input), name


def test_duplicate_casts_of_older_converters_are_merged():
    """ONNX Runtime's float16 converter before 1.32 casts an initializer once per kept reader, every
    Cast with the same output name; the rewrite keeps the first, and the graph checks and runs."""
    from onnx import TensorProto, helper, numpy_helper

    from calibration.fp16 import drop_duplicate_casts

    cast = lambda: helper.make_node("Cast", ["c16"], ["c32"], to=TensorProto.FLOAT)  # noqa: E731
    graph = helper.make_graph(
        [cast(), helper.make_node("Add", ["x", "c32"], ["a"]), cast(), helper.make_node("Mul", ["a", "c32"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([1.5, -2.0], np.float16), "c16")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    assert drop_duplicate_casts(model) == 1
    onnx.checker.check_model(model)
    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.array([1.0, 1.0], np.float32)}
    )[0]
    np.testing.assert_allclose(y, [3.75, 2.0])


def test_a_rewrite_slower_than_fp32_is_said(quantized):
    from calibration.report import slower_note

    report = dict(quantized["int8"][1])
    for ratios, said in (((1.4, 2.5), True), ((0.45, 0.6), False), ((1.1, 0.9), False)):
        report["latency_ms"] = dict(report["latency_ms"], ratio=ratios[0], batch1_ratio=ratios[1])
        note = slower_note(report)
        assert (note is not None) == said, ratios
    assert "INT8 artifact runs slower than FP32" in slower_note(
        dict(report, latency_ms=dict(report["latency_ms"], ratio=1.4, batch1_ratio=2.5))
    )
