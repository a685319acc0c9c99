"""Task sequences (the reference's split and order arithmetic), the built-in dataset, image folders
and the transforms."""

import numpy as np
import pytest
import torch
from PIL import Image

from care_export.data.builtin import MAX_CLASSES, PRETRAIN_FIRST_CLASS, BuiltinSource
from care_export.data.sources import (
    ImageFolderSource,
    LabelledImages,
    TaskSequence,
    class_order,
    eval_transform,
    task_split,
    train_transform,
)
from runtime.errors import CareError
from runtime.preprocess import Preprocessing


# ---------------------------------------------------------------------- split and order
def reference_split(n, init_cls, increment):
    """The reference DataManager's loop, restated."""
    incs = [init_cls]
    while sum(incs) + increment < n:
        incs.append(increment)
    if n - sum(incs) > 0:
        incs.append(n - sum(incs))
    return incs


@pytest.mark.parametrize(
    "n,init,inc,tasks",
    [
        (1000, 100, 3, 301),
        (100, 10, 10, 10),
        (1000, 10, 10, 100),
        (1000, 100, 6, 151),
        (1000, 5, 5, 200),
        (20, 10, 10, 2),
    ],
)
def test_split_task_counts(n, init, inc, tasks):
    sizes = task_split(n, init, inc)
    assert len(sizes) == tasks and sum(sizes) == n
    assert sizes[0] == init and set(sizes[1:]) == {inc}


def test_split_remainder_forms_last_task():
    assert task_split(25, 10, 4) == [10, 4, 4, 4, 3]
    assert task_split(23, 10, 4) == [10, 4, 4, 4, 1]
    assert task_split(26, 10, 4) == [10, 4, 4, 4, 4]  # an exact fit: the last increment is the remainder
    for n, init, inc in [(25, 10, 4), (23, 10, 4), (37, 7, 5), (7, 7, 3), (101, 100, 3)]:
        assert task_split(n, init, inc) == reference_split(n, init, inc)


def test_split_rejects_bad_counts():
    with pytest.raises(CareError, match="init-cls"):
        task_split(10, 11, 1)
    with pytest.raises(CareError):
        task_split(10, 5, 0)


def test_class_order_is_the_reference_permutation_and_leaves_numpy_alone():
    np.random.seed(5)
    expected_next = np.random.rand()
    np.random.seed(1993)
    reference = np.random.permutation(100).tolist()
    np.random.seed(5)
    assert class_order(100, 1993) == reference
    assert np.random.rand() == expected_next  # global state untouched
    assert class_order(100, 1994) != reference
    assert class_order(5, 1993, shuffle=False) == [0, 1, 2, 3, 4]


def test_task_sequence_ranges_and_round_trip():
    seq = TaskSequence.build(25, 10, 4, seed=3)
    assert seq.num_tasks == 5
    assert list(seq.classes(0)) == list(range(10)) and list(seq.classes(4)) == [22, 23, 24]
    assert list(seq.seen(1)) == list(range(14))
    assert sorted(seq.order) == list(range(25))
    assert TaskSequence.from_dict(seq.to_dict()) == seq


# ---------------------------------------------------------------------- built-in dataset
def pixels(src, split, label, index):
    return np.asarray(src.load(split, (label, index)))


def test_builtin_is_deterministic():
    a = BuiltinSource(30, seed=4)
    b = BuiltinSource(30, seed=4)
    for label, index in [(0, 0), (17, 5), (29, 59)]:
        assert np.array_equal(pixels(a, "train", label, index), pixels(b, "train", label, index))
        assert np.array_equal(pixels(a, "test", label, index % 20), pixels(b, "test", label, index % 20))
    assert a.class_names == b.class_names
    other = BuiltinSource(30, seed=5)
    assert not np.array_equal(pixels(a, "train", 3, 0), pixels(other, "train", 3, 0))
    # Images differ from one another, and test images are not training images.
    assert not np.array_equal(pixels(a, "train", 3, 0), pixels(a, "train", 3, 1))
    assert not np.array_equal(pixels(a, "train", 3, 0), pixels(a, "test", 3, 0))


