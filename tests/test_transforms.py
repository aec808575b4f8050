"""Preprocessing transforms on tiny synthetic arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fedrad.common.config import load_settings
from fedrad.common.transforms import (
    IMAGE_KEY,
    LABEL_KEY,
    Compose,
    CropToSquare,
    CropToSquared,
    GaussianDenoise,
    GaussianDenoised,
    HistogramEqualize,
    HistogramEqualized,
    Resize,
    Resized,
    ScaleIntensity,
    ScaleIntensityd,
    ScaleShift,
    build_preprocess,
)

RNG = np.random.default_rng(1234)


def _image(rows: int = 32, cols: int = 32) -> np.ndarray:
    return (RNG.random((rows, cols)) * 1000 - 200).astype(np.float32)


# ------------------------------------------------------------------------- Resize


@pytest.mark.parametrize(("shape", "size"), [
    ((40, 40), 8), ((37, 53), 16), ((8, 8), 20), ((5, 90), (12, 7)), ((1, 1), 4), ((64, 64), 64),
])
def test_resize_matches_torch_antialiased_bilinear(shape: tuple[int, int],
                                                    size: int | tuple[int, int]) -> None:
    import torch
    import torch.nn.functional as F  # noqa: N812

    img = _image(*shape)
    out = Resize(size)(img)
    target = (size, size) if isinstance(size, int) else size
    assert out.shape == target and out.dtype == np.float32
    ref = F.interpolate(torch.from_numpy(img)[None, None], size=target, mode="bilinear",
                        antialias=True, align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)


def test_resize_antialiases_a_checkerboard() -> None:
    board = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
    out = Resize(8)(board)
    # Each output pixel averages many input pixels: no aliasing to 0 / 1.
    np.testing.assert_allclose(out, 0.5, atol=0.05)


def test_resize_keeps_constants_and_copies() -> None:
    img = np.full((30, 20), 7.5, dtype=np.float32)
    np.testing.assert_allclose(Resize(9)(img), 7.5, rtol=1e-6)
    same = Resize((30, 20))(img)
    assert same is not img and np.array_equal(same, img)


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Resize(0)
    with pytest.raises(ValueError, match="2-D"):
        Resize(4)(np.zeros((2, 3, 3), dtype=np.float32))


def _resize_reference(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize as one ``out += weight * input`` pass per tap, in float32 (the definition)."""
    from fedrad.common.transforms import _resample_taps

    arr = img.astype(np.float32)
    (h, w), (oh, ow) = arr.shape, size

    def rows(a: np.ndarray, n: int) -> np.ndarray:
        index, weight = _resample_taps(a.shape[0], n)
        out = np.zeros((n, a.shape[1]), dtype=np.float32)
        for idx, wt in zip(index, weight, strict=True):
            out += wt[:, None] * a[idx, :]
        return out

    def cols(a: np.ndarray, n: int) -> np.ndarray:
        index, weight = _resample_taps(a.shape[1], n)
        out = np.zeros((a.shape[0], n), dtype=np.float32)
        for idx, wt in zip(index, weight, strict=True):
            out += wt[None, :] * a[:, idx]
        return out

    return cols(rows(arr, oh), ow) if oh * w <= h * ow else rows(cols(arr, ow), oh)


