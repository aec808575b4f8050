"""Tests for the DICOM site writer and the synthetic chest-phantom federation."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid

from fedrad.common.errors import ConfigError, FedradError
from fedrad.simulations.dicom_writer import (
    DEFAULT_PROFILES,
    FEDERATION_MANIFEST,
    NEUTRAL_PROFILE,
    ScannerProfile,
    apply_profile,
    available_transfer_syntaxes,
    load_federation,
    read_labels_csv,
    write_dicom,
)
from fedrad.simulations.synthetic import (
    CLASS_NAMES,
    generate_synthetic_federation,
    make_phantom,
    site_plan,
)

ALL_PROFILES = [
    *DEFAULT_PROFILES,
    NEUTRAL_PROFILE,
    dataclasses.replace(NEUTRAL_PROFILE, name="implicit", transfer_syntax="implicit-le"),
    dataclasses.replace(
        DEFAULT_PROFILES[2], name="j2k-16", bits_stored=16, photometric="MONOCHROME1"
    ),
]
EXPECTED_TS = {
    "explicit-le": uid.ExplicitVRLittleEndian,
    "implicit-le": uid.ImplicitVRLittleEndian,
    "rle": uid.RLELossless,
    "jpeg2000-lossless": uid.JPEG2000Lossless,
}


def _gradient(size: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return ((x + y) / (2 * (size - 1))).astype(np.float64)


def _rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(np.argsort(scores))
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((order[pos].sum() + n_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- scanner profiles and write_dicom -------------------------------------------------------


def test_default_profiles_contrast() -> None:
    assert len(DEFAULT_PROFILES) == 3
    assert len({p.transfer_syntax for p in DEFAULT_PROFILES}) == 3
    assert len({p.bits_stored for p in DEFAULT_PROFILES}) == 3
    assert len({p.manufacturer for p in DEFAULT_PROFILES}) == 3
    assert {p.photometric for p in DEFAULT_PROFILES} == {"MONOCHROME1", "MONOCHROME2"}


@pytest.mark.parametrize("profile", ALL_PROFILES, ids=lambda p: p.name)
def test_profile_round_trip(tmp_path: Path, profile: ScannerProfile) -> None:
    exact = dataclasses.replace(profile, noise_std=0.0)
    image = _gradient()
    path = write_dicom(tmp_path / "a.dcm", image, profile=exact, rng=np.random.default_rng(0))

    assert path.read_bytes()[128:132] == b"DICM"  # Part 10 preamble + prefix
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == EXPECTED_TS[profile.transfer_syntax]
    assert ds.SOPClassUID == profile.sop_class_uid
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.PhotometricInterpretation == profile.photometric
    assert ds.BitsStored == profile.bits_stored
    assert ds.BitsAllocated == (8 if profile.bits_stored == 8 else 16)
    assert ds.HighBit == profile.bits_stored - 1
    assert ds.Modality == profile.modality
    assert str(ds.PatientName).startswith("SYNTH^")
    assert ds.PatientID and ds.PatientBirthDate
    assert float(ds.RescaleSlope) == pytest.approx(profile.rescale_slope)
    assert float(ds.RescaleIntercept) == pytest.approx(profile.rescale_intercept)
    assert ("WindowCenter" in ds) == (profile.window_center is not None)

    pixels = ds.pixel_array
    assert pixels.shape == image.shape
    assert pixels.dtype == (np.uint8 if profile.bits_stored == 8 else np.uint16)
    assert int(pixels.max()) <= profile.max_stored
    # Undoing rescale and inversion gives the contrast-curved image, to quantisation.
    recovered = profile.stored_to_unit(pixels)
    expected = image**profile.contrast
    assert np.max(np.abs(recovered - expected)) <= 0.6 / profile.max_stored + 1e-9
    # Brightest input pixel: 0 when inverted (MONOCHROME1), full scale otherwise.
    brightest = pixels[-1, -1]
    darkest = pixels[0, 0]
    if profile.photometric == "MONOCHROME1":
        assert (brightest, darkest) == (0, profile.max_stored)
    else:
        assert (brightest, darkest) == (profile.max_stored, 0)


def test_noise_and_contrast_are_applied() -> None:
    image = np.full((64, 64), 0.5)
    noisy = DEFAULT_PROFILES[1]  # noise 0.03, gamma 1.35, inverted
    stored = apply_profile(image, noisy, np.random.default_rng(0))
    unit = noisy.stored_to_unit(stored)
    assert unit.std() == pytest.approx(noisy.noise_std, rel=0.2)
    assert unit.mean() == pytest.approx(0.5**noisy.contrast, abs=0.01)


def test_write_dicom_is_deterministic_per_rng(tmp_path: Path) -> None:
    image = _gradient(48)
    profile = DEFAULT_PROFILES[1]
    a = write_dicom(tmp_path / "a.dcm", image, profile=profile, rng=np.random.default_rng(5))
    b = write_dicom(tmp_path / "b.dcm", image, profile=profile, rng=np.random.default_rng(5))
    c = write_dicom(tmp_path / "c.dcm", image, profile=profile, rng=np.random.default_rng(6))
    assert _sha(a) == _sha(b)
    ds_a, ds_c = pydicom.dcmread(a), pydicom.dcmread(c)
    assert ds_a.SOPInstanceUID != ds_c.SOPInstanceUID
    assert ds_a.StudyInstanceUID != ds_c.StudyInstanceUID


def test_write_dicom_identity_and_extra(tmp_path: Path) -> None:
    profile = DEFAULT_PROFILES[0]
    rng = np.random.default_rng(1)
    path = write_dicom(
        tmp_path / "x.dcm",
        _gradient(),
        profile=profile,
        rng=rng,
        patient_name="SYNTH^0042",
        patient_id="P-42",
        uid_prefix="1.2.3.",
        extra={"Manufacturer": "Override Inc", "ImageComments": "hello"},
    )
    ds = pydicom.dcmread(path)
    assert str(ds.PatientName) == "SYNTH^0042" and ds.PatientID == "P-42"
    assert ds.SOPInstanceUID.startswith("1.2.3.")
    assert ds.Manufacturer == "Override Inc" and ds.ImageComments == "hello"
    # The override must not leak into later files of the same profile.
    again = pydicom.dcmread(write_dicom(tmp_path / "y.dcm", _gradient(), profile=profile, rng=rng))
    assert again.Manufacturer == profile.manufacturer
    assert "ImageComments" not in again


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((4, 4, 4)), "2-D"),
        (np.full((8, 8), np.nan), "NaN"),
        (np.full((8, 8), 1.5), r"\[0, 1\]"),
        (np.zeros((8, 8), dtype=np.uint8), "float"),
    ],
)
def test_write_dicom_rejects_bad_images(tmp_path: Path, image: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_dicom(tmp_path / "x.dcm", image, profile=NEUTRAL_PROFILE, rng=np.random.default_rng())


def test_write_dicom_rejects_unknown_extra_keyword(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NotAKeyword"):
        write_dicom(
            tmp_path / "x.dcm",
            _gradient(),
            profile=NEUTRAL_PROFILE,
            rng=np.random.default_rng(),
            extra={"NotAKeyword": 1},
        )


def test_jpeg2000_needs_32_pixels(tmp_path: Path) -> None:
    with pytest.raises(FedradError) as info:
        write_dicom(
            tmp_path / "x.dcm",
            _gradient(28),
            profile=DEFAULT_PROFILES[2],
            rng=np.random.default_rng(),
        )
    assert info.value.code == "image-too-small"
    assert "32" in str(info.value)


def test_jpeg_ls_only_with_its_encoder(tmp_path: Path) -> None:
    profile = dataclasses.replace(NEUTRAL_PROFILE, name="jls", transfer_syntax="jpeg-ls-lossless")
    if "jpeg-ls-lossless" in available_transfer_syntaxes():
        ds = pydicom.dcmread(
            write_dicom(
                tmp_path / "x.dcm", _gradient(), profile=profile, rng=np.random.default_rng()
            )
        )
        assert ds.file_meta.TransferSyntaxUID == uid.JPEGLSLossless
    else:
        with pytest.raises(FedradError) as info:
            write_dicom(
                tmp_path / "x.dcm", _gradient(), profile=profile, rng=np.random.default_rng()
            )
        assert info.value.code == "encoder-unavailable"
        assert "pyjpegls" in str(info.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"bits_stored": 10}, "bits_stored"),
        ({"photometric": "RGB"}, "photometric"),
        ({"transfer_syntax": "jpeg-lossy"}, "transfer_syntax"),
        ({"modality": "CT"}, "modality"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"contrast": 0.0}, "contrast"),
        ({"rescale_slope": 0.0}, "rescale_slope"),
        ({"window_center": 10.0}, "window_width"),
    ],
)
def test_profile_validation(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(NEUTRAL_PROFILE, **change)


# --- phantom ---------------------------------------------------------------------------------


def test_phantom_shape_range_and_determinism() -> None:
    a = make_phantom(np.random.default_rng(3), 64, opacity=True)
    b = make_phantom(np.random.default_rng(3), 64, opacity=True)
    c = make_phantom(np.random.default_rng(4), 64, opacity=True)
    assert a.shape == (64, 64) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01
    with pytest.raises(ConfigError):
        make_phantom(np.random.default_rng(), 8, opacity=False)


def test_phantom_anatomy_lungs_darker_than_mediastinum() -> None:
    img = make_phantom(np.random.default_rng(0), 128, opacity=False)
    lung = img[40:70, 25:45].mean()  # right lung (image left)
    mediastinum = img[40:70, 60:68].mean()
    outside = img[:, :4].mean()
    assert outside < lung < mediastinum


def test_opacity_is_local_brightening_of_varying_strength() -> None:
    peaks, areas = [], []
    for seed in range(30):
        normal = make_phantom(np.random.default_rng(seed), 64, opacity=False)
        sick = make_phantom(np.random.default_rng(seed), 64, opacity=True)
        diff = sick.astype(np.float64) - normal
        assert diff.min() >= -1e-6  # the opacity only adds density
        peaks.append(diff.max())
        areas.append((diff > 0.02).mean())
    peaks_arr = np.array(peaks)
    assert peaks_arr.min() > 0.02  # always present ...
    assert peaks_arr.max() > 2 * peaks_arr.min()  # ... with varied contrast
    assert max(areas) < 0.25  # local, never the whole image


def test_mean_intensity_does_not_separate_the_classes() -> None:
    rng = np.random.default_rng(11)
    labels = np.array([i % 2 for i in range(120)])
    means = np.array([make_phantom(rng, 48, opacity=bool(y)).mean() for y in labels])
    auc = _rank_auc(means, labels)
    assert 0.2 < auc < 0.8


# --- federation ------------------------------------------------------------------------------


def test_site_plan_varies_sites() -> None:
    sizes, prevs = site_plan(3, 240, 0.4)
    assert sizes == [180, 240, 300]
    assert prevs == pytest.approx([0.5, 0.4, 0.3])
    assert site_plan(2, [5, 7], [0.2, 0.6]) == ([5, 7], [0.2, 0.6])
    with pytest.raises(ConfigError, match="images_per_site"):
        site_plan(3, [5, 7], 0.4)
    with pytest.raises(ConfigError, match="prevalence"):
        site_plan(2, 10, 1.0)


def _small_federation(out: Path, **kwargs):
    args = dict(
        num_sites=2, images_per_site=[6, 8], test_images=6, image_size=32, prevalence=0.5, seed=1
    )
    args.update(kwargs)
    return generate_synthetic_federation(out, **args)


def test_synthetic_federation_layout_and_labels(tmp_path: Path) -> None:
    fed = _small_federation(tmp_path / "fed")
    assert fed.class_names == CLASS_NAMES == ["normal", "opacity"]
    assert [s.site_id for s in fed.sites] == ["site-1", "site-2"]
    assert [s.num_images for s in fed.sites] == [6, 8]
    assert fed.test is not None and fed.test.num_images == 6
    assert "2 sites" in fed.description

    for site, profile in [*zip(fed.sites, DEFAULT_PROFILES[:2], strict=True), (fed.test, None)]:
        assert site.labels_csv.read_text().splitlines()[0] == "file,label"
        rows = read_labels_csv(site.labels_csv)
        assert len(rows) == site.num_images
        assert sorted(p.name for p in site.dicom_dir.glob("*.dcm")) == sorted(f for f, _ in rows)
        labels = [label for _, label in rows]
        assert set(labels) == {0, 1}
        assert site.class_counts == [labels.count(0), labels.count(1)]
        syntaxes = set()
        for name, _ in rows:
            ds = pydicom.dcmread(site.dicom_dir / name)
            assert ds.pixel_array.shape == (32, 32)
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
        if profile is not None:
            assert syntaxes == {EXPECTED_TS[profile.transfer_syntax]}
        else:  # the test set mixes the site profiles
            assert len(syntaxes) == 3

    loaded = load_federation(tmp_path / "fed")
    assert (tmp_path / "fed" / FEDERATION_MANIFEST).is_file()
    assert [s.to_dict() for s in loaded.sites] == [s.to_dict() for s in fed.sites]
    assert loaded.test is not None and loaded.test.to_dict() == fed.test.to_dict()
    assert loaded.class_names == fed.class_names


def test_synthetic_federation_is_deterministic(tmp_path: Path) -> None:
    a = _small_federation(tmp_path / "a")
    b = _small_federation(tmp_path / "b", workers=2)
    c = _small_federation(tmp_path / "c", seed=2)
    for sa, sb, sc in zip(a.sites, b.sites, c.sites, strict=True):
        assert sa.labels_csv.read_text() == sb.labels_csv.read_text()
        for f in sorted(sa.dicom_dir.iterdir()):
            assert _sha(f) == _sha(sb.dicom_dir / f.name)
        assert any(_sha(f) != _sha(sc.dicom_dir / f.name) for f in sorted(sa.dicom_dir.iterdir()))


def test_synthetic_federation_refuses_to_overwrite(tmp_path: Path) -> None:
    _small_federation(tmp_path / "fed", test_images=0)
    keep = tmp_path / "fed" / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(FedradError) as info:
        _small_federation(tmp_path / "fed")
    assert info.value.code == "output-exists"
    fed = _small_federation(tmp_path / "fed", overwrite=True, images_per_site=[4, 4])
    assert [len(list(s.dicom_dir.glob("*.dcm"))) for s in fed.sites] == [4, 4]
    assert keep.read_text() == "mine"  # only generated folders are replaced


def test_synthetic_federation_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        _small_federation(tmp_path / "x", image_size=8)
    with pytest.raises(ConfigError, match="workers"):
        _small_federation(tmp_path / "y", workers=-1)
    with pytest.raises(ConfigError, match="profiles"):
        _small_federation(tmp_path / "z", profiles=())


def test_synthetic_federation_checks_jpeg2000_size_early(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JPEG 2000"):
        _small_federation(tmp_path / "x", image_size=24)
    assert not (tmp_path / "x").exists()
    fed = _small_federation(tmp_path / "y", image_size=24, profiles=DEFAULT_PROFILES[:2])
    assert fed.sites[0].num_images == 6


def test_profile_resolution_resamples_like_a_coarser_detector(tmp_path: Path) -> None:
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)  # 1-pixel detail
    image = checker * 0.5 + 0.25
    image[:, :32] *= 0.5  # and a coarse left/right difference
    coarse = dataclasses.replace(NEUTRAL_PROFILE, name="coarse", noise_std=0.0, resolution=0.5)
    full = dataclasses.replace(coarse, name="full", resolution=1.0)
    a = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", image, profile=coarse,
                                    rng=np.random.default_rng(0)))
    b = pydicom.dcmread(write_dicom(tmp_path / "b.dcm", image, profile=full,
                                    rng=np.random.default_rng(0)))
    assert (a.Rows, a.Columns) == (32, 32) and (b.Rows, b.Columns) == (64, 64)
    assert float(a.PixelSpacing[0]) == pytest.approx(2 * float(b.PixelSpacing[0]), rel=1e-3)
    px = a.pixel_array.astype(float)
    right = px[4:-4, 20:-4]
    assert right.std() < 0.05 * right.mean()  # the 1-pixel checkerboard is averaged away
    assert px[:, :12].mean() < 0.7 * px[:, 20:].mean()  # the coarse difference stays
    with pytest.raises(ConfigError, match="resolution=0.0 must be in \\(0, 4\\]"):
        dataclasses.replace(NEUTRAL_PROFILE, name="bad", resolution=0.0)


def test_jpeg2000_sites_upscale_for_what_their_detector_samples() -> None:
    from fedrad.simulations.dicom_writer import MIN_JPEG2000_SIZE
    from fedrad.simulations.medmnist import _upscale_factor

    j2k = dataclasses.replace(NEUTRAL_PROFILE, name="j2k", transfer_syntax="jpeg2000-lossless")
    assert _upscale_factor(64, j2k) == 1
    assert _upscale_factor(64, dataclasses.replace(j2k, resolution=0.5)) * 32 >= MIN_JPEG2000_SIZE
