"""The iterative prediction's static graph: parity with PyTorch's iterative forward, static
structure, growth as data, and the capacity limit."""

import json

import numpy as np
import onnx
import pytest
import torch

from care_export.checkpoint import load_checkpoint
from care_export.export.iterative_graph import SCORES, build_iterative_model, check_capacity
from care_export.export.writer import export_dims
from care_export.iterative import iterative_scores
from care_export.parity import ort_session, random_images
from runtime.artifact import INPUT, ROUTING_EXPERTS, ROUTING_TASKS, layout
from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.errors import CareError

from test_export_common import IMG, make_artifact, make_checkpoint

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
