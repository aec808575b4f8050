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
