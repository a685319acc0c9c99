"""Growth in place (``care-export add-task``): equal to a fresh export, refused checkpoints leave
the artifact byte for byte as it was, and an interrupted growth is either invisible or completed."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_artifact, make_checkpoint, snapshot
from safetensors.numpy import load_file, save_file

from care_export.cli import main
from care_export.export.parity import ort_session, random_images, run_artifact, run_parity
from care_export.export.writer import export_artifact
from runtime.artifact import Artifact
from runtime.checkpoint_files import sha256_file
from runtime.errors import CapacityError, MismatchError
from runtime.growth import add_tasks, apply_growth, plan_growth
from runtime.layout import MANIFEST, PENDING_MANIFEST, PENDING_STATE, STATE_FILE
from runtime.manifest import read_manifest

CAPACITY = 6


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same random model after 3, 5 and 7 tasks (B100-Inc3-like: a larger first task)."""
    root = tmp_path_factory.mktemp("grow")
    return {n: make_checkpoint(root / f"ck{n}", [12] + [3] * (n - 1), seed=1) for n in (3, 5, 7)}


def outputs(art, x):
    return run_artifact(ort_session(art / "model.onnx"), x, len(x))


def test_add_task_equals_fresh_export(ckpts, tmp_path):
    grown = make_artifact(ckpts[3], tmp_path / "grown", CAPACITY)
    graph = (grown / "model.onnx").read_bytes()
    added, m = add_tasks(grown, ckpts[5])
    assert added == [3, 4] and len(m["tasks"]) == 5
    fresh = make_artifact(ckpts[5], tmp_path / "fresh", CAPACITY)
    assert (grown / "model.onnx").read_bytes() == graph
    assert snapshot(grown) == snapshot(fresh)  # graph, every data file and the manifest
    x = random_images(32, 32)
    for a, b in zip(outputs(grown, x), outputs(fresh, x)):
        np.testing.assert_array_equal(a, b)
    run_parity(ckpts[5], grown, samples=64).check()


def test_capacity_exhausted_leaves_artifact_untouched(ckpts, tmp_path):
    art = make_artifact(ckpts[3], tmp_path / "art", CAPACITY)
    before = snapshot(art)
    with pytest.raises(CapacityError, match="holds 6 tasks"):
        add_tasks(art, ckpts[7])
    assert snapshot(art) == before
    res = CliRunner().invoke(main, ["add-task", str(art), str(ckpts[7])])
    assert res.exit_code == 1 and res.output.startswith("error:") and "holds 6 tasks" in res.output
    assert snapshot(art) == before


def test_task_larger_than_slot_is_refused(tmp_path):
    ck = make_checkpoint(tmp_path / "ck", [12, 3, 5], seed=2)
    art = tmp_path / "art"
    export_artifact(make_checkpoint(tmp_path / "ck2", [12, 3], seed=2), art, CAPACITY)
    before = snapshot(art)
    with pytest.raises(CapacityError, match="task 2 has 5 classes, a task slot holds 3"):
        add_tasks(art, ck)
    assert snapshot(art) == before


@pytest.mark.parametrize("change", ["backbone", "topk", "older_task", "preprocessing", "fewer_tasks"])
def test_foreign_checkpoint_is_refused(ckpts, tmp_path, change):
    art = make_artifact(ckpts[3], tmp_path / "art", CAPACITY)
    before = snapshot(art)
    if change == "backbone":
        other = make_checkpoint(tmp_path / "o", [12] + [3] * 4, seed=1, depth=3)
    elif change == "topk":
        other = make_checkpoint(tmp_path / "o", [12] + [3] * 4, seed=1, K=2)
    elif change == "older_task":
        other = make_checkpoint(tmp_path / "o", [12] + [3] * 4, seed=9)
        shutil.copy(ckpts[5] / "backbone.safetensors", other / "backbone.safetensors")
        m = json.loads((other / MANIFEST).read_text())
        m["backbone"] = json.loads((ckpts[5] / MANIFEST).read_text())["backbone"]
        (other / MANIFEST).write_text(json.dumps(m))
    elif change == "preprocessing":
        other = tmp_path / "o"
        shutil.copytree(ckpts[5], other)
        m = json.loads((other / MANIFEST).read_text())
        m["preprocessing"]["mean"] = [0.4, 0.4, 0.4]
        (other / MANIFEST).write_text(json.dumps(m))
    else:
        art = make_artifact(ckpts[5], tmp_path / "art5", CAPACITY)
        before, other = snapshot(art), ckpts[3]
    with pytest.raises(MismatchError):
        add_tasks(art, other)
    assert snapshot(art) == before


def test_same_tasks_rewritten_files_are_accepted(ckpts, tmp_path):
    """An older task in a differently written file but with the same values is the same task."""
    art = make_artifact(ckpts[3], tmp_path / "art", CAPACITY)
    other = tmp_path / "o"
    shutil.copytree(ckpts[5], other)
    m = json.loads((other / MANIFEST).read_text())
    path = other / m["tasks"][1]["file"]
    tensors = load_file(str(path))
    save_file(dict(reversed(list(tensors.items()))), str(path), metadata={"rewritten": "yes"})
    m["tasks"][1].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (other / MANIFEST).write_text(json.dumps(m))
    added, _ = add_tasks(art, other)
    assert added == [3, 4]


def test_crash_before_state_rename_is_invisible(ckpts, tmp_path, monkeypatch):
    art = make_artifact(ckpts[3], tmp_path / "art", CAPACITY)
    x = random_images(16, 32)
    want = outputs(art, x)
    a = Artifact(art)
    growth = plan_growth(a, ckpts[5])
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(STATE_FILE):
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        apply_growth(a, growth)
    monkeypatch.undo()
    assert (art / PENDING_STATE).exists() and len(read_manifest(art)["tasks"]) == 3
    for w, g in zip(want, outputs(art, x)):
        np.testing.assert_array_equal(w, g)
    assert add_tasks(art, ckpts[5])[0] == [3, 4]  # a retry completes it
    assert not (art / PENDING_STATE).exists() and not (art / PENDING_MANIFEST).exists()
    assert snapshot(art) == snapshot(make_artifact(ckpts[5], tmp_path / "fresh", CAPACITY))


def test_crash_between_renames_is_completed_by_the_reader(ckpts, tmp_path, monkeypatch):
    art = make_artifact(ckpts[3], tmp_path / "art", CAPACITY)
    a = Artifact(art)
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(MANIFEST):
            raise KeyboardInterrupt("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        apply_growth(a, plan_growth(a, ckpts[5]))
    monkeypatch.undo()
    assert (art / PENDING_MANIFEST).exists()
    assert len(Artifact(art).manifest["tasks"]) == 5  # the state is new: the reader rolls forward
    assert not (art / PENDING_MANIFEST).exists()
    assert snapshot(art) == snapshot(make_artifact(ckpts[5], tmp_path / "fresh", CAPACITY))
