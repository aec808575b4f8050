"""Image preprocessing transforms, MONAI style.

Array transforms take and return a 2-D ``float32`` numpy array ``(rows, cols)``.
Dictionary transforms (the array transform's name + ``d``) take ``keys`` and apply the
array transform to those entries of a mapping, returning a new dict; the key of the
image is :data:`IMAGE_KEY`.  :class:`Compose` chains either kind.

:func:`build_preprocess` gives the pipeline a site applies before caching.  The paper
lists Gaussian noise reduction, histogram equalisation, resizing and scaling to [0, 1];
we run them as

    resize -> Gaussian denoise -> histogram equalise -> scale to [0, 1]

so the costly filters work on ``image_size**2`` pixels instead of a 2048**2 radiograph
(the anti-aliased resize is itself a low-pass filter, and ``denoise-sigma`` is therefore
given in *output* pixels).  Resizing is to ``image_size x image_size``; a non-square
image is stretched unless ``crop_square=True``, which first centre-crops it to a square.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_KEY",
    "LABEL_KEY",
    "Transform",
    "MapTransform",
    "Compose",
    "CropToSquare",
    "CropToSquared",
    "Resize",
    "Resized",
    "GaussianDenoise",
    "GaussianDenoised",
    "HistogramEqualize",
    "HistogramEqualized",
    "ScaleIntensity",
    "ScaleIntensityd",
    "ScaleShift",
    "build_preprocess",
]

IMAGE_KEY = "image"
LABEL_KEY = "label"


def _as_image(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D image (rows, cols), got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


class Transform:
    """Base class of array transforms: ``__call__(img) -> img``."""

    def __call__(self, img: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class MapTransform:
    """Base class of dictionary transforms wrapping an array transform.

    Parameters
    ----------
    keys:
        Key or keys of the entries to transform.
    allow_missing_keys:
        Skip absent keys instead of raising ``KeyError``.
    """

    transform: Transform

    def __init__(self, keys: Hashable | Sequence[Hashable],
                 allow_missing_keys: bool = False) -> None:
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
            keys = [keys]
        self.keys: tuple[Hashable, ...] = tuple(keys)
        self.allow_missing_keys = allow_missing_keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.keys:
            if key not in out:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"{type(self).__name__}: key {key!r} not in the data "
                               f"(keys: {list(out)}); pass allow_missing_keys=True to skip")
            out[key] = self.transform(out[key])
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keys={list(self.keys)!r}, transform={self.transform!r})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, data: Any) -> Any:
        for t in self.transforms:
            data = t(data)
        return data

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class CropToSquare(Transform):
    """Centre-crop the longer side so the image is square."""

    def __call__(self, img: np.ndarray) -> np.ndarray:
        arr = _as_image(img)
        rows, cols = arr.shape
        side = min(rows, cols)
        top, left = (rows - side) // 2, (cols - side) // 2
        return arr[top:top + side, left:left + side]


@functools.lru_cache(maxsize=64)
def _resample_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of anti-aliased linear resampling along one axis.

    Returns ``(index, weight)``, both ``(K, n_out)``: output ``i`` is
    ``sum_k weight[k, i] * input[index[k, i]]``.  A triangle filter widened by the scale
    factor when downscaling (plain linear interpolation when upscaling), pixel centres
    aligned, taps outside the image dropped and the rest renormalised: what PIL's
    BILINEAR and torch's ``interpolate(mode="bilinear", antialias=True)`` compute.
    Gathering ``K`` taps (instead of a dense matrix product) keeps the cost at
    ``O(K * n_out)`` per line and needs no BLAS threads.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    first = np.floor(centres - support - 0.5).astype(np.int64)
    width = int(math.ceil(2 * support)) + 2
    index = first[None, :] + np.arange(width)[:, None]
    weight = np.clip(1.0 - np.abs(index + 0.5 - centres[None, :]) / support, 0.0, None)
    weight[(index < 0) | (index >= n_in)] = 0.0
    weight /= weight.sum(axis=0, keepdims=True)
    keep = weight.any(axis=1)  # drop tap rows that are zero for every output
    return np.clip(index[keep], 0, n_in - 1), weight[keep].astype(np.float32)


@functools.lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int) -> Any:
    """The taps of :func:`_resample_taps` as a ``(n_out, n_in)`` CSR matrix, or None.

    Each row holds its output's taps in tap order (zero weights and repeated edge
    indices kept), so ``matrix @ arr`` adds ``weight * input`` tap by tap in ``float32``
    exactly as the loop of :func:`_resample_rows_loop` does -- the same bits, with one
    pass over the image instead of three per tap.  None when SciPy is not installed.
    """
    try:
        from scipy import sparse
    except ImportError:
        return None
    index, weight = _resample_taps(n_in, n_out)
    taps = index.shape[0]
    return sparse.csr_matrix(
        (np.ascontiguousarray(weight.T).ravel(), np.ascontiguousarray(index.T).ravel(),
         np.arange(0, taps * n_out + 1, taps)), shape=(n_out, n_in))


def _resample_rows_loop(arr: np.ndarray, n_out: int) -> np.ndarray:
    index, weight = _resample_taps(arr.shape[0], n_out)
    out = np.zeros((n_out, arr.shape[1]), dtype=np.float32)
    for idx, w in zip(index, weight, strict=True):
        out += w[:, None] * arr[idx, :]
    return out


#: Input rows converted to float32 at a time when resampling an integer image (a band
#: that stays in the processor's cache instead of a full-size float copy).
_BAND_ROWS = 128


@functools.lru_cache(maxsize=64)
def _resample_bands(n_in: int, n_out: int) -> tuple[tuple[int, int, int, int, Any], ...]:
    """:func:`_resample_matrix` cut into groups of output rows: ``(first output row, end,
    first input row, end, CSR block over those input rows)``, the same entries in the
    same order (column indices shifted), so each group's product has the same bits."""
    matrix = _resample_matrix(n_in, n_out)
    index, _ = _resample_taps(n_in, n_out)
    scale = max(1.0, n_in / n_out)
    group = max(1, int(_BAND_ROWS / scale))
    bands = []
    for start in range(0, n_out, group):
        stop = min(n_out, start + group)
        lo, hi = int(index[:, start:stop].min()), int(index[:, start:stop].max()) + 1
        rows = matrix[start:stop]
        block = type(matrix)((rows.data, rows.indices - lo, rows.indptr),
                             shape=(stop - start, hi - lo))
        bands.append((start, stop, lo, hi, block))
    return tuple(bands)


