"""Preprocessing in numpy/PIL equals torchvision's Resize + CenterCrop + ToTensor + Normalize,
and bad input is refused with one clear line."""

import numpy as np
import pytest
from PIL import Image

from runtime.errors import InputError
from runtime.preprocess import Preprocessing, to_input

PREP = Preprocessing(32, 36, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def torchvision_reference(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    from torchvision import transforms as T

    mode = getattr(T.InterpolationMode, prep.interpolation.upper())
    tf = T.Compose(
        [
            T.Resize(prep.resize, interpolation=mode),
            T.CenterCrop(prep.input_size),
            T.ToTensor(),
            T.Normalize(prep.mean, prep.std),
        ]
    )
    return tf(img).numpy()


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("hw", [(32, 32), (48, 64), (64, 40), (17, 90), (36, 37), (200, 150), (20, 20)])
def test_matches_torchvision(hw, interpolation):
    prep = Preprocessing(32, 36, interpolation, PREP.mean, PREP.std)
    arr = random_image(*hw, seed=hw[0] * 1000 + hw[1])
    ours = to_input(arr, prep)
    ref = torchvision_reference(Image.fromarray(arr), prep)
    assert ours.shape == (1, 3, 32, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[0], ref, rtol=0, atol=1e-6)


def test_crop_larger_than_resized_image_pads_like_torchvision():
    prep = Preprocessing(32, 29, "bicubic", PREP.mean, PREP.std)  # resize below the crop: zero padding
    arr = random_image(29, 40, seed=3)
    np.testing.assert_allclose(to_input(arr, prep)[0], torchvision_reference(Image.fromarray(arr), prep), atol=1e-6)


def test_every_input_kind_gives_the_same_batch(tmp_path):
    arrs = [random_image(40, 50, seed=i) for i in range(3)]
    paths = []
    for i, a in enumerate(arrs):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(a).save(paths[-1])
    expected = np.concatenate([to_input(a, PREP) for a in arrs])
    assert expected.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(to_input(np.stack(arrs), PREP), expected)  # NHWC batch
    np.testing.assert_array_equal(to_input(arrs, PREP), expected)  # list of HWC
    np.testing.assert_array_equal(to_input([Image.fromarray(a) for a in arrs], PREP), expected)
    np.testing.assert_array_equal(to_input(paths, PREP), expected)
    np.testing.assert_array_equal(to_input([str(p) for p in paths], PREP), expected)
    np.testing.assert_array_equal(to_input([paths[0], arrs[1], Image.fromarray(arrs[2])], PREP), expected)
    np.testing.assert_array_equal(to_input(expected, PREP), expected)  # float NCHW passes through
    np.testing.assert_array_equal(to_input(list(expected), PREP), expected)  # list of float CHW


def test_grey_and_rgba_images_become_rgb():
    grey = Image.fromarray(random_image(40, 40)[..., 0], mode="L")
    np.testing.assert_allclose(to_input(grey, PREP)[0], torchvision_reference(grey.convert("RGB"), PREP), atol=1e-6)
    rgba = Image.fromarray(np.dstack([random_image(40, 40), np.full((40, 40), 255, np.uint8)]), mode="RGBA")
    assert to_input(rgba, PREP).shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32), np.uint8), "rank 2"),
        (np.zeros((2, 2, 32, 32, 3), np.uint8), "rank 5"),
        (np.zeros((32, 32, 4), np.uint8), "3 channels"),
        (np.zeros((1, 32, 32, 1), np.uint8), "3 channels"),
        (np.zeros((1, 32, 32, 3), np.int32), "dtype int32"),
        (np.zeros((1, 3, 32, 32), np.float64), "dtype float64"),
        (np.zeros((1, 32, 32, 3), np.float32), "float input must be NCHW"),
        (np.zeros((1, 3, 24, 24), np.float32), "float input must be NCHW"),
        (np.zeros((0, 3, 32, 32), np.float32), "empty batch"),
        (np.zeros((0, 32, 32, 3), np.uint8), "empty batch"),
        ([], "empty batch"),
        (42, "got int"),
        ([np.zeros((32, 32, 3), np.uint8), "nope.png"], "image not found: nope.png"),
    ],
)
def test_bad_input_is_one_clear_line(bad, message):
    with pytest.raises(InputError, match=message) as err:
        to_input(bad, PREP)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_pixels_are_refused(value):
    x = np.zeros((2, 3, 32, 32), np.float32)
    x[1, 2, 3, 4] = value
    with pytest.raises(InputError, match="1 pixel values are NaN or Inf"):
        to_input(x, PREP)


def test_corrupt_image_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError, match="cannot read image .*bad.jpg"):
        to_input(bad, PREP)


def test_bad_preprocessing_entry():
    with pytest.raises(InputError, match="unknown interpolation"):
        Preprocessing.from_dict(
            {"input_size": 32, "resize": 36, "interpolation": "cubic-ish", "mean": [0] * 3, "std": [1] * 3}
        )
