"""Decode one DICOM file into a 2-D greyscale float image, or fail with a reason code.

Everything that can go wrong with a file a site exports (not DICOM at all, empty,
truncated, no pixel data, a codec that is missing, a layout we do not handle, an image
too big to decode safely) is reported as a :class:`DicomError` with a short reason code
from :data:`REASON_CODES`.  Its text is safe to leave the site: it never contains the
path, a patient name or any tag value; the local detail (path, pydicom's own message)
is kept in ``local_detail`` for the site's own logs.

Pixel pipeline of :func:`decode_dicom`, in DICOM's order (PS3.4 N.2):

1. decode the stored values of one frame (pydicom 3 + the pylibjpeg plugins);
2. *Modality LUT*: Modality LUT Sequence, else Rescale Slope/Intercept (top level, or
   the Pixel Value Transformation of an enhanced multi-frame object's functional
   groups);
3. *VOI LUT* (``voi_policy="auto"``): VOI LUT Sequence, else the first Window
   Centre/Width pair; ``"none"`` keeps the full modality range;
4. MONOCHROME1 is inverted (``x -> min + max - x``) so that a higher value is
   always brighter, like MONOCHROME2;
5. colour is converted to grey.  **Grey policy**: PALETTE COLOR goes through its
   palette to RGB; YBR_FULL / YBR_FULL_422 are converted to RGB by pydicom and
   YBR_RCT / YBR_ICT by the JPEG 2000 decoder; RGB is then reduced to its luma
   ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, the same Y that YBR_FULL
   stores).  Modality and VOI LUTs are greyscale-only in DICOM and are not applied to
   colour images.

Non-finite values (possible in float pixel data) are replaced by the finite extremes.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FedradError

__all__ = [
    "DecodedImage",
    "DicomError",
    "REASON_CODES",
    "FRAME_POLICIES",
    "VOI_POLICIES",
    "decode_dicom",
    "decode_pixel_array",
    "read_dicom",
]

logger = logging.getLogger(__name__)

#: Reason codes a :class:`DicomError` may carry.
REASON_CODES: tuple[str, ...] = (
    "missing-file",        # the path does not exist or is not a regular file
    "unreadable",          # the operating system refused to read it (permissions, I/O)
    "empty-file",          # zero bytes
    "not-dicom",           # no DICOM structure found
    "truncated",           # the file (or its pixel data) ends early
    "corrupt",             # malformed header / required image attribute missing or invalid
    "no-pixel-data",       # a DICOM object without an image (SR, RT plan, DICOMDIR, ...)
    "undecodable",         # codec missing or failing, transfer syntax missing/unsupported
    "unsupported-layout",  # photometric / samples per pixel / shape we do not handle
    "too-large",           # more pixels than the configured limit
)

FRAME_POLICIES: tuple[str, ...] = ("first", "middle")
VOI_POLICIES: tuple[str, ...] = ("auto", "none")

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_NATIVE_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
)
_DEFER_SIZE = 64 * 1024  # pixel data and other large values are read only when needed


class DicomError(FedradError):
    """A DICOM file cannot be turned into an image.

    ``code`` is one of :data:`REASON_CODES`; ``str(err)`` is safe to leave the site
    (no path, no tag value), ``local_detail`` holds the path and the underlying error.
    """


@dataclass
class DecodedImage:
    """One decoded frame, ready for the preprocessing transforms.

    Attributes
    ----------
    pixels:
        ``float32`` array of shape ``(rows, cols)``, finite, after the Modality LUT,
        the VOI LUT (per policy), MONOCHROME1 inversion and grey conversion (see the
        module docstring).  Higher is brighter.  Not rescaled to a fixed range.
    modality:
        (0008,0060) Modality, ``""`` when absent.
    photometric:
        (0028,0004) Photometric Interpretation as stored in the file.
    bits_stored:
        (0028,0101) Bits Stored (bits per sample for float pixel data).
    rows, cols:
        Image size in pixels.
    frames:
        Number of frames in the file (one of them was decoded).
    sop_instance_uid:
        (0008,0018) SOP Instance UID, or ``None``.  Site-local: hash it before it
        goes anywhere.
    manufacturer:
        (0008,0070) Manufacturer, or ``None``.
    affine:
        ``None``, except from ``decode_dicom(..., allow_affine=True)`` when the frame's
        grey values are exactly its stored values times a power of two (no LUT, an
        identity rescale, a window that maps the stored range onto itself): then
        ``pixels`` holds the stored values (a read-only integer array) and the grey
        image is ``affine[0] * pixels + affine[1]`` (``affine[1]`` is 0), bit for bit.
        Linear steps such as resizing can then run on the stored values and the scale
        on the small result, with the same bits (see :func:`_grey_affine`).
    """

    pixels: np.ndarray
    modality: str
    photometric: str
    bits_stored: int
    rows: int
    cols: int
    frames: int
    sop_instance_uid: str | None
    manufacturer: str | None
    affine: tuple[float, float] | None = None


# --------------------------------------------------------------------------- reading


def _error(code: str, message: str, path: Path, exc: BaseException | None = None) -> DicomError:
    detail = f"{path}"
    if exc is not None:
        detail += f": {type(exc).__name__}: {exc}"
    return DicomError(code, message, local_detail=detail)


def _looks_like_dicom(ds: Any) -> bool:
    """Whether a dataset read with ``force=True`` holds real DICOM elements."""
    from pydicom.datadict import dictionary_has_tag

    tags = list(ds.keys())
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        tags += list(file_meta.keys())
    return any(not tag.is_private and dictionary_has_tag(tag) for tag in tags)


def _read_dataset(path: Path) -> Any:
    """Read the header of ``path`` (large values deferred); raise DicomError on failure."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise _error("missing-file", "The file does not exist or is not a regular file; "
                     "check the site folder and the labels file.", path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise _error("unreadable", "The file cannot be read; check its permissions.",
                     path, e) from e
    if size == 0:
        raise _error("empty-file", "The file is empty (0 bytes); re-export it from PACS.",
                     path)
    try:
        try:
            return pydicom.dcmread(path, defer_size=_DEFER_SIZE)
        except InvalidDicomError as strict_error:
            # No 128-byte preamble + 'DICM': could still be a bare DICOM dataset (older
            # exports do this).  Accept it only if it holds real DICOM elements.
            try:
                ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE, force=True)
            except Exception as e:  # noqa: BLE001 - any failure here means "not DICOM"
                raise _error("not-dicom", "The file is not DICOM (no 'DICM' marker and no "
                             "readable DICOM elements); export images from PACS as DICOM "
                             "Part 10 files or remove this file.", path, e) from strict_error
            if not _looks_like_dicom(ds):
                raise _error("not-dicom", "The file is not DICOM (no 'DICM' marker and no "
                             "readable DICOM elements); export images from PACS as DICOM "
                             "Part 10 files or remove this file.", path, strict_error
                             ) from strict_error
            return ds
    except DicomError:
        raise
    except PermissionError as e:
        raise _error("unreadable", "The file cannot be read; check its permissions.",
                     path, e) from e
    except EOFError as e:
        raise _error("truncated", "The DICOM file ends before its header does; re-export "
                     "it from PACS.", path, e) from e
    except MemoryError as e:
        raise _error("too-large", "The DICOM header is too large to read.", path, e) from e
    except Exception as e:
        raise _error("corrupt", "The DICOM header is malformed and cannot be parsed; "
                     "re-export the file from PACS.", path, e) from e


