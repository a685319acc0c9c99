"""The checkpoint directory: round trip, growth, and clear errors for damaged files."""

import json

import pytest
import torch
from click.testing import CliRunner

from care_export.checkpoint import format as ck
from care_export.checkpoint.format import load_checkpoint, save_checkpoint
from care_export.checkpoint.synth import randomize_task, synth_model
from care_export.cli import main
from care_export.model.config import MoEConfig, backbone_config
from runtime.checkpoint_files import read_checkpoint_manifest
from runtime.errors import CheckpointError

CFG = backbone_config("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)


@pytest.fixture()
def ckpt(tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "synth-ckpt",
            "-o",
            str(tmp_path / "ckpt"),
            "--backbone",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--patch-size",
            "8",
            "--depth",
            "2",
            "--init-cls",
            "12",
            "--increment",
            "3",
            "--tasks",
            "4",
            "--seed",
            "7",
        ],
    )
    assert res.exit_code == 0, res.output
    return tmp_path / "ckpt"


def images(n=8, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_round_trip_gives_same_outputs(tmp_path):
    model = synth_model(CFG, MoEConfig(), [12, 3, 3, 3], seed=1)
    save_checkpoint(model, tmp_path / "c", class_names=[f"n{i}" for i in range(21)])
    loaded, manifest = load_checkpoint(tmp_path / "c")
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert manifest["classes"]["names"][20] == "n20"
    assert loaded.task_classes == [12, 3, 3, 3]


def test_growth_keeps_older_files_byte_identical(ckpt):
    before = {p.name: p.read_bytes() for p in ckpt.glob("*.safetensors")}
    model, _ = load_checkpoint(ckpt)
    x = images()
    with torch.no_grad():
        old_out = model(x)
    model.add_task(3)
    randomize_task(model, 4, torch.Generator().manual_seed(9))
    model.eval()
    save_checkpoint(model, ckpt)
    after = {p.name: p.read_bytes() for p in ckpt.glob("*.safetensors")}
    for name, data in before.items():
        if name.startswith("task-") or name == "backbone.safetensors":
            assert after[name] == data, name
    assert "task-0004.safetensors" in after
    # The head grew and was rewritten under a new name; the old one is gone.
    assert len([n for n in after if n.startswith("head-")]) == 1
    grown, manifest = load_checkpoint(ckpt)
    assert len(manifest["tasks"]) == 5
    with torch.no_grad():
        assert torch.equal(grown(x), model(x))
        # The first four tasks alone are still the model we had.
        old_again, _ = load_checkpoint(ckpt, tasks=4)
        assert torch.equal(old_again(x)[:, :21], old_out)


def test_failed_save_leaves_checkpoint_loadable(ckpt, monkeypatch):
    model, _ = load_checkpoint(ckpt)
    model.add_task(3)
    manifest_before = (ckpt / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_content_named", boom)
    with pytest.raises(OSError):
        save_checkpoint(model, ckpt)
    assert (ckpt / "manifest.json").read_bytes() == manifest_before
    loaded, manifest = load_checkpoint(ckpt)
    assert len(manifest["tasks"]) == 4


def test_missing_file(ckpt):
    (ckpt / "task-0002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"task-0002.safetensors: file missing"):
        load_checkpoint(ckpt)


def test_truncated_file(ckpt):
    p = ckpt / "task-0001.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"task-0001.safetensors: truncated"):
        load_checkpoint(ckpt)


def test_corrupt_file(ckpt):
    p = ckpt / "backbone.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"backbone.safetensors: corrupt"):
        load_checkpoint(ckpt)


def test_unreadable_file_when_digest_matches(ckpt):
    """A file that is not safetensors at all, with a manifest rewritten to match it."""
    p = ckpt / "task-0003.safetensors"
    p.write_bytes(b"\x00" * 64)
    m = json.loads((ckpt / "manifest.json").read_text())
    m["tasks"][3].update(bytes=64, sha256=ck.sha256_file(p))
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"task-0003.safetensors: unreadable safetensors file"):
        load_checkpoint(ckpt)


def test_wrong_shape(ckpt):
    m = json.loads((ckpt / "manifest.json").read_text())
    m["tasks"][2]["classes"] = 4  # the stored perceptor has 3 classes
    m["classes"]["names"].insert(sum(t["classes"] for t in m["tasks"][:2]) + 3, "extra")  # names still agree
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"task-0002.safetensors: blocks.0.perceptors.fc.weight has shape"):
        load_checkpoint(ckpt)


def test_newer_format_version(ckpt):
    m = json.loads((ckpt / "manifest.json").read_text())
    m["format_version"] = ck.FORMAT_VERSION + 1
    (ckpt / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="newer than this reader"):
        read_checkpoint_manifest(ckpt)


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "manifest missing"),
        ("{not json", "not valid JSON"),
        ('{"format": "other"}', "not a care-export checkpoint"),
    ],
)
def test_bad_manifest(ckpt, content, match):
    mp = ckpt / "manifest.json"
    if content is None:
        mp.unlink()
    else:
        mp.write_text(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt)


def test_cli_shows_one_line_error(tmp_path, ckpt):
    (ckpt / "task-0000.safetensors").unlink()
    res = CliRunner().invoke(main, ["info", str(tmp_path / "nothing")])
    assert res.exit_code == 1
    assert res.output.strip().count("\n") == 0 and "checkpoint not found" in res.output


def test_synth_routing_is_not_degenerate(ckpt):
    model, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        _, routing = model.forward_with_routing(images(64))
    for r in routing:
        assert len({tuple(t) for t in r.tasks.tolist()}) > 1
        assert len({tuple(e) for e in r.experts.flatten(1).tolist()}) > 1
    for m in model.moe:
        assert all(e.scale.abs().min() > 0 for e in m.experts)


def test_check_state_names_the_first_problem():
    import numpy as np

    from runtime.checkpoint_files import check_state

    want = {"a": (2, 3), "b": (4,)}
    check_state({"a": np.zeros((2, 3)), "b": torch.zeros(4)}, want, "w")  # numpy and torch alike
    with pytest.raises(CheckpointError, match=r"^w: lacks weights for b \(1 missing\)$"):
        check_state({"a": np.zeros((2, 3))}, want, "w")
    with pytest.raises(CheckpointError, match="w: holds weights the model cannot place, e.g. c"):
        check_state({"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1)}, want, "w")
    check_state({"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1)}, want, "w", allow_extra=True)
    with pytest.raises(CheckpointError, match=r"w: a has shape \(3, 2\), expected \(2, 3\)"):
        check_state({"a": np.zeros((3, 2)), "b": np.zeros(4)}, want, "w")
