"""The built-in shifted sequence: deterministic, disjoint from pre-training, one domain per task."""

import numpy as np
import pytest

from care_export.data.builtin import PRETRAIN_FIRST_CLASS, SHAPES, TEXTURES, BuiltinSource
from care_export.data.shift import SHIFT_SHAPES, SHIFT_TEXTURES, ShiftedSource, hue_rotation, render_shifted
from care_export.data.sources import TaskSequence, open_source, source_from_dict
from care_export.training.pretrain import PretrainConfig
from runtime.errors import CareError


def pixels(src, split, label, index):
    return np.asarray(src.load(split, (label, index)))


def test_shifted_source_is_deterministic_and_reopens_from_its_description():
    a = ShiftedSource(30, init_cls=10, increment=10, seed=3)
    b = source_from_dict(a.describe())
    assert isinstance(b, ShiftedSource) and b.class_names == a.class_names and b.domain_of == a.domain_of
    for label, index in [(0, 0), (17, 5), (29, 59)]:
        assert np.array_equal(pixels(a, "train", label, index), pixels(b, "train", label, index))
        assert np.array_equal(pixels(a, "test", label, index % 20), pixels(b, "test", label, index % 20))
    assert not np.array_equal(pixels(a, "train", 3, 0), pixels(a, "train", 3, 1))
    assert not np.array_equal(pixels(a, "train", 3, 0), pixels(a, "test", 3, 0))
    # A second load (from the source's cache of drawn images) gives the first load's pixels.
    assert np.array_equal(pixels(a, "train", 17, 5), pixels(b, "train", 17, 5))
    assert len(a._drawn) == 9 and ("test", 3, 0) in a._drawn
    other = ShiftedSource(30, init_cls=10, increment=10, seed=4)
    assert not np.array_equal(pixels(a, "train", 3, 0), pixels(other, "train", 3, 0))


def test_shifted_classes_are_disjoint_from_the_pretraining_classes():
    """No shape or texture kind of the pre-training classes and no class name in common."""
    assert not set(SHIFT_SHAPES) & set(SHAPES) and not set(SHIFT_TEXTURES) & set(TEXTURES)
    pre_cfg = PretrainConfig()
    pre = BuiltinSource(pre_cfg.classes, first_class=PRETRAIN_FIRST_CLASS, train_per_class=1, test_per_class=1)
    shift = ShiftedSource(1000, train_per_class=1, test_per_class=1)
    assert not set(shift.class_names) & set(pre.class_names)
    names = {n.split("-on-")[0] for n in shift.class_names} | {
        n.split("-on-")[1].split("-")[0] for n in shift.class_names
    }
    assert names == set(SHIFT_SHAPES) | set(SHIFT_TEXTURES)  # every kind is used, none of pre-training's


def test_each_task_of_the_sequence_is_one_domain_and_its_classes_differ_in_hue():
    seq = TaskSequence.build(40, 16, 8, seed=5)
    src = open_source("builtin-shift", sequence=dict(init_cls=16, increment=8, order_seed=5), num_classes=40)
    for t in range(seq.num_tasks):
        members = [seq.order[g] for g in seq.classes(t)]
        assert {src.domain_of[c] for c in members} == {t}
        # One template per task, turned by hues spread evenly over the whole circle.
        assert all(src.styles[c] is src.templates[t] for c in members)
        turns = sorted(src.hue_of[c] for c in members)
        assert np.allclose(np.diff(turns + [turns[0] + 2 * np.pi]), 2 * np.pi / len(members))


def test_a_hue_turn_keeps_the_grey_image_and_changes_the_colours():
    """Drawn with the same deviations, two hues of a template differ in colour, not in the mean of the
    channels (where nothing is clipped): what a hue-invariant backbone sees of them is the same."""
    src = ShiftedSource(10, init_cls=10, increment=10)
    style, domain = src.templates[0], src.domains[0]
    a, b = (
        render_shifted(style, domain, np.random.default_rng(1), 32, hue).astype(float) / 255
        for hue in (0.0, 2 * np.pi / 5)
    )
    inside = ((a > 0.01) & (a < 0.99)).all(-1) & ((b > 0.01) & (b < 0.99)).all(-1)
    assert inside.sum() > 100  # saturated colours clip in places
    assert np.abs(a.mean(-1) - b.mean(-1))[inside].max() < 1.5 / 255
    assert np.abs(a - b)[inside].mean() > 0.05
    grey = np.full(3, 0.3)
    assert np.allclose(hue_rotation(1.0) @ grey, grey) and np.allclose(hue_rotation(2 * np.pi), np.eye(3))