def _int_attr(ds: Any, keyword: str, path: Path, *, default: int | None = None) -> int:
    """Read an integer attribute; a missing or malformed one is a ``corrupt`` file."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        if default is not None:
            return default
        raise _error("corrupt", f"A required image attribute ({keyword}) is missing; "
                     "re-export the file from PACS.", path)
    try:
        number = int(value)
    except (TypeError, ValueError) as e:
        raise _error("corrupt", f"The image attribute {keyword} is not a valid integer; "
                     "re-export the file from PACS.", path, e) from e
    return number


@dataclass(frozen=True)
class _Layout:
    rows: int
    cols: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str
    pixel_keyword: str


def _check_layout(ds: Any, path: Path, max_pixels: int) -> _Layout:
    """Validate the image attributes and the claimed size before decoding anything."""
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        raise _error("no-pixel-data", "The DICOM object has no pixel data (e.g. a "
                     "structured report, RT plan or DICOMDIR); remove it from the site "
                     "folder or the labels file.  (A file cut short before its image also ends up "
                     "here.)", path)
    rows = _int_attr(ds, "Rows", path)
    cols = _int_attr(ds, "Columns", path)
    frames = _int_attr(ds, "NumberOfFrames", path, default=1)
    samples = _int_attr(ds, "SamplesPerPixel", path, default=1)
    default_bits = 64 if keyword == "DoubleFloatPixelData" else 32
    bits_allocated = _int_attr(ds, "BitsAllocated", path,
                               default=default_bits if keyword != "PixelData" else None)
    bits_stored = _int_attr(ds, "BitsStored", path, default=bits_allocated)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        raise _error("corrupt", "A required image attribute (PhotometricInterpretation) is "
                     "missing; re-export the file from PACS.", path)
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise _error("corrupt", "The image size attributes (Rows, Columns, "
                     "NumberOfFrames) are not positive.", path)
    if photometric not in _MONOCHROME + _COLOUR:
        raise _error("unsupported-layout", "The photometric interpretation of this image is "
                     f"not supported (supported: {', '.join(_MONOCHROME + _COLOUR)}).", path)
    expected_samples = 1 if photometric in _MONOCHROME + ("PALETTE COLOR",) else 3
    if samples != expected_samples:
        raise _error("unsupported-layout", "The samples per pixel do not match the "
                     "photometric interpretation.", path)
    claimed = rows * cols * frames * samples
    if claimed > max_pixels:
        raise DicomError(
            "too-large",
            "The image holds more pixels than the configured limit (max_pixels); "
            "raise the limit if the site has the memory for it.",
            local_detail=f"{path}: {rows}x{cols}x{frames} frames x{samples} samples = "
            f"{claimed} > max_pixels={max_pixels}",
        )
    layout = _Layout(rows, cols, frames, samples, bits_allocated, bits_stored, photometric,
                     keyword)
    _check_pixel_length(ds, path, layout)
    return layout


def _check_pixel_length(ds: Any, path: Path, layout: _Layout) -> None:
    """Catch pixel data cut short before decoding it.

    The pixel data element must fit in the file, and uncompressed pixel data must hold
    at least the bytes the image attributes claim.
    """
    from pydicom.dataelem import RawDataElement

    element = ds.get_item(layout.pixel_keyword)
    if not isinstance(element, RawDataElement) or element.length == 0xFFFFFFFF:
        return  # already parsed, or encapsulated with undefined length: the decoder checks
    try:
        file_size = path.stat().st_size
    except OSError:
        return
    if element.value_tell is not None and element.value_tell + element.length > file_size:
        raise DicomError(
            "truncated",
            "The pixel data is shorter than the image size requires; the file was cut "
            "short, re-export it from PACS.",
            local_detail=f"{path}: pixel data element claims {element.length} bytes, the "
            f"file ends {file_size - element.value_tell} bytes after it starts",
        )
    tsyntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    if layout.pixel_keyword == "PixelData" and tsyntax not in _NATIVE_SYNTAXES:
        return
    # YBR_FULL_422 stores two luma and one pair of chroma samples per two pixels.
    samples = 2 if layout.photometric == "YBR_FULL_422" else layout.samples
    bits = layout.rows * layout.cols * layout.frames * samples * layout.bits_allocated
    if element.length < math.ceil(bits / 8):
        raise DicomError(
            "truncated",
            "The pixel data is shorter than the image size requires; the file was cut "
            "short, re-export it from PACS.",
            local_detail=f"{path}: {element.length} bytes of pixel data, "
            f"{math.ceil(bits / 8)} needed",
        )


def _decode_stored(ds: Any, path: Path, index: int | None) -> np.ndarray:
    """Decode stored values (one frame when ``index`` is given) with pydicom."""
    from pydicom.pixels import pixel_array

    return _classify_pydicom(lambda: pixel_array(ds, index=index), path)


def _classify_pydicom(func: Any, path: Path) -> Any:
    """Call ``func`` (pydicom decoding), turning its failures into :class:`DicomError`."""
    try:
        return func()
    except MemoryError as e:
        raise _error("too-large", "Not enough memory to decode this image.", path, e) from e
    except (NotImplementedError, RuntimeError) as e:
        raise _error("undecodable", "The image's compression (transfer syntax) cannot be "
                     "decoded by the installed codecs; re-export it uncompressed or as "
                     "JPEG / JPEG 2000 / RLE.", path, e) from e
    except AttributeError as e:
        if "Transfer Syntax" in str(e):
            raise _error("undecodable", "The file has no transfer syntax in its file meta "
                         "header, so its pixel data cannot be decoded; re-export it as a "
                         "DICOM Part 10 file.", path, e) from e
        raise _error("corrupt", "A required image attribute is missing or invalid; "
                     "re-export the file from PACS.", path, e) from e
    except (ValueError, EOFError) as e:
        if isinstance(e, EOFError) or "less than expected" in str(e) or "truncat" in str(e):
            raise _error("truncated", "The pixel data is shorter than the image size "
                         "requires; the file was cut short, re-export it from PACS.",
                         path, e) from e
        raise _error("corrupt", "The pixel data or the image attributes are invalid; "
                     "re-export the file from PACS.", path, e) from e
    except Exception as e:
        raise _error("undecodable", "The pixel data cannot be decoded; re-export the file "
                     "from PACS.", path, e) from e


# ------------------------------------------------------------------------ processing


def _functional_group_rescale(ds: Any, frame: int) -> tuple[float, float] | None:
    """Rescale slope/intercept of ``frame`` from an enhanced object's functional groups."""
    for seq_kw, item_index in (("PerFrameFunctionalGroupsSequence", frame),
                               ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_kw, None)
        if not seq or item_index >= len(seq):
            continue
        transform = seq[item_index].get("PixelValueTransformationSequence", None)
        if transform:
            item = transform[0]
            if "RescaleSlope" in item and "RescaleIntercept" in item:
                return float(item.RescaleSlope), float(item.RescaleIntercept)
    return None


