"""The exported graph and artifact: static structure, checker, layout, CLI and its errors."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import make_artifact, make_checkpoint, snapshot

from care_export.cli import main
from care_export.export.parity import ort_session, random_images, run_artifact
from care_export.export.writer import export_artifact
from runtime.artifact import Artifact
from runtime.errors import ArtifactError, CapacityError
from runtime.layout import SLOTS_FILE, Dims, layout, router_base, task_regions

FORBIDDEN = {"NonZero", "Loop", "If", "Scan"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "ckpt", [10, 3, 3, 3, 3])


def graph(art):
    return onnx.load(str(art / "model.onnx"), load_external_data=False).graph


def test_graph_is_static_and_independent_of_capacity(ckpt, tmp_path):
    small, large = make_artifact(ckpt, tmp_path / "c10", 10), make_artifact(ckpt, tmp_path / "c301", 301)
    g10, g301 = graph(small), graph(large)
    assert len(g10.node) == len(g301.node)
    assert [n.op_type for n in g10.node] == [n.op_type for n in g301.node]
    assert not FORBIDDEN & {n.op_type for n in g301.node}
    for path in (small, large):
        onnx.checker.check_model(str(path / "model.onnx"), full_check=True)
    # every weight is external data: the .onnx stays small at any capacity
    assert (large / "model.onnx").stat().st_size < 200_000


def test_graph_does_not_depend_on_task_count(tmp_path):
    one = make_artifact(make_checkpoint(tmp_path / "a", [10]), tmp_path / "x", 20, slot_classes=3)
    many = make_artifact(make_checkpoint(tmp_path / "b", [10] + [3] * 7, seed=3), tmp_path / "y", 20)
    assert (one / "model.onnx").read_bytes() == (many / "model.onnx").read_bytes()


def test_inactive_classes_never_win(ckpt, tmp_path):
    art = make_artifact(ckpt, tmp_path / "art", 12)
    logits, tasks, experts = run_artifact(ort_session(art / "model.onnx"), random_images(16, 32), 16)
    m = json.loads((art / "manifest.json").read_text())
    learned = sum(t["classes"] for t in m["tasks"])
    assert logits.shape == (16, m["dims"]["first_classes"] + 11 * m["dims"]["slot_classes"])
    assert np.isneginf(logits[:, learned:]).all() and np.isfinite(logits[:, :learned]).all()
    assert tasks.max() < 5 and experts.max() < 5


def test_unused_slots_are_no_ops(ckpt, tmp_path):
    """Whatever an unused slot holds (here NaN) changes nothing: only data decides the task count."""
    art = make_artifact(ckpt, tmp_path / "art", 12)
    x = random_images(32, 32)
    want = run_artifact(ort_session(art / "model.onnx"), x, 32)
    a = Artifact(art)
    used = {
        (n, r) for t in range(a.num_tasks) for n, row, rows in task_regions(t, a.dims) for r in range(row, row + rows)
    }
    with open(art / SLOTS_FILE, "r+b") as f:
        for s in a.tensors.values():
            if s.file == SLOTS_FILE and s.role in ("slot", "router"):
                for r in range(s.shape[0]):
                    if (s.name, r) not in used:
                        f.seek(s.offset + r * s.row_bytes)
                        f.write(np.full(s.row_bytes // 4, np.nan, np.float32).tobytes())
    got = run_artifact(ort_session(art / "model.onnx"), x, 32)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)


def test_router_packing_is_dense():
    """Router t's rows never overlap another's, and the table is not padded to capacity^2."""
    for cap in (1, 2, 7, 10, 301):
        dims = Dims(8, 1, 2, 16, 32, 8, cap, 4, 8, 2, 3, 10, 3)
        taken = np.zeros(dims.router_rows, int)
        for t in range(cap):
            taken[router_base(t, cap) : router_base(t, cap) + t + 1] += 1
        assert taken.max() == 1 and taken.sum() == cap * (cap + 1) // 2
        assert dims.router_rows <= cap * (cap + 1) // 2 + cap


def test_layout_is_aligned_and_disjoint():
    dims = Dims(192, 3, 3, 768, 32, 8, 301, 16, 64, 2, 3, 100, 3)
    specs = sorted(layout(dims).values(), key=lambda s: (s.file, s.offset))
    for a, b in zip(specs, specs[1:]):
        assert b.offset % (1 << 16) == 0
        if a.file == b.file:
            assert a.offset + a.nbytes <= b.offset


def test_artifact_manifest(ckpt, tmp_path):
    art = make_artifact(ckpt, tmp_path / "art", 10)
    m = Artifact(art, verify=True).manifest
    assert m["format"] == "care-export-artifact" and m["precision"] == "fp32" and m["opset"] == 17
    assert m["batch"] == "dynamic" and m["dims"]["capacity"] == 10
    assert [t["classes"] for t in m["tasks"]] == [10, 3, 3, 3, 3] and len(m["classes"]["names"]) == 22
    assert m["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert set(m["files"]) == {"model.onnx", "backbone.bin", "slots.bin", "state.bin"}


def test_capacity_and_slot_errors(ckpt, tmp_path):
    with pytest.raises(CapacityError, match="below the checkpoint's 5 tasks"):
        export_artifact(ckpt, tmp_path / "a", 4)
    with pytest.raises(CapacityError, match="largest later task"):
        export_artifact(ckpt, tmp_path / "a", 10, slot_classes=2)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))


def test_refuses_to_overwrite(ckpt, tmp_path):
    art = make_artifact(ckpt, tmp_path / "art", 10)
    before = snapshot(art)
    with pytest.raises(ArtifactError, match="--force"):
        export_artifact(ckpt, art, 12)
    assert snapshot(art) == before
    export_artifact(ckpt, art, 12, force=True)
    assert json.loads((art / "manifest.json").read_text())["dims"]["capacity"] == 12


def test_cli(ckpt, tmp_path):
    run = CliRunner().invoke
    out = tmp_path / "model"
    res = run(main, ["onnx", str(ckpt), "--tasks", "8", "-o", str(out), "--batch", "4"])
    assert res.exit_code == 0, res.output
    assert "5 of 8 tasks" in res.output and "nodes" in res.output
    assert json.loads((out / "manifest.json").read_text())["batch"] == 4
    res = run(main, ["parity", str(ckpt), str(out), "--samples", "10"])
    assert res.exit_code == 0 and "parity ok" in res.output, res.output
    res = run(main, ["onnx", str(ckpt), "--tasks", "8", "-o", str(out)])
    assert res.exit_code == 1 and res.output.startswith("error:") and "--force" in res.output
    res = run(main, ["onnx", str(ckpt), "--tasks", "3", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "below the checkpoint's 5 tasks" in res.output
    res = run(main, ["onnx", str(ckpt), "--tasks", "8", "--batch", "zero"])
    assert res.exit_code == 2
    res = run(main, ["add-task", str(out), str(ckpt)])
    assert res.exit_code == 0 and "already holds" in res.output


def test_bench_command_runs(ckpt):
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "--ckpt",
            str(ckpt),
            "--tasks",
            "1,5",
            "--batch",
            "2",
            "--rounds",
            "1",
            "--eager-max-tasks",
            "1",
            "--eager-rounds",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "T=  5 batch 2: artifact / backbone" in res.output and "eager skipped" in res.output
