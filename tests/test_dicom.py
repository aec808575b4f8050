"""DICOM decoding against the shared corpus (../shared/data/dicom-corpus) and edge cases."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedrad.common.dicom import (
    REASON_CODES,
    DecodedImage,
    DicomError,
    decode_dicom,
    decode_pixel_array,
)
from fedrad.common.errors import FedradError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS = DATA / "dicom-corpus"
MANIFEST = CORPUS / "MANIFEST.csv"
SKIP_REASON = f"DICOM corpus not found at {CORPUS} (see shared/data/README.md)"
needs_corpus = pytest.mark.skipif(not MANIFEST.is_file(), reason=SKIP_REASON)

# NO_PIXELS in the manifest, but not DICOM at all for a strict reader: a README text file,
# and a big-endian dataset without preamble or file meta that pydicom cannot parse.
NOT_DICOM_IN_MANIFEST = {
    "pydicom-wheel/dicomdirtests/TINY_ALPHA/README",
    "pydicom-wheel/no_meta.dcm",
}
# The reason codes we expect for the corpus's known-broken files.
EXPECTED_FAILURES = {
    "pydicom-wheel/MR_truncated.dcm": "truncated",
    "pydicom-wheel/badVR.dcm": "corrupt",
    "pydicom-wheel/nested_priv_SQ.dcm": "corrupt",
    "pydicom-wheel/meta_missing_tsyntax.dcm": "corrupt",
    "pydicom-wheel/JPEG-lossy.dcm": "undecodable",
    "pydicom-wheel/JPEG2000-embedded-sequence-delimiter.dcm": "undecodable",
    "pydicom-data/OT-PAL-8-face.dcm": "undecodable",
    "pydicom-data/liver_deflate.dcm": "undecodable",
    "pydicom-data/liver_nonbyte_aligned_deflate.dcm": "undecodable",
    "pydicom-data/liver_rle.dcm": "undecodable",
    "pydicom-data/liver_nonbyte_aligned_rle.dcm": "undecodable",
}
CT_SMALL = CORPUS / "pydicom-wheel" / "CT_small.dcm"
MONO1 = CORPUS / "cxr-real" / "txv_Fake_MONOHR1.dcm"


def _manifest(status: str) -> list:
    if not MANIFEST.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=SKIP_REASON), id="no-corpus")]
    with open(MANIFEST, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [pytest.param(row, id=row["file"]) for row in rows
            if row["status"].split(":")[0] == status]


def _assert_safe(err: DicomError, path: Path) -> None:
    text = str(err)
    assert str(path) not in text
    assert f"{path.parent.name}/{path.name}" not in text
    assert str(path.parent) not in text
    if path.suffix:  # (a bare name like 'DICOMDIR' may be an ordinary word)
        assert path.name not in text
    assert err.local_detail is not None and str(path) in err.local_detail


@needs_corpus
def test_manifest_has_every_status() -> None:
    assert len(_manifest("OK")) > 150
    assert len(_manifest("NO_PIXELS")) > 50
    assert len(_manifest("DECODE_FAIL")) == len(EXPECTED_FAILURES)


@pytest.mark.parametrize("row", _manifest("OK"))
def test_ok_file_decodes_like_manifest(row: dict) -> None:
    path = CORPUS / row["file"]
    raw = decode_pixel_array(path)
    assert "x".join(map(str, raw.shape)) == row["shape"]
    assert str(raw.dtype) == row["dtype"]
    assert float(raw.min()) == float(row["min"])
    assert float(raw.max()) == float(row["max"])

    image = decode_dicom(path)
    assert isinstance(image, DecodedImage)
    assert image.pixels.dtype == np.float32
    assert image.pixels.ndim == 2
    assert image.pixels.shape == (image.rows, image.cols)
    assert np.isfinite(image.pixels).all()
    assert image.photometric == row["photometric"]
    assert image.frames == int(row["frames"])
    dims = [int(d) for d in row["shape"].split("x")]
    if image.frames > 1:
        dims = dims[1:]
    assert dims[:2] == [image.rows, image.cols]


@pytest.mark.parametrize("row", _manifest("NO_PIXELS"))
def test_file_without_pixels_is_rejected(row: dict) -> None:
    path = CORPUS / row["file"]
    with pytest.raises(DicomError) as info:
        decode_dicom(path)
    expected = "not-dicom" if row["file"] in NOT_DICOM_IN_MANIFEST else "no-pixel-data"
    assert info.value.code == expected
    _assert_safe(info.value, path)


@pytest.mark.parametrize("row", _manifest("DECODE_FAIL"))
def test_broken_file_raises_dicom_error(row: dict) -> None:
    path = CORPUS / row["file"]
    with pytest.raises(DicomError) as info:
        decode_dicom(path)
    assert info.value.code in REASON_CODES
    assert info.value.code == EXPECTED_FAILURES[row["file"]]
    _assert_safe(info.value, path)
    with pytest.raises(DicomError):
        decode_pixel_array(path)


def test_not_dicom_file(tmp_path: Path) -> None:
    path = tmp_path / "secret-patient-name.dcm"
    path.write_text("file,label\nsomething.dcm,1\n" * 50)
    with pytest.raises(DicomError) as info:
        decode_dicom(path)
    assert info.value.code == "not-dicom"
    assert isinstance(info.value, FedradError)
    _assert_safe(info.value, path)


def test_random_bytes_are_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DicomError) as info:
        decode_dicom(path)
    assert info.value.code == "not-dicom"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.touch()
    with pytest.raises(DicomError) as info:
        decode_dicom(path)
    assert info.value.code == "empty-file"
    _assert_safe(info.value, path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.dcm"
    with pytest.raises(DicomError) as info:
        decode_dicom(path)
    assert info.value.code == "missing-file"
    _assert_safe(info.value, path)


@needs_corpus
def test_file_cut_inside_pixel_data_is_truncated(tmp_path: Path) -> None:
    data = CT_SMALL.read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(DicomError) as info:
        decode_dicom(path)
    assert info.value.code == "truncated"
    _assert_safe(info.value, path)


@needs_corpus
def test_size_is_checked_before_decoding() -> None:
    with pytest.raises(DicomError) as info:
        decode_dicom(CT_SMALL, max_pixels=128 * 128 - 1)
    assert info.value.code == "too-large"
    assert "16384" not in str(info.value)  # tag-derived numbers stay local
    assert decode_dicom(CT_SMALL, max_pixels=128 * 128).pixels.shape == (128, 128)


@needs_corpus
def test_monochrome1_is_inverted() -> None:
    mono2 = next((CORPUS / "cxr-real").glob("siim_*.dcm"))
    a = decode_dicom(mono2)
    b = decode_dicom(MONO1)
    assert (a.photometric, b.photometric) == ("MONOCHROME2", "MONOCHROME1")
    # Same stored pixels, opposite photometric: the decoded images are negatives.
    raw_a, raw_b = decode_pixel_array(mono2), decode_pixel_array(MONO1)
    np.testing.assert_array_equal(raw_a, raw_b)
    corr = np.corrcoef(a.pixels.ravel(), b.pixels.ravel())[0, 1]
    assert corr < -0.999
    np.testing.assert_allclose(a.pixels + b.pixels, a.pixels.min() + a.pixels.max(), atol=1e-3)


@needs_corpus
def test_rescale_slope_intercept_is_applied() -> None:
    raw = decode_pixel_array(CT_SMALL).astype(np.float32)
    image = decode_dicom(CT_SMALL, voi_policy="none")
    np.testing.assert_allclose(image.pixels, raw * 1.0 - 1024.0)
    assert image.modality == "CT"
    assert image.bits_stored == 16
    assert image.sop_instance_uid is not None


@needs_corpus
def test_enhanced_multiframe_rescale_and_frame_policy() -> None:
    import pydicom

    path = CORPUS / "pydicom-data" / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    raw = decode_pixel_array(path)
    first = decode_dicom(path, frame_policy="first", voi_policy="none")
    expected = raw[0] * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
    np.testing.assert_allclose(first.pixels, expected.astype(np.float32))
    assert first.frames == raw.shape[0] == 2


@needs_corpus
def test_frame_policy_picks_first_or_middle() -> None:
    path = CORPUS / "pydicom-data" / "emri_small.dcm"
    raw = decode_pixel_array(path)
    assert raw.shape[0] == 10
    first = decode_dicom(path, frame_policy="first", voi_policy="none")
    middle = decode_dicom(path, frame_policy="middle", voi_policy="none")
    np.testing.assert_array_equal(first.pixels, raw[0].astype(np.float32))
    np.testing.assert_array_equal(middle.pixels, raw[4].astype(np.float32))


@needs_corpus
def test_voi_lut_policy() -> None:
    path = CORPUS / "pydicom-data" / "vlut_04.dcm"
    auto = decode_dicom(path, voi_policy="auto")
    none = decode_dicom(path, voi_policy="none")
    assert auto.pixels.shape == none.pixels.shape
    assert not np.array_equal(auto.pixels, none.pixels)
    np.testing.assert_array_equal(none.pixels, decode_pixel_array(path).astype(np.float32))


@needs_corpus
def test_colour_is_converted_to_luma() -> None:
    path = CORPUS / "pydicom-wheel" / "ExplVR_BigEnd.dcm"
    rgb = decode_pixel_array(path).astype(np.float64)
    grey = decode_dicom(path)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(grey.pixels, expected, rtol=1e-5, atol=1e-3)


@needs_corpus
def test_file_without_preamble_is_read(tmp_path: Path) -> None:
    # A bare dataset (no 128-byte preamble / 'DICM') is still DICOM.
    path = CORPUS / "pydicom-data" / "JLSL_RGB_ILV0.dcm"
    assert path.read_bytes()[128:132] != b"DICM"
    copy = tmp_path / "bare"
    shutil.copy(path, copy)
    assert decode_dicom(copy).pixels.ndim == 2


def test_bad_policy_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frame_policy"):
        decode_dicom(tmp_path / "x.dcm", frame_policy="last")
    with pytest.raises(ValueError, match="voi_policy"):
        decode_dicom(tmp_path / "x.dcm", voi_policy="window")


@pytest.mark.parametrize("name", ["pydicom-wheel/CT_small.dcm", "pydicom-data/mlut_18.dcm",
                                  "pydicom-data/vlut_04.dcm", "pydicom-data/RG1_J2KI.dcm"])
def test_lut_lookup_table_equals_per_pixel_luts(name: str, monkeypatch) -> None:
    """The per-value LUT table gives the same image as applying the LUTs to every pixel."""
    import fedrad.common.dicom as dicom_mod

    path = CORPUS / name
    if not path.is_file():
        pytest.skip(f"{name} not in the corpus")
    fast = dicom_mod.decode_dicom(path).pixels
    monkeypatch.setattr(dicom_mod, "_grey_luts", dicom_mod._luts_elementwise)
    slow = dicom_mod.decode_dicom(path).pixels
    span = float(slow.max() - slow.min()) or 1.0
    assert fast.shape == slow.shape
    assert float(np.abs(fast - slow).max()) / span < 1e-6


# ------------------------------------------------ uncompressed fast path, stored-value form


def _write_grey(path: Path, stored: np.ndarray, *, bits_allocated: int = 16,
                bits_stored: int = 12, signed: bool = False, photometric: str = "MONOCHROME2",
                implicit: bool = False, **attrs: object) -> Path:
    """Write an uncompressed greyscale DICOM file whose pixel data holds ``stored`` as is."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _lut_item() -> object:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (np.sqrt(np.arange(4096)) * 1000).astype("<u2").tobytes()
    return item


