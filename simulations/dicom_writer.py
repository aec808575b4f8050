"""Write simulated radiographs as DICOM files, the way different hospital scanners would.

A :class:`ScannerProfile` describes how one (fictitious) site's X-ray equipment stores its
images: contrast curve, noise, bit depth, photometric interpretation, rescale, window and
transfer syntax.  :func:`write_dicom` applies a profile to a ``[0, 1]`` image and writes a
valid DICOM Part 10 file that pydicom 3 (with the pylibjpeg plugins) decodes again.

The generators in :mod:`fedrad.simulations.synthetic` and :mod:`fedrad.simulations.medmnist`
write whole *site folders* with it::

    <site>/dicom/*.dcm
    <site>/labels.csv        header ``file,label``; ``file`` is relative to ``dicom/``

and describe them with :class:`SiteFolder` and :class:`Federation`.

Pixel conventions
-----------------
The input ``image01`` uses the display convention of MONOCHROME2: 0 is black (air), 1 is white
(bone).  After the contrast curve and noise, it is quantised to ``0 .. 2**bits_stored - 1``.
For MONOCHROME1 the stored values are inverted (``stored = max - q``), so a viewer that honours
the photometric interpretation shows the same picture.  The modality LUT
(``value = stored * RescaleSlope + RescaleIntercept``) maps the stored values onto the profile's
output scale; :meth:`ScannerProfile.stored_to_unit` undoes all of it.

Transfer syntaxes
-----------------
``explicit-le``, ``implicit-le``, ``rle`` (pylibjpeg-rle, else pydicom's own encoder) and
``jpeg2000-lossless`` (pylibjpeg-openjpeg) are always available with the project's
dependencies.  ``jpeg-ls-lossless`` needs the optional ``pyjpegls`` package: pydicom 3.0 has no
other JPEG-LS encoder (pylibjpeg-libjpeg only decodes).  Writing with a profile whose encoder
is missing raises ``FedradError`` with code ``encoder-unavailable`` (creating the profile, and
importing this module, always work).  pylibjpeg-openjpeg encodes only images of at least
:data:`MIN_JPEG2000_SIZE` pixels a side.  JPEG lossless (process 14) and deflate cannot be
encoded by pydicom 3.0 at all and are not offered.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as _uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset

from fedrad.common.errors import ConfigError, FedradError

__all__ = [
    "ScannerProfile",
    "TRANSFER_SYNTAXES",
    "DEFAULT_PROFILES",
    "NEUTRAL_PROFILE",
    "SiteFolder",
    "Federation",
    "available_transfer_syntaxes",
    "apply_profile",
    "resample_to_detector",
    "write_dicom",
    "write_labels_csv",
    "read_labels_csv",
    "load_federation",
    "FEDERATION_MANIFEST",
    "MIN_JPEG2000_SIZE",
    "prepare_output_dir",
    "resolve_workers",
    "run_tasks",
    "check_dicom_readable",
]

logger = logging.getLogger(__name__)

#: Transfer syntax names accepted by :class:`ScannerProfile`, with their UIDs.
TRANSFER_SYNTAXES: dict[str, _uid.UID] = {
    "explicit-le": _uid.ExplicitVRLittleEndian,
    "implicit-le": _uid.ImplicitVRLittleEndian,
    "rle": _uid.RLELossless,
    "jpeg2000-lossless": _uid.JPEG2000Lossless,
    "jpeg-ls-lossless": _uid.JPEGLSLossless,
}

_NATIVE = ("explicit-le", "implicit-le")
_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_MODALITIES = {
    "DX": _uid.DigitalXRayImageStorageForPresentation,
    "CR": _uid.ComputedRadiographyImageStorage,
}
#: Name of the JSON file written next to the site folders by the generators.
FEDERATION_MANIFEST = "federation.json"

#: Smallest image side pylibjpeg-openjpeg can encode: it always uses 6 DWT resolutions.
MIN_JPEG2000_SIZE = 32

# Field of view used to derive a plausible pixel spacing (mm) for a chest radiograph.
_FIELD_OF_VIEW_MM = 350.0


@functools.cache
def _encoder_plugins(name: str) -> tuple[str, ...]:
    """Available encoding plugins for a compressed transfer syntax (empty: none)."""
    from pydicom.pixels import get_encoder

    try:
        encoder = get_encoder(TRANSFER_SYNTAXES[name])
    except NotImplementedError:
        return ()
    return tuple(encoder.available_plugins) if encoder.is_available else ()


def available_transfer_syntaxes() -> list[str]:
    """Return the transfer syntax names this installation can write.

    Returns
    -------
    list of str
        A subset of :data:`TRANSFER_SYNTAXES`, in its order.
    """
    return [n for n in TRANSFER_SYNTAXES if n in _NATIVE or _encoder_plugins(n)]


@dataclass(frozen=True)
class ScannerProfile:
    """How one simulated site's X-ray equipment stores its images.

    Parameters
    ----------
    name:
        Short profile name, e.g. ``"site-a"``.
    manufacturer:
        DICOM Manufacturer (0008,0070).
    model_name:
        DICOM ManufacturerModelName.
    noise_std:
        Standard deviation of additive Gaussian noise, as a fraction of the full range.
    contrast:
        Gamma exponent applied to the ``[0, 1]`` image before noise (``x ** contrast``);
        below 1 brightens mid-tones, above 1 darkens them.
    bits_stored:
        8, 12 or 16.  Bits allocated is 8 for 8-bit data, 16 otherwise.
    photometric:
        ``"MONOCHROME2"`` (0 = black) or ``"MONOCHROME1"`` (stored values inverted).
    transfer_syntax:
        One of :data:`TRANSFER_SYNTAXES` that this installation can encode
        (see :func:`available_transfer_syntaxes`).
    rescale_slope, rescale_intercept:
        Modality LUT written to the file: ``value = stored * slope + intercept``.
    window_center, window_width:
        Optional VOI window, in modality LUT output units; both or neither.
    modality:
        ``"DX"`` (Digital X-Ray, for presentation) or ``"CR"`` (Computed Radiography).
    institution:
        DICOM InstitutionName, a fictitious hospital.
    resolution:
        The detector's sampling relative to the source image, in (0, 4]: 0.5 acquires half
        the pixels a side (finer detail is lost; the site's preparation resizes to the run's
        image size), 2 twice as many (interpolated).  The field of view stays the same, so
        the pixel spacing follows.
    """

    name: str
    manufacturer: str
    model_name: str = "SynthRay"
    noise_std: float = 0.01
    contrast: float = 1.0
    bits_stored: int = 12
    photometric: str = "MONOCHROME2"
    transfer_syntax: str = "explicit-le"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_center: float | None = None
    window_width: float | None = None
    modality: str = "DX"
    institution: str = "Synthetic General Hospital"
    resolution: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("ScannerProfile.name must not be empty")
        if not (np.isfinite(self.noise_std) and 0.0 <= self.noise_std <= 0.5):
            raise ConfigError(
                f"ScannerProfile {self.name!r}: noise_std={self.noise_std!r} must be in [0, 0.5] "
                "(a fraction of the full intensity range)"
            )
        if not (np.isfinite(self.contrast) and 0.1 <= self.contrast <= 10.0):
            raise ConfigError(
                f"ScannerProfile {self.name!r}: contrast={self.contrast!r} must be a gamma "
                "exponent in [0.1, 10]"
            )
        if self.bits_stored not in (8, 12, 16):
            raise ConfigError(
                f"ScannerProfile {self.name!r}: bits_stored={self.bits_stored!r}; use 8, 12 or 16"
            )
        if self.photometric not in _PHOTOMETRICS:
            raise ConfigError(
                f"ScannerProfile {self.name!r}: photometric={self.photometric!r}; "
                f"use one of {', '.join(_PHOTOMETRICS)}"
            )
        if self.modality not in _MODALITIES:
            raise ConfigError(
                f"ScannerProfile {self.name!r}: modality={self.modality!r}; "
                f"use one of {', '.join(_MODALITIES)}"
            )
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ConfigError(
                f"ScannerProfile {self.name!r}: unknown transfer_syntax "
                f"{self.transfer_syntax!r}; use one of {', '.join(TRANSFER_SYNTAXES)}"
            )
        if not (np.isfinite(self.rescale_slope) and self.rescale_slope > 0):
            raise ConfigError(
                f"ScannerProfile {self.name!r}: rescale_slope={self.rescale_slope!r} must be > 0"
            )
        if not (np.isfinite(self.resolution) and 0.0 < self.resolution <= 4.0):
            raise ConfigError(
                f"ScannerProfile {self.name!r}: resolution={self.resolution!r} must be in (0, 4] "
                "(the detector's pixels a side relative to the source image)"
            )
        if not np.isfinite(self.rescale_intercept):
            raise ConfigError(f"ScannerProfile {self.name!r}: rescale_intercept must be finite")
        if (self.window_center is None) != (self.window_width is None):
            raise ConfigError(
                f"ScannerProfile {self.name!r}: give both window_center and window_width, "
                "or neither"
            )
        if self.window_width is not None and not self.window_width >= 1:
            raise ConfigError(
                f"ScannerProfile {self.name!r}: window_width={self.window_width!r} must be >= 1"
            )

    @property
    def bits_allocated(self) -> int:
        """Bits allocated per pixel: 8 for 8-bit data, else 16."""
        return 8 if self.bits_stored == 8 else 16

    @property
    def max_stored(self) -> int:
        """Largest stored pixel value, ``2**bits_stored - 1``."""
        return (1 << self.bits_stored) - 1

    @property
    def transfer_syntax_uid(self) -> _uid.UID:
        """The transfer syntax UID written to the file meta."""
        return TRANSFER_SYNTAXES[self.transfer_syntax]

    @property
    def sop_class_uid(self) -> _uid.UID:
        """DX (for presentation) or CR Image Storage."""
        return _MODALITIES[self.modality]

    def modality_range(self) -> tuple[float, float]:
        """Modality LUT output of the smallest and largest stored value."""
        lo = self.rescale_intercept
        return lo, lo + self.rescale_slope * self.max_stored

    def full_window(self) -> tuple[float, float]:
        """A (centre, width) VOI window that covers the whole output range."""
        lo, hi = self.modality_range()
        return (lo + hi) / 2.0, hi - lo + self.rescale_slope

    def stored_to_unit(self, stored: np.ndarray) -> np.ndarray:
        """Map stored values (as decoded by pydicom) back to ``[0, 1]``, display convention.

        This undoes the quantisation and the MONOCHROME1 inversion (not the contrast curve or
        the noise), i.e. it is what a reader gets by applying the modality LUT, inverting
        MONOCHROME1 data and scaling to the modality range.
        """
        values = np.asarray(stored, dtype=np.float64) * self.rescale_slope
        values += self.rescale_intercept
        lo, hi = self.modality_range()
        unit = (values - lo) / (hi - lo)
        if self.photometric == "MONOCHROME1":
            unit = 1.0 - unit
        return unit


#: Three contrasting site profiles: different vendors, bit depths, photometrics, codecs.
DEFAULT_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="site-a",
        manufacturer="Acme Radiography",
        model_name="AcmeDR 3000",
        noise_std=0.008,
        contrast=1.0,
        bits_stored=12,
        photometric="MONOCHROME2",
        transfer_syntax="explicit-le",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        window_center=2048.0,
        window_width=4096.0,
        modality="DX",
        institution="Synthetic Hospital A",
    ),
    ScannerProfile(
        name="site-b",
        manufacturer="Borealis Medical",
        model_name="Borealis CR-16",
        noise_std=0.03,
        contrast=1.35,
        bits_stored=16,
        photometric="MONOCHROME1",
        transfer_syntax="rle",
        rescale_slope=0.5,
        rescale_intercept=-1024.0,
        window_center=None,
        window_width=None,
        modality="CR",
        institution="Synthetic Hospital B",
    ),
    ScannerProfile(
        name="site-c",
        manufacturer="Cirrus Imaging",
        model_name="Cirrus Flat 8",
        noise_std=0.018,
        contrast=0.75,
        bits_stored=8,
        photometric="MONOCHROME2",
        transfer_syntax="jpeg2000-lossless",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        window_center=128.0,
        window_width=256.0,
        modality="DX",
        institution="Synthetic Hospital C",
    ),
)

#: A plain profile (12-bit MONOCHROME2, uncompressed, mild noise) for central test sets.
NEUTRAL_PROFILE = ScannerProfile(
    name="central",
    manufacturer="Neutral Imaging",
    model_name="Reference DR",
    noise_std=0.012,
    contrast=1.0,
    bits_stored=12,
    photometric="MONOCHROME2",
    transfer_syntax="explicit-le",
    modality="DX",
    institution="Synthetic Reference Centre",
)


def resample_to_detector(image01: np.ndarray, resolution: float) -> np.ndarray:
    """``image01`` sampled by a detector of ``resolution`` times its pixels a side.

    Bilinear, after a box average when shrinking (so fine detail is averaged away as a
    coarser detector would, not aliased); at least 1x1; values stay in [0, 1].
    """
    img = np.asarray(image01)
    if resolution == 1.0 or img.ndim != 2:
        return img
    from scipy import ndimage

    x = img.astype(np.float64)
    if resolution < 1.0:
        x = ndimage.uniform_filter(x, size=max(1, round(1.0 / resolution)), mode="nearest")
    shape = tuple(max(1, round(n * resolution)) for n in x.shape)
    out = ndimage.zoom(x, (shape[0] / x.shape[0], shape[1] / x.shape[1]), order=1,
                       mode="nearest", grid_mode=True)
    return np.clip(out, 0.0, 1.0).astype(img.dtype)


def apply_profile(
    image01: np.ndarray, profile: ScannerProfile, rng: np.random.Generator
) -> np.ndarray:
    """Apply a scanner profile to an image and return the stored pixel values.

    Parameters
    ----------
    image01:
        2-D float image in ``[0, 1]`` (0 = black).
    profile:
        The scanner profile (contrast, noise, bits, photometric).
    rng:
        Random generator for the noise.

    Returns
    -------
    numpy.ndarray
        ``uint8`` (8-bit profiles) or ``uint16`` array of stored values in
        ``0 .. profile.max_stored``; inverted for MONOCHROME1.
    """
    img = np.asarray(image01)
    if img.ndim != 2 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image01 must be a non-empty 2-D array, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"image01 must be a float array scaled to [0, 1], got dtype {img.dtype}")
    if not np.all(np.isfinite(img)):
        raise ValueError("image01 contains NaN or infinite values")
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"image01 must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    x = np.clip(img.astype(np.float64, copy=True), 0.0, 1.0)
    if profile.contrast != 1.0:
        np.power(x, profile.contrast, out=x)
    if profile.noise_std > 0:
        x += rng.normal(0.0, profile.noise_std, size=x.shape)
        np.clip(x, 0.0, 1.0, out=x)
    maxval = profile.max_stored
    q = np.rint(x * maxval)
    if profile.photometric == "MONOCHROME1":
        q = maxval - q
    return q.astype(np.uint8 if profile.bits_allocated == 8 else np.uint16)


def _uid_from(rng: np.random.Generator, prefix: str | None) -> _uid.UID:
    entropy = "-".join(str(int(v)) for v in rng.integers(0, 2**62, size=3))
    return _uid.generate_uid(prefix=prefix or _uid.PYDICOM_ROOT_UID, entropy_srcs=[entropy])


def _ds_decimal(value: float) -> str:
    """Format a number for a DS element (at most 16 characters)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


