"""The baselines train the parts they name, and only those, with CaRE's schedule and alignment."""

import torch
from click.testing import CliRunner
from helpers import TINY

from care_export.checkpoint.format import load_checkpoint
from care_export.cli import main
from care_export.model.brmoe import BRMoE
from care_export.model.care_vit import CareViT
from care_export.model.config import MoEConfig
from care_export.training.baselines import trainable_parts
from care_export.training.continual import resume_sequence, train_sequence
from care_export.training.task import TrainConfig
from runtime.checkpoint_files import read_checkpoint_manifest

# 16 training images per class: 4 SGD steps per epoch at batch 16 (8 gave 2, too few for the head of a
# random backbone to beat chance reliably once the augmentation's random stream changed).
DATA = dict(num_classes=8, train_per_class=16, test_per_class=4)


def run(directory, method, tasks=2):
    return train_sequence(
        directory,
        data="builtin-shift",
        builtin=DATA,
        init_cls=4,
        increment=4,
        tasks=tasks,
        backbone=TINY,
        weights=None,
        cfg=TrainConfig(epochs=2, lr=0.05, ca_epochs=1, method=method),
        progress=False,
    )


def test_frozen_trains_the_head_alone_and_adds_nothing_to_the_backbone(tmp_path):
    ckpt = run(tmp_path / "f", "frozen")
    model, _ = load_checkpoint(ckpt)
    for m in model.moe:
        assert all(float(p.abs().sum()) == 0 for p in [m.shared.scale, *(e.scale for e in m.experts)])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.forward_backbone(x)))
    manifest = read_checkpoint_manifest(ckpt)
    assert manifest["training"]["method"] == "frozen"
    metrics = manifest["metrics"]
    assert len(metrics["top1"]) == 2 and metrics["top1"][0] > 100 / 4  # the head learned task 0


def test_shared_adapter_fine_tunes_one_adapter_through_all_tasks(tmp_path, monkeypatch):
    run(tmp_path / "s", "shared-adapter", tasks=1)
    before, _ = load_checkpoint(tmp_path / "s")
    anchored = []
    anchor = BRMoE.anchor_shared
    monkeypatch.setattr(
        BRMoE, "anchor_shared", lambda self, enabled=True: (anchored.append(enabled), anchor(self, enabled))
    )
    resume_sequence(tmp_path / "s", progress=False)
    after, _ = load_checkpoint(tmp_path / "s")
    assert anchored and not any(anchored)  # no pull back to a snapshot, unlike CaRE's later tasks
    for b, a in zip(before.moe, after.moe):
        assert all(float(e.scale.abs().sum()) == 0 for e in a.experts)  # task experts never train
        assert all(torch.equal(p, q) for p, q in zip(b.routers[0].parameters(), a.routers[0].parameters()))
        assert not all(torch.equal(p, q) for p, q in zip(b.shared.parameters(), a.shared.parameters()))
    assert read_checkpoint_manifest(tmp_path / "s")["metrics"]["top1"][0] > 100 / 4
    # The trained adapter's output reaches the features: they are no longer the plain backbone's.
    assert all(float(m.shared.scale.abs().sum()) > 0 for m in after.moe)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(after.forward_features(x), after.forward_backbone(x), atol=1e-6)


def test_trainable_parts_per_method():
    model = CareViT(TINY, MoEConfig())
    model.add_task(3)
    model.add_task(3)
    ids = {
        meth: {id(p) for part in trainable_parts(model, 1, meth) for p in part.parameters()}
        for meth in ("care", "frozen", "shared-adapter")
    }
    head = {id(p) for p in model.head.parameters()}
    assert ids["frozen"] == head
    assert ids["shared-adapter"] == head | {id(p) for m in model.moe for p in m.shared.parameters()}
    assert ids["shared-adapter"] < ids["care"]
    assert not ids["care"] & {id(p) for m in model.moe for p in m.experts[0].parameters()}


def test_cli_method_and_builtin_shift(tmp_path):
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model(TINY.name, pretrained=False, **TINY.timm_kwargs())
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    ckpt = tmp_path / "ckpt"
    args = [
        "train",
        "-o",
        str(ckpt),
        "--data",
        "builtin-shift",
        "--method",
        "shared-adapter",
        "--builtin-classes",
        "8",
        "--builtin-train",
        "4",
        "--builtin-test",
        "2",
        "--init-cls",
        "4",
        "--increment",
        "4",
        "--tasks",
        "1",
        "--epochs",
        "2",
        "--quiet",
        "--backbone",
        TINY.name,
        "--img-size",
        "32",
        "--patch-size",
        "8",
        "--depth",
        "2",
        "--backbone-weights",
        str(tmp_path / "vit.safetensors"),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    manifest = read_checkpoint_manifest(ckpt)
    assert manifest["training"]["method"] == "shared-adapter"
    assert manifest["sequence"]["data"]["kind"] == "builtin-shift"
    res = CliRunner().invoke(main, ["train", "--resume", str(ckpt), "--method", "care"])
    assert res.exit_code == 2 and "fixed by the checkpoint" in res.output
    res = CliRunner().invoke(main, ["train", "--resume", str(ckpt), "--quiet"])
    assert res.exit_code == 0, res.output
    assert read_checkpoint_manifest(ckpt)["training"]["method"] == "shared-adapter"
    res = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "x"), "--method", "nope"])
    assert res.exit_code == 2