def test_shifted_source_limits():
    with pytest.raises(CareError, match="1000 classes"):
        ShiftedSource(1001)
    with pytest.raises(CareError, match="init-cls"):
        ShiftedSource(5, init_cls=10)


@pytest.mark.parametrize("kind", ["builtin-shift", "builtin"])
def test_cache_of_drawn_images_stops_at_its_room(monkeypatch, kind):
    """Both procedural sources keep drawn images up to a byte budget; past it they draw anew, the
    same pixels either way."""
    import care_export.data.drawn as drawn

    monkeypatch.setattr(drawn, "CACHE_BYTES", 3 * 32 * 32 * 2)  # room for two 32 px images
    src = ShiftedSource(4, init_cls=2, increment=2) if kind == "builtin-shift" else BuiltinSource(4)
    first = [pixels(src, "train", c, 0) for c in range(4)]
    assert len(src._drawn) == 2 and ("train", 0, 0) in src._drawn and ("train", 3, 0) not in src._drawn
    assert all(np.array_equal(f, pixels(src, "train", c, 0)) for c, f in enumerate(first))


def test_the_shifted_sequence_has_its_own_backbone_and_the_default_keeps_its_key():
    from dataclasses import asdict

    from care_export.training.pretrain import RECIPE_VERSION, SHIFT_PRETRAIN, pretrain_config

    default = PretrainConfig()
    assert pretrain_config("builtin", default.backbone) == default
    shifted = pretrain_config("builtin-shift", default.backbone)
    assert shifted == SHIFT_PRETRAIN and shifted.hue_invariance > 0 and shifted.residual_scale < 1
    assert shifted.key() != default.key()
    # Settings added after the default backbone was first cached leave its key as it was.
    import hashlib
    import json

    old = {k: v for k, v in asdict(default).items() if k not in ("hue_invariance", "residual_scale")}
    blob = json.dumps(dict(old, recipe=RECIPE_VERSION), sort_keys=True)
    assert default.key() == hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_hue_turns_and_the_residual_scale_leave_what_the_backbone_sees_alone():
    import timm
    import torch

    from care_export.model.config import backbone_config
    from care_export.training.pretrain import scale_residual_stream, turn_hue

    x = torch.rand(4, 3, 8, 8) * 0.8 - 0.4  # small enough that no turned value is clamped
    turned = turn_hue(x, torch.Generator().manual_seed(0))
    assert torch.allclose(turned.mean(1), x.mean(1), atol=1e-6) and (turned - x).abs().mean() > 0.05
    backbone = backbone_config("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2)
    torch.manual_seed(0)
    vit = timm.create_model(backbone.name, pretrained=False, **backbone.timm_kwargs()).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        scale_residual_stream(vit, 20.0)  # a residual stream as large as a trained backbone's (std ~5)
        before, stream = vit(images), vit.blocks(vit._pos_embed(vit.patch_embed(images)))
        scale_residual_stream(vit, 0.05)
        after, scaled = vit(images), vit.blocks(vit._pos_embed(vit.patch_embed(images)))
    assert torch.allclose(scaled, 0.05 * stream, atol=1e-3)
    assert torch.allclose(after, before, atol=5e-3)  # LayerNorm epsilon and rounding only


def test_pretraining_with_hue_invariance_runs_and_is_cached_under_its_own_key(tmp_path):
    from care_export.model.config import backbone_config
    from care_export.training.pretrain import pretrained_backbone

    backbone = backbone_config("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1)
    small = dict(backbone=backbone, classes=4, images_per_class=4, epochs=1, batch_size=4)
    plain = pretrained_backbone(PretrainConfig(**small), cache_dir=tmp_path, progress=False)
    hue = pretrained_backbone(
        PretrainConfig(**small, hue_invariance=1.0, residual_scale=0.5), cache_dir=tmp_path, progress=False
    )
    assert plain != hue and plain.is_file() and hue.is_file()