def _modality_lut(arr: np.ndarray, ds: Any, frame: int) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return apply_modality_lut(arr, ds)
    rescale = _functional_group_rescale(ds, frame)
    if rescale is not None:
        slope, intercept = rescale
        return arr.astype(np.float64) * slope + intercept
    return arr


def _luts_elementwise(arr: np.ndarray, ds: Any, frame: int, voi_policy: str) -> np.ndarray:
    pixels = _modality_lut(arr, ds, frame)
    if voi_policy == "auto":
        from pydicom.pixels import apply_voi_lut

        pixels = apply_voi_lut(pixels, ds, index=0)
    return np.asarray(pixels, dtype=np.float64)


#: Largest stored-value range turned into a lookup table (the table has one entry per value).
_MAX_TABLE = 1 << 17


def _grey_luts(arr: np.ndarray, ds: Any, frame: int, voi_policy: str) -> np.ndarray:
    """Apply the Modality LUT and the VOI LUT (per policy) to a greyscale frame.

    Both LUTs map each stored value independently, so for integer images they are applied
    once per possible stored value in the image's range and the result is looked up: the
    same values (to float32 precision, the precision of the decoded image), without
    transforming every pixel of a large radiograph in float64.
    """
    if arr.dtype.kind not in "iu" or arr.size < 4096:
        return _luts_elementwise(arr, ds, frame, voi_policy)
    lo, hi = int(arr.min()), int(arr.max())
    start = 0 if lo >= 0 else lo  # unsigned-range tables are indexed by the values themselves
    if hi - start >= _MAX_TABLE or (hi - start + 1) * 4 > arr.size:
        return _luts_elementwise(arr, ds, frame, voi_policy)
    values = np.arange(start, hi + 1, dtype=arr.dtype).reshape(1, -1)
    table = _luts_elementwise(values, ds, frame, voi_policy).ravel().astype(np.float32)
    return table[arr] if start == 0 else table[arr.astype(np.int32) - start]