@pytest.mark.parametrize(("shape", "size"), [
    ((300, 280), (64, 64)), ((37, 53), (16, 16)), ((8, 8), (20, 20)), ((5, 90), (12, 7)),
    ((200, 50), (30, 90)), ((1, 1), (4, 4)),
])
@pytest.mark.parametrize("sparse", [True, False])
def test_resize_is_bit_identical_to_the_tap_loop(shape: tuple[int, int], size: tuple[int, int],
                                                 sparse: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The sparse-matrix passes (and the NumPy fallback without SciPy) add the same
    float32 products in the same order as the plain tap loop: the same bits."""
    import fedrad.common.transforms as transforms_mod

    if not sparse:
        monkeypatch.setattr(transforms_mod, "_resample_matrix", lambda n_in, n_out: None)
    img = (RNG.standard_normal(shape) * 1e3 + RNG.random() * 1e4).astype(np.float32)
    out = Resize(size)(img)
    ref = _resize_reference(img, size)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize(("shape", "size", "dtype"), [
    ((120, 90), (32, 32), np.int16), ((1500, 700), (64, 224), np.uint16),
    ((600, 2100), (300, 50), np.uint16), ((40, 40), (40, 40), np.uint8),
])
def test_resize_of_integers_equals_resize_of_their_floats(shape: tuple[int, int],
                                                          size: tuple[int, int],
                                                          dtype: type) -> None:
    """Integer images are converted to float32 a band of rows at a time: same bits."""
    info = np.iinfo(dtype)
    stored = RNG.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    out = Resize(size)(stored)
    ref = _resize_reference(stored.astype(np.float32), size)
    assert out.dtype == np.float32 and out.shape == size
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_crop_to_square_keeps_the_centre() -> None:
    img = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    out = CropToSquare()(img)
    np.testing.assert_array_equal(out, img[:, 2:8])
    assert CropToSquare()(img.T).shape == (6, 6)


# ------------------------------------------------------------------- GaussianDenoise


def test_gaussian_sigma_zero_is_identity() -> None:
    img = _image()
    out = GaussianDenoise(0)(img)
    np.testing.assert_array_equal(out, img)
    assert out is not img


def test_gaussian_impulse_response_is_a_normalised_gaussian() -> None:
    img = np.zeros((21, 21), dtype=np.float32)
    img[10, 10] = 1.0
    sigma = 1.5
    out = GaussianDenoise(sigma)(img)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out, out.T, atol=1e-7)
    np.testing.assert_allclose(out, out[::-1, ::-1], atol=1e-7)
    x = np.arange(-10, 11)
    profile = np.where(np.abs(x) <= 6, np.exp(-0.5 * (x / sigma) ** 2), 0.0)  # cut at 4 sigma
    profile /= profile.sum()
    np.testing.assert_allclose(out[10], profile * profile[10], rtol=1e-4, atol=1e-7)


def test_gaussian_matches_scipy_and_reduces_noise() -> None:
    img = RNG.normal(size=(24, 31)).astype(np.float32)
    out = GaussianDenoise(1.0)(img)
    assert out.std() < 0.5 * img.std()
    assert out.mean() == pytest.approx(img.mean(), abs=0.05)
    ndimage = pytest.importorskip("scipy.ndimage")
    ref = ndimage.gaussian_filter(img.astype(np.float64), 1.0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_gaussian_rejects_negative_sigma() -> None:
    with pytest.raises(ValueError):
        GaussianDenoise(-1)


# ----------------------------------------------------------------- HistogramEqualize


def test_equalisation_flattens_a_skewed_histogram_and_keeps_order() -> None:
    img = RNG.exponential(size=(64, 64)).astype(np.float32)
    out = HistogramEqualize(num_bins=256)(img)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    order = np.argsort(img.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= -1e-6)  # monotone mapping
    counts, _ = np.histogram(out, bins=4, range=(0, 1))
    assert counts.min() > 0.15 * out.size  # close to uniform (input is very skewed)
    skewed, _ = np.histogram(ScaleIntensity()(img), bins=4, range=(0, 1))
    assert skewed.max() > 0.5 * img.size


def test_equalisation_of_a_constant_image_is_zero() -> None:
    np.testing.assert_array_equal(HistogramEqualize()(np.full((5, 5), 3.0)), 0.0)
    with pytest.raises(ValueError):
        HistogramEqualize(num_bins=1)


# ------------------------------------------------------------------- ScaleIntensity


def test_scale_intensity_to_unit_range() -> None:
    img = _image()
    out = ScaleIntensity()(img)
    assert out.min() == 0.0 and out.max() == 1.0 and out.dtype == np.float32
    np.testing.assert_allclose(out, (img - img.min()) / (img.max() - img.min()), atol=1e-6)
    np.testing.assert_array_equal(ScaleIntensity()(np.full((3, 4), -2.0)), 0.0)


# ---------------------------------------------------------------- dictionary forms


def test_dictionary_transforms_wrap_the_array_ones() -> None:
    img = _image(20, 30)
    data = {IMAGE_KEY: img, LABEL_KEY: 1, "other": img}
    pipeline = Compose([
        CropToSquared(IMAGE_KEY),
        Resized(IMAGE_KEY, 8),
        GaussianDenoised(IMAGE_KEY, 0.7),
        HistogramEqualized(IMAGE_KEY, num_bins=64),
        ScaleIntensityd([IMAGE_KEY]),
    ])
    out = pipeline(data)
    expected = Compose([CropToSquare(), Resize(8), GaussianDenoise(0.7),
                        HistogramEqualize(64), ScaleIntensity()])(img)
    np.testing.assert_array_equal(out[IMAGE_KEY], expected)
    assert out[LABEL_KEY] == 1 and out["other"] is img
    assert data[IMAGE_KEY] is img  # input mapping not modified
    assert len(pipeline) == 5 and "Resized" in repr(pipeline)


def test_dictionary_transform_missing_key() -> None:
    with pytest.raises(KeyError, match="allow_missing_keys"):
        ScaleIntensityd(IMAGE_KEY)({LABEL_KEY: 0})
    assert ScaleIntensityd(IMAGE_KEY, allow_missing_keys=True)({LABEL_KEY: 0}) == {LABEL_KEY: 0}


# ---------------------------------------------------------------- build_preprocess


def test_build_preprocess_output_and_order() -> None:
    settings = load_settings({"image-size": 16, "denoise-sigma": 0.5, "equalize": True})
    pipeline = build_preprocess(settings)
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["Resize", "GaussianDenoise", "HistogramEqualize", "ScaleIntensity"]
    out = pipeline(_image(50, 37))
    assert out.shape == (16, 16) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0


def test_build_preprocess_options() -> None:
    settings = load_settings({"image-size": 8, "denoise-sigma": 0, "equalize": False})
    pipeline = build_preprocess(settings, crop_square=True)
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["CropToSquare", "Resize", "ScaleIntensity"]
    img = _image(10, 30)
    np.testing.assert_array_equal(pipeline(img),
                                  ScaleIntensity()(Resize(8)(CropToSquare()(img))))
    np.testing.assert_array_equal(build_preprocess(settings)(np.zeros((9, 9))), 0.0)


def test_scale_shift() -> None:
    img = _image(6, 5)
    out = ScaleShift(2.5, -3.0)(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, img.astype(np.float64) * 2.5 - 3.0, rtol=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        ScaleShift(1, 0)(np.zeros(3))


@pytest.mark.parametrize("crop", [False, True])
def test_build_preprocess_on_stored_values_scaled_by_a_power_of_two(crop: bool) -> None:
    """Scaling stored values by a power of two after resizing gives the same bits as
    resizing the scaled (grey) image: the form decode_dicom(allow_affine=True) returns."""
    settings = load_settings({"image-size": 24, "denoise-sigma": 0.7, "equalize": True})
    stored = RNG.integers(0, 4096, (90, 70)).astype(np.uint16)
    for scale in (1.0, 4.0, 0.125):
        grey = stored.astype(np.float32) * np.float32(scale)
        direct = build_preprocess(settings, crop_square=crop)(grey)
        pipeline = build_preprocess(settings, crop_square=crop, affine=(scale, 0.0))
        assert "ScaleShift" in [type(t).__name__ for t in pipeline.transforms]
        assert np.array_equal(pipeline(stored).view(np.uint32), direct.view(np.uint32))