_RNG = np.random.default_rng(7)
_U12 = _RNG.integers(0, 4096, (520, 512)).astype(np.uint16)
_S12 = _RNG.integers(-2048, 2048, (520, 512)).astype(np.int16)
GREY_CASES = {
    "plain": (_U12, {}),
    "unused-high-bits-set": (_U12 | (_RNG.integers(0, 16, _U12.shape).astype(np.uint16) << 12),
                             {}),
    "window-clips": (_U12, {"WindowCenter": 1500, "WindowWidth": 800}),
    "window-is-identity": (_U12, {"WindowCenter": 2048, "WindowWidth": 4096}),
    "rescale": (_U12, {"RescaleSlope": 0.5, "RescaleIntercept": -1024}),
    "sigmoid": (_U12, {"RescaleSlope": 2, "RescaleIntercept": -100, "WindowCenter": 3000,
                       "WindowWidth": 5000, "VOILUTFunction": "SIGMOID"}),
    "monochrome1": (_U12, {"photometric": "MONOCHROME1"}),
    "implicit-vr": (_U12, {"implicit": True, "WindowCenter": 1000, "WindowWidth": 1200}),
    "signed": (_S12, {"signed": True, "RescaleSlope": 1, "RescaleIntercept": 0}),
    "signed-not-extended": ((_S12.view(np.uint16) & 0x0FFF).view(np.int16), {"signed": True}),
    "signed-16": (_RNG.integers(-30000, 30000, _U12.shape).astype(np.int16),
                  {"signed": True, "bits_stored": 16, "WindowCenter": 0, "WindowWidth": 20000}),
    "unsigned-16": (_RNG.integers(0, 65536, _U12.shape).astype(np.uint16), {"bits_stored": 16}),
    "8-bit": (_RNG.integers(0, 256, _U12.shape).astype(np.uint8),
              {"bits_allocated": 8, "bits_stored": 7, "WindowCenter": 60, "WindowWidth": 50}),
    "voi-lut-sequence": (_U12, {"VOILUTSequence": None}),
    "three-frames": (_RNG.integers(0, 4096, (3, 520, 512)).astype(np.uint16), {}),
    "constant": (np.full(_U12.shape, 777, np.uint16), {}),
}


