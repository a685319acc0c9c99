"""The built-in shifted sequence: deterministic, disjoint from pre-training, one domain per task."""

import numpy as np
import pytest

from care_export.data.builtin import PRETRAIN_FIRST_CLASS, SHAPES, TEXTURES, BuiltinSource
from care_export.data.shift import SHIFT_SHAPES, SHIFT_TEXTURES, ShiftedSource
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


def test_each_task_of_the_sequence_is_one_domain():
    seq = TaskSequence.build(40, 16, 8, seed=5)
    src = open_source("builtin-shift", sequence=dict(init_cls=16, increment=8, order_seed=5), num_classes=40)
    for t in range(seq.num_tasks):
        assert {src.domain_of[seq.order[g]] for g in seq.classes(t)} == {t}
    # Colour tells the task: every class of a task is painted from its domain's palette.
    for t in range(seq.num_tasks):
        img = pixels(src, "train", seq.order[seq.classes(t)[0]], 0).reshape(-1, 3) / 255.0
        own = np.abs(img[:, None] - src.domains[t].palette[None]).sum(-1).min(1).mean()
        foreign = np.abs(img[:, None] - src.domains[(t + 1) % seq.num_tasks].palette[None]).sum(-1).min(1).mean()
        assert own < foreign


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