_RAW_LE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # native, not deflated


def _native_grey_frame(ds: Any, layout: _Layout, path: Path, index: int | None
                       ) -> np.ndarray | None:
    """The raw bit patterns of one uncompressed little-endian greyscale frame, or None.

    A read-only view on the pixel data read with the header (no decode, no copy); the
    unused high bits are not cleared yet -- :func:`_grey_table` does it.  pydicom's own
    validation of the image attributes runs first, so a file it would refuse fails here
    with the same reason.  None (decode with pydicom) for anything else: compressed, big
    endian or deflated data, other than 8 or 16 bits allocated, a frame the data does
    not hold, and images too small for :func:`_grey_luts` to use its table.
    """
    if (layout.pixel_keyword != "PixelData" or layout.samples != 1
            or layout.photometric not in _MONOCHROME
            or layout.bits_allocated not in (8, 16)
            or layout.rows * layout.cols < max(4096, 4 << layout.bits_allocated)):
        return None
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID", None) if file_meta is not None else None
    if str(tsyntax or "") not in _RAW_LE_SYNTAXES:
        return None

    def validated() -> Any:
        from pydicom.pixels.decoders.base import DecodeRunner
        from pydicom.pixels.utils import as_pixel_options

        runner = DecodeRunner(tsyntax)
        runner.set_source(ds)
        runner.set_options(**as_pixel_options(ds))
        runner.validate()
        return runner

    runner = _classify_pydicom(validated, path)
    if (runner.bits_allocated != layout.bits_allocated or runner.samples_per_pixel != 1
            or runner.pixel_representation not in (0, 1)):
        return None
    value = ds.PixelData
    if not isinstance(value, (bytes, bytearray)):
        return None
    itemsize = layout.bits_allocated // 8
    count = layout.rows * layout.cols
    offset = (index or 0) * count * itemsize
    if offset + count * itemsize > len(value):
        return None  # pydicom's decoder reports the missing frame
    raw = np.frombuffer(value, dtype=f"<u{itemsize}", count=count, offset=offset)
    return raw.reshape(layout.rows, layout.cols)