def _resample_rows(arr: np.ndarray, n_out: int) -> np.ndarray:
    """Resample the rows (axis 0) of an image to ``n_out``, in ``float32``.

    ``arr`` is ``float32``, or integers of at most 16 bits (exact in ``float32``), which
    are converted a band of rows at a time: the same bits as converting first.
    """
    matrix = _resample_matrix(arr.shape[0], n_out)
    if matrix is None:
        return _resample_rows_loop(arr.astype(np.float32, copy=False), n_out)
    if arr.dtype == np.float32:
        return np.asarray(matrix @ arr, dtype=np.float32)
    out = np.empty((n_out, arr.shape[1]), dtype=np.float32)
    for start, stop, lo, hi, block in _resample_bands(arr.shape[0], n_out):
        out[start:stop] = block @ arr[lo:hi].astype(np.float32)
    return out


def _transposed(arr: np.ndarray, block: int = 8) -> np.ndarray:
    """``arr.T`` as a C-contiguous copy, a few source rows at a time (cache friendly)."""
    out = np.empty((arr.shape[1], arr.shape[0]), dtype=arr.dtype)
    for start in range(0, arr.shape[0], block):
        out[:, start:start + block] = arr[start:start + block].T
    return out


def _resample_cols(arr: np.ndarray, n_out: int) -> np.ndarray:
    """Resample the columns (axis 1): the row resampling of the transposed image."""
    return _transposed(_resample_rows(_transposed(arr), n_out))