def test_builtin_sizes_and_limits():
    src = BuiltinSource(3, train_per_class=4, test_per_class=2, image_size=48)
    assert src.load("train", (2, 3)).size == (48, 48)
    assert len(src.samples("train", [0, 2])) == 8 and len(src.samples("test", [1])) == 2
    assert BuiltinSource(MAX_CLASSES, train_per_class=1, test_per_class=1).num_classes == MAX_CLASSES
    with pytest.raises(CareError, match="1000 classes"):
        BuiltinSource(MAX_CLASSES + 1)


def test_pretraining_classes_are_not_sequence_classes():
    seq = BuiltinSource(MAX_CLASSES, train_per_class=1, test_per_class=1)
    pre = BuiltinSource(50, first_class=PRETRAIN_FIRST_CLASS, train_per_class=1, test_per_class=1)
    assert not set(seq.class_names) & set(pre.class_names)
    styles = {(s.shape, s.texture, tuple(s.fg.round(6)), tuple(s.center.round(6))) for s in seq.styles}
    assert not any((s.shape, s.texture, tuple(s.fg.round(6)), tuple(s.center.round(6))) in styles for s in pre.styles)


def test_builtin_classes_are_distinct_but_not_trivial():
    """Nearest class mean on raw pixels: far above chance (classes differ), far from perfect
    (images of a class vary, classes overlap). The data is deterministic, so is the figure."""
    n = 20
    src = BuiltinSource(n, train_per_class=20, test_per_class=10)

    def stack(split, k):
        return np.stack([[pixels(src, split, c, i).ravel() / 255.0 for i in range(k)] for c in range(n)])

    train, test = stack("train", 20), stack("test", 10)
    means = train.mean(1)
    dist = ((test[:, :, None, :] - means[None, None]) ** 2).sum(-1)
    acc = (dist.argmin(-1) == np.arange(n)[:, None]).mean()
    assert 3 / n < acc < 0.9, acc


# ---------------------------------------------------------------------- image folders
def write_images(folder, classes, per_class, size=20):
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size + i), (10 * i, 100, 200)).save(folder / c / f"{i}.png")


def test_image_folder_split_per_class(tmp_path):
    write_images(tmp_path, ["cat", "ant", "bee"], 10)
    src = ImageFolderSource(tmp_path)
    assert src.class_names == ["ant", "bee", "cat"]
    train, test = src.samples("train", [0, 1, 2]), src.samples("test", [0, 1, 2])
    assert len(train) == 24 and len(test) == 6
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert ImageFolderSource(tmp_path).samples("test", [2]) == src.samples("test", [2])  # stable
    assert src.load("train", train[0][0]).mode == "RGB"


def test_image_folder_with_train_and_test(tmp_path):
    write_images(tmp_path / "train", ["a", "b"], 3)
    write_images(tmp_path / "test", ["a", "b"], 2)
    src = ImageFolderSource(tmp_path)
    assert src.class_names == ["a", "b"]
    assert len(src.samples("train", [1])) == 3 and len(src.samples("test", [1])) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(CareError, match="not found"):
        ImageFolderSource(tmp_path / "nope")
    with pytest.raises(CareError, match="no class folders"):
        ImageFolderSource(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CareError, match="no images"):
        ImageFolderSource(tmp_path)
    write_images(tmp_path / "x" / "train", ["a"], 2)
    write_images(tmp_path / "x" / "test", ["b"], 2)
    with pytest.raises(CareError, match="different class folders"):
        ImageFolderSource(tmp_path / "x")


# ---------------------------------------------------------------------- transforms
def test_transforms_follow_the_preprocessing():
    pre = Preprocessing.for_input(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    img = Image.new("RGB", (50, 40), (255, 255, 255))
    x = eval_transform(pre)(img)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25
    torch.manual_seed(0)
    assert train_transform(pre)(img).shape == (3, 32, 32)


def test_labelled_images_use_global_ids():
    src = BuiltinSource(6, train_per_class=2, test_per_class=1)
    seq = TaskSequence.build(6, 2, 2, seed=0)
    data = LabelledImages(src, "train", seq.order, seq.classes(1), eval_transform(Preprocessing.for_input(32)))
    assert sorted({y for _, y in data.samples}) == [2, 3]
    x, y = data[0]
    item, _ = data.samples[0]
    assert item[0] == seq.order[y]  # the source class behind global id y
    assert x.shape == (3, 32, 32)