_PIXEL_DATA_TAG = 0x7FE00010


@functools.lru_cache(maxsize=64)
def _static_elements(profile: ScannerProfile, rows: int, cols: int) -> tuple[Any, ...]:
    """Data elements that depend only on the profile and the image shape (shared, read-only)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = profile.sop_class_uid
    ds.Modality = profile.modality
    if profile.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StationName = f"{profile.name.upper()}-XR1"[:16]
    ds.StudyDescription = "CHEST PA"
    ds.SeriesDescription = "PA"
    ds.ManufacturerModelName = profile.model_name
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SeriesNumber = 1
    ds.PatientOrientation = ["L", "F"]
    spacing = _ds_decimal(_FIELD_OF_VIEW_MM / max(rows, cols))
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.RescaleIntercept = _ds_decimal(profile.rescale_intercept)
    ds.RescaleSlope = _ds_decimal(profile.rescale_slope)
    ds.RescaleType = "US"
    if profile.window_center is not None and profile.window_width is not None:
        ds.WindowCenter = _ds_decimal(profile.window_center)
        ds.WindowWidth = _ds_decimal(profile.window_width)
    ds.PresentationLUTShape = "INVERSE" if profile.photometric == "MONOCHROME1" else "IDENTITY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = profile.bits_allocated
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    return tuple(ds.values())


def write_dicom(
    path: str | os.PathLike[str],
    image01: np.ndarray,
    *,
    profile: ScannerProfile,
    rng: np.random.Generator,
    patient_name: str | None = None,
    patient_id: str | None = None,
    instance_number: int = 1,
    uid_prefix: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one radiograph as a DICOM Part 10 file, as ``profile``'s scanner would.

    Parameters
    ----------
    path:
        Output file; parent folders are created.
    image01:
        2-D float image in ``[0, 1]``, display convention (0 = black).
    profile:
        The scanner profile to apply (see :func:`apply_profile`).
    rng:
        Random generator for noise, UIDs and the synthetic demographics; the same generator
        state gives a byte-identical file.
    patient_name, patient_id:
        Synthetic identifiers (default: ``SYNTH^NNNN`` and ``SYN-NNNNNN`` from ``rng``).  They
        are fake but present, so that de-identification has something to remove.
    instance_number:
        DICOM InstanceNumber.
    uid_prefix:
        Root for the generated UIDs (default: pydicom's root).  Must end with a dot.
    extra:
        Additional elements by DICOM keyword, e.g. ``{"PatientSex": "F"}``; applied last, so
        they override the generated values.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ValueError
        If the image is not a finite 2-D float array in ``[0, 1]``.
    ConfigError
        If ``extra`` names an unknown DICOM keyword, ``uid_prefix`` is malformed, or the
        image is smaller than :data:`MIN_JPEG2000_SIZE` for a JPEG 2000 profile.
    """
    if uid_prefix is not None and not (uid_prefix.endswith(".") and len(uid_prefix) <= 54):
        raise ConfigError(f"uid_prefix {uid_prefix!r} must end with '.' and be <= 54 characters")
    if extra:
        unknown = [k for k in extra if tag_for_keyword(k) is None]
        if unknown:
            raise ConfigError(
                f"extra: unknown DICOM keyword(s) {', '.join(map(repr, unknown))}; "
                "use pydicom keywords such as 'PatientSex' or 'ImageComments'"
            )
    image01 = resample_to_detector(image01, profile.resolution)
    shape = np.shape(image01)
    if profile.transfer_syntax.startswith("jpeg2000") and min(shape, default=0) < MIN_JPEG2000_SIZE:
        raise ConfigError(
            f"profile {profile.name!r} writes JPEG 2000, which the installed encoder "
            f"(pylibjpeg-openjpeg, 6 wavelet levels) supports only for images of at least "
            f"{MIN_JPEG2000_SIZE}x{MIN_JPEG2000_SIZE} pixels; got {shape}: upscale the image "
            "or use another transfer syntax",
            code="image-too-small",
        )
    stored = apply_profile(image01, profile, rng)
    rows, cols = stored.shape

    study_uid = _uid_from(rng, uid_prefix)
    series_uid = _uid_from(rng, uid_prefix)
    sop_uid = _uid_from(rng, uid_prefix)
    study_date = _dt.date(2015, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 3650)))
    age_years = int(rng.integers(18, 91))
    birth_date = study_date - _dt.timedelta(days=int(age_years * 365.25 + rng.integers(0, 365)))
    study_time = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}00"
    number = int(rng.integers(0, 10000))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = profile.sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = _uid.ExplicitVRLittleEndian
    meta.ImplementationClassUID = _uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FEDRAD_SIM_01"

    ds = Dataset()
    ds.file_meta = meta
    # Elements that only depend on the profile and the image shape are built once and shared
    # (never modified); everything per image is a fresh element.
    for elem in _static_elements(profile, rows, cols):
        ds.add(elem)
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"SYNACC{int(rng.integers(0, 10**8)):08d}"
    ds.PatientName = patient_name if patient_name is not None else f"SYNTH^{number:04d}"
    ds.PatientID = patient_id if patient_id is not None else f"SYN-{number:06d}"
    ds.PatientBirthDate = birth_date.strftime("%Y%m%d")
    ds.PatientSex = "F" if rng.random() < 0.5 else "M"
    ds.PatientAge = f"{age_years:03d}Y"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{number:04d}"
    ds.InstanceNumber = int(instance_number)
    ds.add_new(_PIXEL_DATA_TAG, "OB" if profile.bits_allocated == 8 else "OW", stored.tobytes())
    if extra:
        for keyword, value in extra.items():
            if keyword in ds:
                del ds[keyword]  # never modify a shared static element in place
            setattr(ds, keyword, value)

    ts_name = profile.transfer_syntax
    if ts_name == "implicit-le":
        ds.file_meta.TransferSyntaxUID = _uid.ImplicitVRLittleEndian
    elif ts_name not in _NATIVE:
        plugins = _encoder_plugins(ts_name)
        if not plugins:
            raise FedradError(
                "encoder-unavailable",
                f"profile {profile.name!r} asks for {ts_name!r}, which this installation of "
                "pydicom cannot encode (JPEG-LS needs 'pyjpegls>=1.3', JPEG 2000 "
                "'pylibjpeg-openjpeg', RLE 'pylibjpeg-rle' or pydicom's own encoder); "
                "available: " + ", ".join(available_transfer_syntaxes()),
            )
        # pylibjpeg-rle is orders of magnitude faster than pydicom's pure-Python RLE encoder.
        plugin = "pylibjpeg" if "pylibjpeg" in plugins else ""
        ds.compress(
            profile.transfer_syntax_uid, encoding_plugin=plugin, generate_instance_uid=False
        )

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@dataclass
class SiteFolder:
    """One simulated site: ``root/dicom/*.dcm`` plus ``root/labels.csv``.

    Attributes
    ----------
    site_id:
        Folder name and site identifier, e.g. ``"site-1"`` or ``"test"``.
    root, dicom_dir, labels_csv:
        The site folder, its DICOM folder and its labels file.
    num_images:
        Number of DICOM files written (= rows in ``labels.csv``).
    class_counts:
        Number of images per class index.
    profile:
        Name of the scanner profile(s) used, comma-separated when mixed.
    """

    site_id: str
    root: Path
    dicom_dir: Path
    labels_csv: Path
    num_images: int
    class_counts: list[int]
    profile: str = ""

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON-ready form; paths relative to ``relative_to`` when given."""

        def rel(p: Path) -> str:
            return (p.relative_to(relative_to) if relative_to else p).as_posix()

        return {
            "site_id": self.site_id,
            "root": rel(self.root),
            "dicom_dir": rel(self.dicom_dir),
            "labels_csv": rel(self.labels_csv),
            "num_images": self.num_images,
            "class_counts": list(self.class_counts),
            "profile": self.profile,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path) -> SiteFolder:
        """Inverse of :meth:`to_dict`; relative paths are resolved against ``base``."""
        return cls(
            site_id=str(data["site_id"]),
            root=base / data["root"],
            dicom_dir=base / data["dicom_dir"],
            labels_csv=base / data["labels_csv"],
            num_images=int(data["num_images"]),
            class_counts=[int(c) for c in data["class_counts"]],
            profile=str(data.get("profile", "")),
        )


@dataclass
class Federation:
    """A simulated federation: site folders, an optional central test folder, class names."""

    sites: list[SiteFolder]
    test: SiteFolder | None
    class_names: list[str]
    description: str
    root: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of label classes."""
        return len(self.class_names)

    def save(self, root: Path | None = None) -> Path:
        """Write :data:`FEDERATION_MANIFEST` (paths relative to ``root``) and return its path."""
        base = Path(root if root is not None else self.root or ".")
        data = {
            "description": self.description,
            "class_names": list(self.class_names),
            "sites": [s.to_dict(base) for s in self.sites],
            "test": self.test.to_dict(base) if self.test else None,
            "extra": self.extra,
        }
        out = base / FEDERATION_MANIFEST
        out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return out