class Resize(Transform):
    """Resize to ``size x size`` (or ``(rows, cols)``), anti-aliased when downscaling.

    Separable linear resampling whose triangle filter widens with the scale factor
    (as PIL's BILINEAR and torch's ``interpolate(..., mode="bilinear",
    antialias=True)``), so downscaling a 2048**2 radiograph to 64**2 averages instead
    of aliasing.  Aspect ratio is not kept (see :class:`CropToSquare`).
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        if isinstance(size, int):
            size = (size, size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be a positive int or (rows, cols), got {size!r}")
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, img: np.ndarray) -> np.ndarray:
        arr = np.asarray(img)
        if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
            arr = _as_image(arr)  # integers of up to 16 bits are converted band by band
        elif arr.ndim != 2:
            raise ValueError(f"expected a 2-D image (rows, cols), got shape {arr.shape}")
        if arr.shape == self.size:
            return arr.astype(np.float32)
        (h, w), (oh, ow) = arr.shape, self.size
        # Resample first along the axis that leaves the smaller intermediate image.
        if oh * w <= h * ow:
            out = _resample_cols(_resample_rows(arr, oh), ow)
        else:
            out = _resample_rows(_resample_cols(arr, ow), oh)
        return np.ascontiguousarray(out, dtype=np.float32)


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(4.0 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def _convolve_axis(arr: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    radius = len(kernel) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(arr, pad, mode="symmetric")
    n = arr.shape[axis]
    out = np.zeros_like(arr)
    for i, weight in enumerate(kernel):
        out += weight * (padded[i:i + n] if axis == 0 else padded[:, i:i + n])
    return out


class GaussianDenoise(Transform):
    """Gaussian smoothing with standard deviation ``sigma`` pixels (0: identity).

    Separable kernel truncated at 4 sigma, mirrored edges (like
    ``scipy.ndimage.gaussian_filter``'s default).
    """

    def __init__(self, sigma: float) -> None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        arr = _as_image(img)
        if self.sigma == 0:
            return arr.copy()
        kernel = _gaussian_kernel(self.sigma)
        return _convolve_axis(_convolve_axis(arr, kernel, 0), kernel, 1)


class HistogramEqualize(Transform):
    """Global histogram equalisation to [0, 1].

    Each value is mapped to the cumulative fraction of pixels in its histogram bin
    (``num_bins`` equal bins between the image's min and max), interpolated between bin
    centres, as ``skimage.exposure.equalize_hist`` does.  A constant image gives zeros.
    """

    def __init__(self, num_bins: int = 256) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins!r}")
        self.num_bins = int(num_bins)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        arr = _as_image(img)
        lo, hi = float(arr.min()), float(arr.max())
        if not hi > lo:
            return np.zeros_like(arr)
        hist, edges = np.histogram(arr, bins=self.num_bins, range=(lo, hi))
        cdf = np.cumsum(hist, dtype=np.float64)
        cdf /= cdf[-1]
        centres = (edges[:-1] + edges[1:]) / 2
        return np.interp(arr, centres, cdf).astype(np.float32)


class ScaleIntensity(Transform):
    """Min-max scale to [0, 1]; a constant image gives zeros."""

    def __call__(self, img: np.ndarray) -> np.ndarray:
        arr = _as_image(img)
        lo, hi = float(arr.min()), float(arr.max())
        if not hi > lo:
            return np.zeros_like(arr)
        out = (arr.astype(np.float64) - lo) / (hi - lo)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


class ScaleShift(Transform):
    """``slope * x + intercept`` (computed in float64, returned as ``float32``)."""

    def __init__(self, slope: float, intercept: float) -> None:
        self.slope = float(slope)
        self.intercept = float(intercept)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        arr = np.asarray(img)
        if arr.ndim != 2:
            raise ValueError(f"expected a 2-D image (rows, cols), got shape {arr.shape}")
        return (arr.astype(np.float64) * self.slope + self.intercept).astype(np.float32)


class CropToSquared(MapTransform):
    """Dictionary version of :class:`CropToSquare`."""

    def __init__(self, keys: Hashable | Sequence[Hashable] = IMAGE_KEY,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = CropToSquare()


class Resized(MapTransform):
    """Dictionary version of :class:`Resize`."""

    def __init__(self, keys: Hashable | Sequence[Hashable], size: int | tuple[int, int],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Resize(size)


class GaussianDenoised(MapTransform):
    """Dictionary version of :class:`GaussianDenoise`."""

    def __init__(self, keys: Hashable | Sequence[Hashable], sigma: float,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = GaussianDenoise(sigma)


class HistogramEqualized(MapTransform):
    """Dictionary version of :class:`HistogramEqualize`."""

    def __init__(self, keys: Hashable | Sequence[Hashable], num_bins: int = 256,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = HistogramEqualize(num_bins)


class ScaleIntensityd(MapTransform):
    """Dictionary version of :class:`ScaleIntensity`."""

    def __init__(self, keys: Hashable | Sequence[Hashable],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ScaleIntensity()


def build_preprocess(settings: Any, *, crop_square: bool = False,
                     affine: tuple[float, float] | None = None) -> Compose:
    """Return the site preprocessing pipeline for ``settings``.

    Order: [centre-crop to square] -> resize to ``settings.image_size`` squared ->
    Gaussian denoise with ``settings.denoise_sigma`` output pixels (skipped at 0) ->
    histogram equalisation (if ``settings.equalize``) -> scale to [0, 1].  See the
    module docstring for why this order.

    With ``affine = (slope, intercept)`` the pipeline takes an image ``x`` whose grey
    values are ``slope * x + intercept`` (a DICOM frame's stored values, see
    :class:`fedrad.common.dicom.DecodedImage`) and applies that map right after the
    resize (:class:`ScaleShift`): cropping and resizing are linear with weights summing
    to one, so this equals the pipeline on the grey image up to float rounding -- bit
    for bit when ``slope`` is a power of two and ``intercept`` is 0, the only form
    :func:`fedrad.common.dicom.decode_dicom` hands out -- and the full-size grey image
    is never made.

    Parameters
    ----------
    settings:
        A :class:`fedrad.common.config.Settings` (only ``image_size``,
        ``denoise_sigma`` and ``equalize`` are read).
    crop_square:
        Centre-crop non-square images instead of stretching them.

    Returns
    -------
    Compose
        Array pipeline: 2-D image in, ``float32`` ``(image_size, image_size)`` in
        [0, 1] out.
    """
    steps: list[Transform] = []
    if crop_square:
        steps.append(CropToSquare())
    steps.append(Resize(int(settings.image_size)))
    if affine is not None:
        steps.append(ScaleShift(*affine))
    if float(settings.denoise_sigma) > 0:
        steps.append(GaussianDenoise(float(settings.denoise_sigma)))
    if settings.equalize:
        steps.append(HistogramEqualize())
    steps.append(ScaleIntensity())
    return Compose(steps)