def _grey_table(ds: Any, layout: _Layout, frame: int, voi_policy: str) -> np.ndarray:
    """``float32`` grey value of every raw bit pattern of a native greyscale frame.

    Entry ``p`` is the Modality + VOI LUT (per policy) of the stored value pydicom
    decodes from pattern ``p`` (unused high bits cleared, sign extended when Pixel
    Representation is 1), so ``table[raw]`` is the image :func:`_grey_luts` gives from
    pydicom's array, bit for bit.  The LUTs run once per possible stored value.
    """
    bits, stored = layout.bits_allocated, layout.bits_stored
    signed = int(ds.PixelRepresentation) == 1
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    patterns = np.arange(1 << bits, dtype=f"u{bits // 8}").view(dtype)
    shift = bits - stored
    values = (patterns << shift) >> shift if shift else patterns
    lo = -(1 << (stored - 1)) if signed else 0
    domain = np.arange(lo, lo + (1 << stored), dtype=dtype).reshape(1, -1)
    grey = _luts_elementwise(domain, ds, frame, voi_policy).ravel().astype(np.float32)
    return grey[values.astype(np.int64) - lo]


def _grey_affine(lo: int, hi: int, grey: np.ndarray, photometric: str
                 ) -> tuple[float, float] | None:
    """``(scale, 0.0)`` when ``grey[v - lo] == float32(v) * scale`` exactly for every stored
    value ``v`` in ``[lo, hi]`` and ``scale`` is a power of two; otherwise None.

    ``grey`` is the ``float32`` grey value of each stored value in the range, as the
    lookup table of :func:`_grey_luts` holds it.  This is the case of a frame without
    LUTs, with an identity rescale, or with a window that maps the stored range onto
    itself.  Multiplying by a power of two is exact in floating point, so every linear
    step (cropping, resizing) run on the stored values and then scaled gives the same
    bits as on the grey image.  MONOCHROME1 (an inversion, not a scale) never qualifies.
    """
    if photometric != "MONOCHROME2" or hi <= lo or grey.shape != (hi - lo + 1,):
        return None
    scale = (float(grey[-1]) - float(grey[0])) / (hi - lo)
    if not (scale > 0 and math.isfinite(scale)) or math.frexp(scale)[0] != 0.5:
        return None
    line = np.arange(lo, hi + 1, dtype=np.float32) * np.float32(scale)
    if max(abs(lo), abs(hi)) >= 1 << 24 or not np.array_equal(grey, line):
        return None
    return scale, 0.0