def _grey_case(tmp_path: Path, name: str) -> Path:
    from pydicom.sequence import Sequence

    stored, attrs = GREY_CASES[name]
    attrs = dict(attrs)
    if "VOILUTSequence" in attrs:
        attrs["VOILUTSequence"] = Sequence([_lut_item()])
    return _write_grey(tmp_path / f"{name}.dcm", stored, **attrs)


@pytest.mark.parametrize("name", list(GREY_CASES))
def test_uncompressed_fast_path_gives_pydicoms_image(tmp_path: Path, name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading uncompressed greyscale pixels directly and looking them up in a table of
    every bit pattern gives the same bits as pydicom's decoder and the per-value LUTs."""
    import fedrad.common.dicom as dicom_mod

    path = _grey_case(tmp_path, name)
    used = []
    table = dicom_mod._grey_table
    monkeypatch.setattr(dicom_mod, "_grey_table", lambda *a: used.append(1) or table(*a))
    fast = {policy: decode_dicom(path, voi_policy=policy, frame_policy="first").pixels
            for policy in ("auto", "none")}
    assert used, "the uncompressed fast path was not taken"
    monkeypatch.setattr(dicom_mod, "_native_grey_frame", lambda *a: None)
    for policy, image in fast.items():
        slow = decode_dicom(path, voi_policy=policy, frame_policy="first").pixels
        assert image.dtype == slow.dtype == np.float32 and image.shape == slow.shape
        assert np.array_equal(image.view(np.uint32), slow.view(np.uint32)), policy


def test_fast_path_keeps_pydicoms_validation(tmp_path: Path) -> None:
    path = _write_grey(tmp_path / "x.dcm", _U12, bits_stored=12)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.PixelRepresentation = 3  # invalid: pydicom refuses it, so must we
    ds.save_as(path)
    with pytest.raises(DicomError) as info:
        decode_dicom(path)
    assert info.value.code == "corrupt"
    short = _write_grey(tmp_path / "frames.dcm", _U12, NumberOfFrames=4)  # holds one frame
    with pytest.raises(DicomError) as info:
        decode_dicom(short, frame_policy="middle")
    assert info.value.code in ("truncated", "corrupt")


@pytest.mark.parametrize("name", list(GREY_CASES))
def test_stored_value_form_only_when_exact(tmp_path: Path, name: str) -> None:
    """``allow_affine`` hands out the stored values only when scaling them by the given
    power of two reproduces the grey image bit for bit."""
    path = _grey_case(tmp_path, name)
    grey = decode_dicom(path)
    lazy = decode_dicom(path, allow_affine=True)
    if lazy.affine is None:
        assert np.array_equal(lazy.pixels.view(np.uint32), grey.pixels.view(np.uint32))
        return
    slope, intercept = lazy.affine
    assert intercept == 0.0 and slope > 0 and np.log2(slope).is_integer()
    assert lazy.pixels.dtype.kind in "iu"
    rebuilt = lazy.pixels.astype(np.float32) * np.float32(slope)
    assert np.array_equal(rebuilt.view(np.uint32), grey.pixels.view(np.uint32))


def test_stored_value_form_is_used_for_plain_images(tmp_path: Path) -> None:
    for name in ("plain", "window-is-identity", "signed", "unsigned-16", "three-frames"):
        assert decode_dicom(_grey_case(tmp_path, name), allow_affine=True).affine == (1.0, 0.0)
    for name in ("window-clips", "rescale", "monochrome1", "sigmoid", "constant",
                 "unused-high-bits-set"):
        assert decode_dicom(_grey_case(tmp_path, name), allow_affine=True).affine is None
