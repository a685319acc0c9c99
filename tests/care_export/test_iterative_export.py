"""The iterative prediction's static graph: parity with PyTorch's iterative forward, static
structure, growth as data, and the capacity limit."""

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import IMG, make_artifact, make_checkpoint

from care_export.checkpoint.format import load_checkpoint
from care_export.export.iterative_graph import build_iterative_model, check_capacity
from care_export.export.parity import ort_session, random_images
from care_export.export.writer import export_dims
from care_export.model.iterative import iterative_scores
from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.errors import CareError
from runtime.layout import INPUT, ROUTING_EXPERTS, ROUTING_TASKS, SCORES, layout

FORBIDDEN = {"NonZero", "Loop", "If", "Scan"}


def iterative_artifact(ckpt, out, capacity):
    """A single-pass artifact with the iterative graph written beside its weights."""
    make_artifact(ckpt, out, capacity)
    dims = export_dims(read_checkpoint_manifest(ckpt), capacity)
    model = build_iterative_model(dims, layout(dims))
    onnx.save(model, str(out / "iterative.onnx"))
    return out / "iterative.onnx"


@pytest.mark.parametrize("tasks", [1, 2, 5, 12])
def test_iterative_graph_matches_pytorch(tmp_path, tasks):
    ckpt = make_checkpoint(tmp_path / "ckpt", [6] + [3] * (tasks - 1), seed=tasks)
    path = iterative_artifact(ckpt, tmp_path / "art", 14)
    x = random_images(8, IMG, seed=tasks)
    scores, *routing = ort_session(path).run([SCORES, ROUTING_TASKS, ROUTING_EXPERTS], {INPUT: x})
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        want = iterative_scores(model.eval(), torch.from_numpy(x)).numpy()
    classes = want.shape[1]
    assert np.abs(scores[:, :classes] - want).max() < 1e-4
    assert (scores[:, :classes].argmax(1) == want.argmax(1)).all()
    assert (scores[:, classes:] == 0).all()  # classes not learned yet score nothing
    # the routing outputs are the single pass's, as the single-pass artifact reports them
    single = ort_session(tmp_path / "art" / "model.onnx").run([ROUTING_TASKS, ROUTING_EXPERTS], {INPUT: x})
    assert all(np.array_equal(a, b) for a, b in zip(routing, single))


def test_iterative_graph_is_static_and_grows_as_data(tmp_path):
    small = iterative_artifact(make_checkpoint(tmp_path / "a", [6, 3]), tmp_path / "x", 10)
    large = iterative_artifact(make_checkpoint(tmp_path / "b", [6, 3, 3, 3], seed=2), tmp_path / "y", 10)
    assert small.read_bytes() == large.read_bytes()  # the task count is data, not structure
    ops = {n.op_type for n in onnx.load(str(small), load_external_data=False).graph.node}
    assert not FORBIDDEN & ops


def test_capacity_above_61_is_refused():
    check_capacity(61)
    with pytest.raises(CareError, match="capacity 62 exceeds 61 tasks"):
        check_capacity(62)


def test_iterative_limit_matches_the_evaluation_rule():
    from care_export.export.iterative_graph import MAX_ITERATIVE_CAPACITY
    from care_export.model.iterative import MAX_ITERATIVE_TASK

    assert MAX_ITERATIVE_CAPACITY == MAX_ITERATIVE_TASK + 1


def test_onnx_predict_iterative_session_growth_and_run(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from care_export.cli import main
    from runtime import Session

    small = make_checkpoint(tmp_path / "c3", [6, 3, 3], seed=4)
    grown = make_checkpoint(tmp_path / "c5", [6, 3, 3, 3, 3], seed=4)
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["onnx", str(small), "--tasks", "6", "-o", str(art), "--predict", "iterative"])
    assert res.exit_code == 0, res.output
    m = json.loads((art / "manifest.json").read_text())
    assert m["predict"] == "iterative" and SCORES in m["outputs"] and m["scale"] == 20.0
    x = random_images(8, IMG, seed=9)
    session = Session(art, device="cpu")
    for ckpt in (small, grown):
        model, _ = load_checkpoint(ckpt)
        with torch.no_grad():
            want = iterative_scores(model.eval(), torch.from_numpy(x)).numpy()
        pred = session.predict(x, top_k=2)
        assert (pred.classes[:, 0] == want.argmax(1)).all()
        np.testing.assert_allclose(pred.probs[:, 0], want.max(1) / 2, atol=1e-4)
        if ckpt is small:
            graph = (art / "model.onnx").read_bytes()
            assert session.add_task(grown) == [3, 4]  # growth in place, graph untouched
            assert (art / "model.onnx").read_bytes() == graph
    with pytest.raises(CareError, match="outputs scores, not logits"):
        session.logits(x)
    res = CliRunner().invoke(main, ["parity", str(small), str(art), "--samples", "16"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        main, ["quantize", str(art), "-o", str(tmp_path / "q"), "--precision", "fp16", "--calib-data", "builtin"]
    )
    assert res.exit_code == 1 and "iterative-prediction artifact" in res.output, res.output
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    res = CliRunner().invoke(main, ["run", str(art), str(tmp_path / "a.png"), "--device", "cpu"])
    assert res.exit_code == 0 and "a.png" in res.output, res.output
    res = CliRunner().invoke(
        main, ["onnx", str(small), "--tasks", "62", "-o", str(tmp_path / "big"), "--predict", "iterative"]
    )
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "exceeds 61 tasks" in res.output
    assert not (tmp_path / "big").exists()


def test_eval_ranks_by_the_iterative_scores(tmp_path):
    """`care-export eval --eval iterative` of a checkpoint ranks as the iterative artifact does,
    and an artifact refuses a mode its graph was not exported for."""
    from click.testing import CliRunner
    from PIL import Image

    from care_export.cli import main

    ckpt = make_checkpoint(tmp_path / "c", [6, 3, 3], seed=4)
    art = tmp_path / "art"
    assert (
        CliRunner()
        .invoke(main, ["onnx", str(ckpt), "--tasks", "4", "-o", str(art), "--predict", "iterative"])
        .exit_code
        == 0
    )
    rng = np.random.default_rng(3)
    for name in json.loads((ckpt / "manifest.json").read_text())["classes"]["names"]:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png"
            )

    def evaluate(target, *mode):
        res = CliRunner().invoke(main, ["eval", str(target), str(tmp_path / "data"), "--split", "all", "--json", *mode])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    iterative, single = evaluate(ckpt, "--eval", "iterative"), evaluate(ckpt, "--eval", "single")
    deployed = evaluate(art)
    assert "iterative prediction" in iterative["backend"] and "single prediction" in single["backend"]
    assert deployed["top1"] == iterative["top1"] and deployed["per_task"] == iterative["per_task"]
    res = CliRunner().invoke(main, ["eval", str(art), str(tmp_path / "data"), "--eval", "single"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "--predict single" in res.output, res.output
