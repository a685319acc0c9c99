"""Fixtures shared by the calibration tests. The PyTorch side is imported inside the fixtures, so
this file also loads where only the runtime is installed (make test-runtime)."""

import pytest
from helpers import CALIB_BACKBONE, CALIB_CAPACITY


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-task model on the built-in dataset: a small ViT pre-trained on other built-in classes,
    then CaRE; exported whole and after its first two tasks (for growth)."""
    from care_export.export.writer import export_artifact
    from care_export.training.continual import train_sequence
    from care_export.training.pretrain import PretrainConfig, pretrained_backbone
    from care_export.training.task import TrainConfig
    from runtime.preprocess import Preprocessing

    d = tmp_path_factory.mktemp("calib")
    weights = pretrained_backbone(
        PretrainConfig(backbone=CALIB_BACKBONE, classes=40, images_per_class=24, epochs=3),
        cache_dir=d / "cache",
        progress=False,
    )
    ckpt = train_sequence(
        d / "ckpt",
        builtin=dict(num_classes=15, train_per_class=16, test_per_class=20),
        init_cls=5,
        increment=5,
        tasks=3,
        backbone=CALIB_BACKBONE,
        weights=str(weights),
        cfg=TrainConfig(epochs=2, ca_epochs=1),
        preprocessing=Preprocessing.for_input(32, (0.5,) * 3, (0.5,) * 3),
        progress=False,
    )
    export_artifact(ckpt, d / "fp32", CALIB_CAPACITY)
    export_artifact(ckpt, d / "fp32-2", CALIB_CAPACITY, tasks=2)
    return {"dir": d, "ckpt": ckpt, "fp32": d / "fp32", "fp32-2": d / "fp32-2"}
