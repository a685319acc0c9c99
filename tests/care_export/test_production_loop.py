"""The production loop: classes that arrive later as new image folders become new tasks, every
task is evaluated from its recorded data, and each grown model ships as a new artifact version
that is evaluated without PyTorch."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import BLOCK_TORCH, ROOT, snapshot

from care_export.cli import main
from care_export.data.builtin import BuiltinSource
from care_export.export.writer import export_artifact
from care_export.model.config import backbone_config
from care_export.training.continual import resume_sequence, train_sequence
from care_export.training.task import TrainConfig
from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.errors import CareError

TINY = backbone_config("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
FAST = TrainConfig(epochs=2, batch_size=8, ca_epochs=1)


def image_folder(root: Path, names: list[str], first_class: int, per_class: int = 6) -> Path:
    """One sub-folder of PNGs per class, drawn by the built-in generator (class ``first_class + i``)."""
    source = BuiltinSource(len(names), first_class=first_class, train_per_class=per_class, image_size=32)
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            source.load("train", (label, i)).save(root / name / f"{i:02d}.png")
    return root


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def without_torch(*args, rc: int = 0) -> subprocess.CompletedProcess:
    """Run the command line in a fresh interpreter where any ``import torch`` fails."""
    code = BLOCK_TORCH + "from care_export.cli import main\nmain(%r)\n" % [str(a) for a in args]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == rc, proc.stderr
    return proc


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    folders = {
        "a": image_folder(root / "a", [f"a{i}" for i in range(6)], 0),
        "b": image_folder(root / "b", ["b0", "b1", "b2"], 10),
        # c: two new classes and one that folder a already taught
        "c": image_folder(root / "c", ["a0", "c0", "c1"], 20),
    }
    ck = train_sequence(
        root / "ck", data=folders["a"], init_cls=3, increment=3, backbone=TINY, weights=None, cfg=FAST, progress=False
    )
    return root, folders, ck


def test_new_folders_become_new_tasks_with_their_provenance(loop, capsys):
    root, folders, ck = loop
    m = read_checkpoint_manifest(ck)
    assert [t["classes"] for t in m["tasks"]] == [3, 3]
    rec = m["task_data"][0]
    assert rec["given"] == str(folders["a"]) and rec["images"] == {"train": 15, "test": 3}
    assert len(rec["files_sha256"]) == 64 and set(rec["classes"]) | set(m["task_data"][1]["classes"]) == {
        f"a{i}" for i in range(6)
    }
    with pytest.raises(CareError, match="already holds all 2 tasks"):
        resume_sequence(ck, data=folders["a"], progress=False)  # the same classes: nothing new to learn
    with pytest.raises(CareError, match="class 'a0' of .* is already known"):
        resume_sequence(ck, data=folders["c"], progress=False)
    res = cli("train", "--resume", ck, "--data", folders["c"])
    assert res.exit_code == 1 and res.output.startswith("error: class 'a0'") and "--skip-known" in res.output
    res = cli("train", "--resume", ck, "--skip-known")
    assert res.exit_code == 2 and "--skip-known needs --data" in res.output

    resume_sequence(ck, data=folders["b"], progress=False)
    m = read_checkpoint_manifest(ck)
    assert [t["classes"] for t in m["tasks"]] == [3, 3, 3]
    assert m["classes"]["names"][6:] == ["b0", "b1", "b2"]
    assert m["task_data"][2]["given"] == str(folders["b"]) and m["task_data"][2]["classes"] == ["b0", "b1", "b2"]
    assert all(a is not None for a in m["metrics"]["matrix"][-1]) and len(m["metrics"]["matrix"]) == 3
    assert m["metrics"]["matrix"][-1][2] > 100 / 3  # the new task is learned (chance: a third)
    export_artifact(ck, root / "v1", 6)  # the version that serves while the next task is learned


def test_missing_source_is_skipped_and_named(loop, caplog):
    root, folders, ck = loop
    if len(read_checkpoint_manifest(ck)["tasks"]) < 3:
        pytest.skip("needs the previous test's task")
    moved = root / "a-moved"
    os.replace(folders["a"], moved)
    try:
        with caplog.at_level(logging.INFO, logger="care_export"):  # the trainer's log lines
            resume_sequence(ck, data=folders["c"], skip_known=True, progress=False)
    finally:
        os.replace(moved, folders["a"])
    out = caplog.text
    assert "skipping 1 class(es)" in out and "a0" in out
    assert "evaluation skipped task 0" in out and "evaluation skipped task 1" in out
    m = read_checkpoint_manifest(ck)
    assert m["classes"]["names"][9:] == ["c0", "c1"] and m["task_data"][3]["images"]["train"] == 10
    row = m["metrics"]["matrix"][-1]
    assert row[:2] == [None, None] and None not in row[2:]
    assert cli("info", ck).exit_code == 0


def test_export_add_task_to_a_new_version_and_eval_without_torch(loop, tmp_path):
    root, folders, ck = loop
    if len(read_checkpoint_manifest(ck)["tasks"]) < 4:
        pytest.skip("needs the previous tests' tasks")
    v1 = root / "v1"
    before = snapshot(v1)
    res = cli("add-task", v1, ck, "-o", tmp_path / "v2")
    assert res.exit_code == 0, res.output
    assert "hard-linked backbone.bin, model.onnx" in res.output and "slots.bin" in res.output
    assert snapshot(v1) == before  # the serving version is untouched
    v2 = tmp_path / "v2"
    assert (
        read_checkpoint_manifest(ck)["classes"]["names"]
        == json.loads((v2 / "manifest.json").read_text())["classes"]["names"]
    )
    assert os.path.samefile(v1 / "backbone.bin", v2 / "backbone.bin")
    assert not os.path.samefile(v1 / "slots.bin", v2 / "slots.bin")
    res = cli("add-task", v1, ck, "-o", tmp_path / "v2")
    assert res.exit_code == 1 and "already exists" in res.output

    art = json.loads(without_torch("eval", v2, folders["b"], "--json").stdout)
    res = cli("eval", ck, folders["b"], "--json")
    assert res.exit_code == 0, res.output
    ref = json.loads(res.output)
    assert art["images"] == ref["images"] == 3 and art["backend"].startswith("onnxruntime")
    assert art["per_task"][:2] == [None, None] and art["per_task"][2] is not None
    assert abs(art["top1"] - ref["top1"]) <= 100 / 3 + 1e-9  # preprocessing differs by at most one image
    assert 0 <= art["task_confusion"] <= 100 and art["top5"] >= art["top1"]

    res = cli("eval", v2, folders["c"])  # 'a0', 'c0', 'c1' all known now
    assert res.exit_code == 0 and "top-1" in res.output and "per task" in res.output
    stranger = image_folder(tmp_path / "d", ["b0", "zebra"], 30)
    res = cli("eval", v2, stranger)
    assert res.exit_code == 1 and "'zebra'" in res.output and "--skip-unknown" in res.output
    res = cli("eval", v2, stranger, "--skip-unknown", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["skipped_classes"] == ["zebra"]


def test_score_counts_task_confusion():
    from care_export.cli.eval import score

    logits = np.eye(5)[[0, 1, 4, 3]] + 0.0  # image 2 (class 2, task 0) predicted as class 4 (task 1)
    s = score(logits, np.array([0, 1, 2, 3]), [3, 2])
    assert s["top1"] == 75.0 and s["task_confusion"] == 25.0 and s["per_task"] == pytest.approx([200 / 3, 100.0])
    assert score(logits, np.array([0, 1, 2, 3]), [3, 2, 1])["per_task"][2] is None  # a task without images


def test_golden_record_proves_the_new_version_without_torch(loop, tmp_path):
    root, folders, ck = loop
    v2 = root / "v2-golden"
    if len(read_checkpoint_manifest(ck)["tasks"]) < 4:
        pytest.skip("needs the previous tests' tasks")
    assert cli("add-task", root / "v1", ck, "-o", v2).exit_code == 0
    golden = tmp_path / "v2.golden.npz"
    res = cli("parity", ck, v2, "--images", folders["c"], "--save-golden", golden)
    assert res.exit_code == 0 and "samples        18 (11 classes)" in res.output, res.output
    out = json.loads(without_torch("parity", v2, "--golden", golden, "--json").stdout)
    assert out["ok"] and out["precision"] == "fp32" and out["max_abs"] <= 1e-3 and out["routing"] == [1.0, 1.0]
    proc = without_torch("parity", root / "v1", "--golden", golden, rc=1)  # the old version is not the one proven
    assert proc.stderr.startswith("error: ") and "not the artifact" in proc.stderr and "tasks" in proc.stderr
    # a record whose logits were altered beyond the tolerance fails
    with np.load(golden) as z:
        rec = {k: z[k] for k in z.files}
    rec["logits"] = rec["logits"] + 0.01
    np.savez(tmp_path / "bad.npz", **rec)
    proc = without_torch("parity", v2, "--golden", tmp_path / "bad.npz", rc=1)
    assert "exceeds atol" in proc.stderr