def load_federation(root: str | os.PathLike[str]) -> Federation:
    """Read a federation written by one of the generators (its :data:`FEDERATION_MANIFEST`).

    Raises
    ------
    FedradError
        ``no-dataset`` if the manifest is missing, ``bad-dataset`` if it cannot be parsed.
    """
    base = Path(root)
    manifest = base / FEDERATION_MANIFEST
    if not manifest.is_file():
        raise FedradError(
            "no-dataset",
            f"no {FEDERATION_MANIFEST} in {base}: generate the federation first "
            "(fedrad.simulations.synthetic or fedrad.simulations.medmnist)",
        )
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return Federation(
            sites=[SiteFolder.from_dict(s, base) for s in data["sites"]],
            test=SiteFolder.from_dict(data["test"], base) if data.get("test") else None,
            class_names=[str(c) for c in data["class_names"]],
            description=str(data.get("description", "")),
            root=base,
            extra=dict(data.get("extra") or {}),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise FedradError(
            "bad-dataset", f"{manifest} is not a valid federation manifest: {e}"
        ) from e


def write_labels_csv(path: Path, rows: Sequence[tuple[str, int]]) -> None:
    """Write ``labels.csv`` with header ``file,label`` (file relative to ``dicom/``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "label"])
        for name, label in rows:
            writer.writerow([name, int(label)])


def read_labels_csv(path: Path) -> list[tuple[str, int]]:
    """Read a ``labels.csv`` written by :func:`write_labels_csv`."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return [(row["file"], int(row["label"])) for row in reader]


def prepare_output_dir(out_dir: Path, names: Sequence[str], *, overwrite: bool) -> None:
    """Create ``out_dir``; refuse (or, with ``overwrite``, remove) existing generated folders.

    Only the entries named in ``names`` (site folders, ``test``) and the federation manifest
    are ever removed; anything else in ``out_dir`` is left alone.
    """
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    existing = [n for n in (*names, FEDERATION_MANIFEST) if (out_dir / n).exists()]
    if existing and not overwrite:
        raise FedradError(
            "output-exists",
            f"{out_dir} already holds {', '.join(existing)}: choose an empty folder or pass "
            "overwrite=True to replace them",
        )
    for name in existing:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        logger.info("removed previous %s", target)


def resolve_workers(workers: int | None) -> int:
    """Number of worker processes: ``None`` or 0 means one per CPU."""
    if workers is None or workers == 0:
        return max(1, os.cpu_count() or 1)
    if workers < 0:
        raise ConfigError(f"workers={workers!r} must be >= 0 (0 or None: one per CPU)")
    return int(workers)


def run_tasks(func: Any, tasks: Sequence[Any], workers: int) -> list[Any]:
    """Apply a picklable top-level ``func`` to every task, in a process pool if ``workers > 1``.

    Results come back in task order, so the output does not depend on ``workers``.
    """
    if workers <= 1 or len(tasks) < 2 * workers:
        return [func(t) for t in tasks]
    from concurrent.futures import ProcessPoolExecutor

    chunksize = max(1, len(tasks) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, tasks, chunksize=chunksize))


def check_dicom_readable(path: Path) -> None:
    """Decode one written file; the generators call it on each folder's first file."""
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the check
    except Exception as e:  # any decoder failure means the writer is broken
        raise FedradError(
            "write-failed",
            f"a freshly written DICOM file cannot be decoded: {e}",
            local_detail=str(path),
        ) from e
