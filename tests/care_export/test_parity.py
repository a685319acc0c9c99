"""FP32 parity on CPU: the exported graph (ONNX Runtime, every optimisation on) against the PyTorch
reference forward, with tiny ViTs at capacity 301: identical routing and top-1 on 256 random
inputs, |dlogit| <= 1e-4 (docs/DESIGN.md, "Parity")."""

import numpy as np
import pytest
from helpers import make_artifact, make_checkpoint

from care_export.export.parity import compare, ort_session, random_images, run_artifact, run_parity
from runtime.errors import AtolError, RoutingError, ShapeError

SAMPLES = 256


def check_parity(tmp_path, task_classes, M=2, K=3, capacity=301, **export_kw):
    ckpt = make_checkpoint(tmp_path / "ckpt", task_classes, M=M, K=K)
    art = make_artifact(ckpt, tmp_path / "art", capacity, **export_kw)
    report = run_parity(ckpt, art, samples=SAMPLES, batch=64)
    report.check()
    assert report.max_abs <= 1e-4 and report.top1 == 1.0 and report.routing == [1.0, 1.0]
    return art


@pytest.mark.parametrize("tasks", [1, 2, 3, 10, 60])
def test_parity_at_capacity_301(tmp_path, tasks):
    """T=1 and T=2 are T < M and T < K, T=3 is T = K, T=10 and 60 are K < T."""
    art = check_parity(tmp_path, [10] + [3] * (tasks - 1))
    if tasks >= 3:  # the routing under test is input-dependent, not one fixed choice
        _, t, e = run_artifact(ort_session(art / "model.onnx"), random_images(64, 32, seed=1), 64)
        assert len({(a.tobytes(), b.tobytes()) for a, b in zip(t, e)}) > 8


@pytest.mark.parametrize(
    "task_classes,M,K",
    [
        ([100] + [3] * 9, 2, 3),  # B100-Inc3 shapes: a first task much larger than the slots
        ([10] * 10, 3, 2),  # K < M
        ([10] * 4, 1, 1),
        ([10] * 3, 4, 5),  # T < M and T < K with larger M, K
        ([10, 3, 3, 2], 2, 3),  # a last task smaller than the slot width (remainder)
    ],
)
def test_parity_routing_settings(tmp_path, task_classes, M, K):
    check_parity(tmp_path, task_classes, M, K)


def test_parity_fixed_batch(tmp_path):
    check_parity(tmp_path, [10, 3, 3, 3], batch=48)  # 256 = 5 full batches + a padded one


def test_parity_opset_20(tmp_path):
    check_parity(tmp_path, [10, 3, 3, 3], opset=20)  # the Gelu op instead of its erf form


def test_parity_reports_failures():
    logits = np.zeros((4, 5))
    tasks = np.tile(np.array([[[0, 1]]]), (4, 2, 1))
    experts = np.tile(np.array([[[[0, -1, -1], [0, 1, -1]]]]), (4, 2, 1, 1))
    ref = (logits, tasks, experts)
    compare(ref, (logits + 1e-5, tasks[:, :, ::-1], experts[:, :, ::-1]), 1e-4).check()  # order does not matter
    with pytest.raises(AtolError):
        compare(ref, (logits + np.eye(4, 5) * 1e-3, tasks, experts), 1e-4).check()
    flipped = experts.copy()
    flipped[2, 1, 1, 1] = 2
    with pytest.raises(RoutingError, match="block 1"):
        compare(ref, (logits, tasks, flipped), 1e-4).check()
    with pytest.raises(ShapeError):
        compare(ref, (logits[:, :4], tasks, experts), 1e-4)


def test_parity_reports_the_agreeing_samples_apart_and_holds_every_sample_to_atol():
    """A sample routed differently has its logits from other experts: the report gives the max
    |dlogit| over the samples routed alike apart, and ``check(min_agree)`` (golden records of
    FP16 / INT8 artifacts) still holds every sample to atol."""
    logits = np.zeros((4, 5))
    tasks = np.tile(np.array([[[0, 1]]]), (4, 2, 1))
    experts = np.tile(np.array([[[[0, -1, -1], [0, 1, -1]]]]), (4, 2, 1, 1))
    flipped = experts.copy()
    flipped[2, 0, 1, 1] = 2
    moved = logits.copy()
    moved[2] += 0.5  # the flipped sample
    report = compare((logits, tasks, experts), (moved, tasks, flipped), 1e-4)
    assert report.mismatched == [2] and report.max_abs == 0.5 and report.max_abs_agreeing == 0.0
    with pytest.raises(RoutingError):
        report.check()
    with pytest.raises(AtolError):
        report.check(min_agree=0.7)
    compare((logits, tasks, experts), (logits, tasks, flipped), 1e-4).check(min_agree=0.7)
