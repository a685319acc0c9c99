"""Import of checkpoints saved by the reference implementation."""

import pytest
import refmath
import torch
from click.testing import CliRunner

from care_export.checkpoint.format import load_checkpoint
from care_export.checkpoint.official import convert_state_dict
from care_export.cli import main
from runtime.errors import CheckpointError


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_import_official_cli_matches_reference_math(tmp_path, wrapper):
    sd = refmath.make_reference_state(dim=32, depth=2, task_classes=(20, 3, 3, 3, 3), seed=5)
    path = tmp_path / "care.pth"
    torch.save(sd if wrapper is None else {wrapper: sd, "epoch": 3}, path)
    res = CliRunner().invoke(
        main, ["import-official", str(path), "-o", str(tmp_path / "ckpt"), "-M", "2", "-K", "3", "--num-heads", "2"]
    )
    assert res.exit_code == 0, res.output
    model, manifest = load_checkpoint(tmp_path / "ckpt")
    assert [t["classes"] for t in manifest["tasks"]] == [20, 3, 3, 3, 3]
    assert manifest["brmoe"] == {"topk_routers": 2, "topk_experts": 3, "expert_dim": 4, "shared_dim": 8, "dropout": 0.1}
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want, want_routing = refmath.forward(sd, images, M=2, K=3, heads=2)
    with torch.no_grad():
        got, routing = model.forward_with_routing(images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for block, r in enumerate(routing):
        for b in range(16):
            assert tuple(r.tasks[b].tolist()) == want_routing[block][b][0]


def test_unmappable_key_is_refused():
    sd = refmath.make_reference_state(task_classes=(10, 3))
    sd["backbone.adapter.adapter_layer0.gate.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="cannot map reference key backbone.adapter.adapter_layer0.gate.weight"):
        convert_state_dict(sd, num_heads=2)


def test_inconsistent_shapes_are_refused():
    sd = refmath.make_reference_state(task_classes=(10, 3))
    sd["backbone.adapter.adapter_layer1.router.1.weight"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match="routers.1.weight has shape"):
        convert_state_dict(sd, num_heads=2)


def test_missing_tensor_is_refused():
    sd = refmath.make_reference_state(task_classes=(10, 3))
    del sd["backbone.adapter.adapter_layer1.latent_head.1.1.bias"]
    with pytest.raises(CheckpointError, match="lacks weights for moe.1.perceptors.1.fc.bias"):
        convert_state_dict(sd, num_heads=2)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a zip file")
    res = CliRunner().invoke(main, ["import-official", str(bad), "-o", str(tmp_path / "ckpt")])
    assert res.exit_code == 1
    assert "not a readable PyTorch checkpoint" in res.output
    assert not (tmp_path / "ckpt").exists()
