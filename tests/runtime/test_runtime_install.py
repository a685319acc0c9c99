"""The runtime install (``pip install care-export``, no PyTorch) runs, verifies, grows and proves a
deployed artifact: the committed tiny model of ``tests/tiny_artifact.py``.

These tests run in both environments: ``make test`` (everything installed) and ``make
test-runtime`` (the base install alone, ``CARE_RUNTIME_ONLY=1``)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_artifact import DATA, TASK_CLASSES

from care_export.cli import main
from runtime.artifact import Artifact

RUNTIME_ONLY = os.environ.get("CARE_RUNTIME_ONLY") == "1"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def art(tmp_path):
    """A writable copy of the committed 3-task artifact."""
    return shutil.copytree(DATA / "artifact", tmp_path / "artifact")


def test_this_environment_is_the_one_it_claims():
    # Guards the torch-free job: it must really run without PyTorch.
    has_torch = importlib.util.find_spec("torch") is not None
    assert not (RUNTIME_ONLY and has_torch), "CARE_RUNTIME_ONLY=1 but torch is importable"


def test_the_committed_artifact_verifies_and_matches_its_golden_record(art):
    assert cli("verify", art).exit_code == 0
    r = cli("parity", art, "--golden", DATA / "golden-3.npz", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["top1"] == 1.0 and report["max_abs"] <= 1e-3


def test_growth_without_pytorch_gives_the_exported_four_task_model(art):
    r = cli("add-task", art, DATA / "ckpt")
    assert r.exit_code == 0, r.output
    assert Artifact(art).num_tasks == len(TASK_CLASSES)
    r = cli("parity", art, "--golden", DATA / "golden-4.npz", "--json")
    assert r.exit_code == 0, r.output
    # The 3-task record no longer describes the grown artifact.
    assert cli("parity", art, "--golden", DATA / "golden-3.npz").exit_code == 1


def test_run_and_eval_on_image_files(art, tmp_path):
    names = Artifact(art).manifest["classes"]["names"]
    rng = np.random.default_rng(0)
    for name in names[:2]:
        (tmp_path / "data" / name).mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{k}.png")
    r = cli("run", art, tmp_path / "data" / names[0] / "0.png", "--json", "-k", "2")
    assert r.exit_code == 0, r.output
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(line["top"]) == 2 and all(names[c["class"]] == c["name"] for c in line["top"])
    r = cli("eval", art, tmp_path / "data", "--split", "all", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["images"] == 4


def test_the_committed_tiny_model_is_what_this_exporter_writes(tmp_path):
    """A change of the exporter or the artifact format shows here: rebuild the fixture with
    ``python tests/tiny_artifact.py`` when it is deliberate."""
    pytest.importorskip("torch")
    from tiny_artifact import build

    fresh = build(tmp_path / "tiny")
    for sub in ("ckpt", "artifact"):
        committed = {p.name: p.read_bytes() for p in (DATA / sub).iterdir()}
        written = {p.name: p.read_bytes() for p in (fresh / sub).iterdir()}
        assert committed.keys() == written.keys()
        changed = sorted(n for n in written if written[n] != committed[n])
        assert not changed, f"{sub}: {changed} differ from tests/data/tiny (run python tests/tiny_artifact.py)"
    for name in ("golden-3.npz", "golden-4.npz"):
        with np.load(DATA / name) as a, np.load(fresh / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
