"""Artifacts above 2 GB (protobuf's limit on one ONNX file): weights stay external data, the full
ONNX check passes, ONNX Runtime and runtime.Session run them, and parity holds. A ViT-Ti with
capacity 2400 has a 2.9 GiB slot file, sparse on disk: cheap to write and to test."""

import numpy as np
import onnx
import pytest
from helpers import make_artifact, make_checkpoint

from care_export.export.parity import random_images, run_parity
from runtime import Session

CAPACITY = 2400


@pytest.mark.slow
def test_artifact_above_2gb(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", [10, 3, 3], depth=12)
    art = make_artifact(ckpt, tmp_path / "art", CAPACITY)
    total = sum(p.stat().st_size for p in art.iterdir())
    assert total > 2**31, f"the artifact is only {total / 2**30:.2f} GiB"
    assert (art / "model.onnx").stat().st_size < 2**20

    onnx.checker.check_model(str(art / "model.onnx"), full_check=True)
    report = run_parity(ckpt, art, samples=16, batch=16)
    report.check()
    assert report.top1 == 1.0 and min(report.routing) == 1.0

    with Session(art) as session:
        assert session.capacity == CAPACITY and session.num_tasks == 3
        x = random_images(4, 32, seed=3)
        np.testing.assert_array_equal(session.predict(x).classes[:, 0], session.logits(x).argmax(1))