def _to_grey(arr: np.ndarray, ds: Any, layout: _Layout, path: Path) -> np.ndarray:
    if layout.photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise _error("corrupt", "The palette colour lookup table is missing or "
                         "invalid.", path, e) from e
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise _error("unsupported-layout", "The colour image does not decode to RGB "
                     "samples.", path)
    return arr[..., :3].astype(np.float64) @ _LUMA


def _make_finite(pixels: np.ndarray, path: Path) -> np.ndarray:
    finite = np.isfinite(pixels)
    if finite.all():
        return pixels
    if not finite.any():
        raise _error("corrupt", "The image holds no finite pixel value.", path)
    lo = float(pixels[finite].min())
    hi = float(pixels[finite].max())
    return np.nan_to_num(pixels, nan=lo, posinf=hi, neginf=lo)


def _frame_index(frames: int, frame_policy: str) -> int:
    return 0 if frame_policy == "first" else (frames - 1) // 2


def _attr_str(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword, None)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


def _run_logging_warnings(func: Any, *args: Any) -> Any:
    """Call ``func``, sending pydicom's warnings to the DEBUG log instead of stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return func(*args)
        finally:
            for w in caught:
                logger.debug("pydicom warning: %s", w.message)


def decode_dicom(
    path: str | os.PathLike[str],
    *,
    frame_policy: str = "middle",
    voi_policy: str = "auto",
    max_pixels: int = 64_000_000,
    allow_affine: bool = False,
    dataset: Any = None,
) -> DecodedImage:
    """Decode one frame of a DICOM file into a 2-D ``float32`` greyscale image.

    Parameters
    ----------
    path:
        The DICOM file (with or without the Part 10 preamble).
    frame_policy:
        Which frame of a multi-frame object to use: ``"first"`` or ``"middle"``
        (frame ``(n - 1) // 2``).
    voi_policy:
        ``"auto"`` applies the VOI LUT Sequence or the first window when present;
        ``"none"`` keeps the full Modality-LUT range.
    max_pixels:
        Upper bound on ``Rows * Columns * NumberOfFrames * SamplesPerPixel`` as claimed
        by the header, checked before any pixel is decoded.
    allow_affine:
        Return the stored values and ``DecodedImage.affine`` instead of the grey image
        when the grey values are exactly the stored values times a power of two (see
        :class:`DecodedImage`); otherwise (and by default) the grey image.
    dataset:
        The file's dataset as :func:`read_dicom` returned it, to decode without
        reading the header again (its values are left as they are).

    Returns
    -------
    DecodedImage
        See the module docstring for the pixel pipeline.

    Raises
    ------
    DicomError
        For every failure, with a code from :data:`REASON_CODES`.
    ValueError
        For an unknown ``frame_policy`` or ``voi_policy`` (a programming error).
    """
    if frame_policy not in FRAME_POLICIES:
        raise ValueError(f"frame_policy must be one of {FRAME_POLICIES}, got {frame_policy!r}")
    if voi_policy not in VOI_POLICIES:
        raise ValueError(f"voi_policy must be one of {VOI_POLICIES}, got {voi_policy!r}")
    return _run_logging_warnings(_decode, Path(path), frame_policy, voi_policy, max_pixels,
                                 allow_affine, dataset)


def read_dicom(path: str | os.PathLike[str]) -> Any:
    """Read the dataset of a DICOM file (values over 64 KiB, pixel data included, are
    read only when used), as :func:`decode_dicom` does.

    A file without the Part 10 preamble is accepted when it holds DICOM elements; its
    dataset's ``preamble`` is then None.

    Raises
    ------
    DicomError
        As :func:`decode_dicom` does for a file it cannot read.
    """
    return _run_logging_warnings(_read_dataset, Path(path))


def _stored_affine(raw: np.ndarray | None, arr: np.ndarray | None, ds: Any,
                   layout: _Layout, frame: int, voi_policy: str
                   ) -> tuple[np.ndarray, tuple[float, float]] | None:
    """The stored values and their affine grey transform, when there is one."""
    if raw is not None:
        # Native frame: the raw patterns are the stored values when no unused high bit
        # is set (unsigned) or they are already sign extended (signed).
        signed = int(ds.PixelRepresentation) == 1
        stored = raw.view(raw.dtype.str.replace("u", "i")) if signed else raw
        lo, hi = int(stored.min()), int(stored.max())
        half = 1 << (layout.bits_stored - 1)
        if (signed and not -half <= lo <= hi < half) or (not signed and hi >= 2 * half):
            return None
        # The LUTs of the values present, as _grey_table would hold them.
        values = np.arange(lo, hi + 1, dtype=stored.dtype).reshape(1, -1)
        grey = _luts_elementwise(values, ds, frame, voi_policy).ravel().astype(np.float32)
    elif arr is not None and arr.dtype.kind in "iu" and arr.ndim == 2 and arr.size >= 4096:
        stored = arr
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo >= _MAX_TABLE:
            return None
        values = np.arange(lo, hi + 1, dtype=arr.dtype).reshape(1, -1)
        grey = _luts_elementwise(values, ds, frame, voi_policy).ravel().astype(np.float32)
    else:
        return None
    affine = _grey_affine(lo, hi, grey, layout.photometric)
    return None if affine is None else (stored, affine)


def _decode(path: Path, frame_policy: str, voi_policy: str, max_pixels: int,
            allow_affine: bool = False, dataset: Any = None) -> DecodedImage:
    ds = _read_dataset(path) if dataset is None else dataset
    layout = _check_layout(ds, path, max_pixels)
    frame = _frame_index(layout.frames, frame_policy)
    raw = _native_grey_frame(ds, layout, path, frame if layout.frames > 1 else None)
    arr = None if raw is not None else _decode_stored(
        ds, path, frame if layout.frames > 1 else None)
    affine = None
    try:
        if allow_affine and layout.photometric in _MONOCHROME:
            affine = _stored_affine(raw, arr, ds, layout, frame, voi_policy)
        if affine is not None:
            pixels = affine[0]
        elif raw is not None:
            # Uncompressed greyscale: look the raw patterns up in a table of the LUTs.
            table = _grey_table(ds, layout, frame, voi_policy)
            pixels = table[raw]
            if not np.isfinite(table).all():
                pixels = _make_finite(pixels, path)
        elif layout.photometric in _MONOCHROME:
            if arr.ndim != 2:
                raise _error("unsupported-layout", "The greyscale frame does not decode to "
                             "a 2-D array.", path)
            pixels = _make_finite(_grey_luts(arr, ds, frame, voi_policy), path)
        else:
            pixels = _make_finite(_to_grey(arr, ds, layout, path), path)
        if layout.photometric == "MONOCHROME1" and affine is None:
            pixels = pixels.min() + pixels.max() - pixels
    except DicomError:
        raise
    except MemoryError as e:
        raise _error("too-large", "Not enough memory to process this image.", path, e) from e
    except Exception as e:
        raise _error("corrupt", "The image's lookup tables (Modality LUT, VOI LUT or "
                     "palette) are invalid; re-export the file from PACS.", path, e) from e
    return DecodedImage(
        pixels=pixels if affine is not None else np.ascontiguousarray(pixels,
                                                                       dtype=np.float32),
        modality=_attr_str(ds, "Modality") or "",
        photometric=layout.photometric,
        bits_stored=layout.bits_stored,
        rows=layout.rows,
        cols=layout.cols,
        frames=layout.frames,
        sop_instance_uid=_attr_str(ds, "SOPInstanceUID"),
        manufacturer=_attr_str(ds, "Manufacturer"),
        affine=affine[1] if affine is not None else None,
    )


def decode_pixel_array(
    path: str | os.PathLike[str], *, max_pixels: int = 64_000_000
) -> np.ndarray:
    """Return the stored pixel array exactly as pydicom's ``pixel_array`` gives it.

    All frames, native byte order as pydicom returns it, YBR converted to RGB, no LUT
    applied: the array ``MANIFEST.csv`` of the test corpus describes.  Failures raise
    :class:`DicomError` as in :func:`decode_dicom`.
    """
    path = Path(path)

    def _run() -> np.ndarray:
        ds = _read_dataset(path)
        _check_layout(ds, path, max_pixels)
        return _decode_stored(ds, path, None)

    return _run_logging_warnings(_run)
