"""Tests for MedMNIST loading, Dirichlet partitioning and the MedMNIST DICOM federation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedrad.common.errors import ConfigError, FedradError
from fedrad.simulations.dicom_writer import DEFAULT_PROFILES, NEUTRAL_PROFILE, read_labels_csv
from fedrad.simulations.medmnist import (
    EXPECTED_KEYS,
    load_medmnist,
    partition_non_iid,
    write_medmnist_federation,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PNEUMONIA = DATA / "pneumoniamnist" / "pneumoniamnist.npz"
needs_pneumonia = pytest.mark.skipif(
    not PNEUMONIA.is_file(), reason=f"PneumoniaMNIST not found at {PNEUMONIA} (../shared/data)"
)


def make_npz(
    path: Path,
    *,
    sizes: tuple[int, int, int] = (40, 10, 12),
    shape: tuple[int, ...] = (28, 28),
    num_classes: int = 2,
    label_cols: int = 1,
    drop: tuple[str, ...] = (),
    **extra: np.ndarray,
) -> Path:
    """Write a tiny MedMNIST-like .npz with unique random images."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        labels = np.arange(n) % num_classes
        arrays[f"{split}_labels"] = np.tile(labels[:, None], (1, label_cols)).astype(np.uint8)
    for key in drop:
        del arrays[key]
    arrays.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


# --- load_medmnist ---------------------------------------------------------------------------


def test_load_tiny_npz(tmp_path: Path) -> None:
    data = load_medmnist(make_npz(tmp_path / "tinymnist.npz", num_classes=3))
    assert data.name == "tinymnist"
    assert data.train_images.shape == (40, 28, 28) and data.train_images.dtype == np.uint8
    assert data.train_labels.shape == (40,) and data.train_labels.dtype == np.int64
    assert data.test_images.shape == (12, 28, 28)
    assert data.num_classes == 3 and not data.is_rgb
    assert data.class_names == ["class-0", "class-1", "class-2"]
    images, labels = data.split("val")
    assert len(images) == len(labels) == 10


def test_known_and_stored_class_names(tmp_path: Path) -> None:
    assert load_medmnist(make_npz(tmp_path / "pneumoniamnist_64.npz")).class_names == [
        "normal",
        "pneumonia",
    ]
    named = make_npz(tmp_path / "x.npz", class_names=np.array(["cat", "dog"]))
    assert load_medmnist(named).class_names == ["cat", "dog"]


def test_missing_file_is_no_dataset(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pneumoniamnist.npz"
    with pytest.raises(FedradError) as info:
        load_medmnist(missing)
    assert info.value.code == "no-dataset"
    assert str(missing) in str(info.value)
    assert "train_images" in str(info.value)


def test_missing_keys_are_listed(tmp_path: Path) -> None:
    path = make_npz(tmp_path / "x.npz", drop=("val_images", "val_labels"))
    with pytest.raises(FedradError) as info:
        load_medmnist(path)
    msg = str(info.value)
    assert info.value.code == "bad-dataset"
    assert "missing key(s) val_images, val_labels" in msg
    assert all(k in msg for k in EXPECTED_KEYS)  # what is expected
    assert "found: test_images, test_labels, train_images, train_labels" in msg


def test_not_an_npz(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_text("not a zip archive")
    with pytest.raises(FedradError) as info:
        load_medmnist(path)
    assert info.value.code == "bad-dataset"


def test_volumes_are_rejected(tmp_path: Path) -> None:
    path = make_npz(tmp_path / "organmnist3d.npz", shape=(28, 28, 28))
    with pytest.raises(FedradError) as info:
        load_medmnist(path)
    assert info.value.code == "unsupported-dataset"
    assert "3-D" in str(info.value) and "2-D single-label" in str(info.value)


def test_multi_label_is_rejected(tmp_path: Path) -> None:
    path = make_npz(tmp_path / "chestmnist.npz", label_cols=14)
    with pytest.raises(FedradError) as info:
        load_medmnist(path)
    assert info.value.code == "unsupported-dataset"
    assert "multi-label" in str(info.value) and "2-D single-label" in str(info.value)


def test_label_count_mismatch(tmp_path: Path) -> None:
    path = make_npz(tmp_path / "x.npz", test_labels=np.zeros((5, 1), dtype=np.uint8))
    with pytest.raises(FedradError, match="5 labels for 12 images"):
        load_medmnist(path)


def test_rgb_is_converted_to_grey(tmp_path: Path) -> None:
    path = make_npz(tmp_path / "bloodmnist.npz", shape=(28, 28, 3), num_classes=8)
    raw = np.load(path)["train_images"]
    data = load_medmnist(path)
    assert data.is_rgb and data.train_images.shape == (40, 28, 28)
    expected = np.rint(raw.astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(data.train_images.astype(np.float64) - expected).max() <= 1
    assert data.class_names[0] == "basophil"


@needs_pneumonia
def test_load_real_pneumoniamnist() -> None:
    data = load_medmnist(PNEUMONIA)
    assert data.name == "pneumoniamnist"
    assert data.train_images.shape == (4708, 28, 28)
    assert data.val_images.shape == (524, 28, 28)
    assert data.test_images.shape == (624, 28, 28)
    assert data.num_classes == 2 and data.class_names == ["normal", "pneumonia"]
    assert np.bincount(data.test_labels).tolist() == [234, 390]


# --- partition_non_iid -----------------------------------------------------------------------


def _label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between site and global label distributions."""
    k = labels.max() + 1
    overall = np.bincount(labels, minlength=k) / len(labels)
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - overall).sum()
                for p in parts
            ]
        )
    )


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_partition_covers_every_index_once(alpha: float) -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=500)
    parts = partition_non_iid(labels, 5, alpha=alpha, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == 500
    np.testing.assert_array_equal(np.sort(joined), np.arange(500))
    assert min(len(p) for p in parts) >= 10


def test_partition_skew_follows_alpha() -> None:
    labels = np.random.default_rng(1).integers(0, 5, size=2000)
    skewed = _label_skew(labels, partition_non_iid(labels, 4, alpha=0.1, seed=0))
    iid = _label_skew(labels, partition_non_iid(labels, 4, alpha=1000.0, seed=0))
    assert skewed > 0.3
    assert iid < 0.05


def test_partition_is_deterministic_and_accepts_column_labels() -> None:
    labels = np.random.default_rng(2).integers(0, 2, size=(300, 1))
    a = partition_non_iid(labels, 3, alpha=0.3, seed=9)
    b = partition_non_iid(labels[:, 0], 3, alpha=0.3, seed=9)
    c = partition_non_iid(labels, 3, alpha=0.3, seed=10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_fills_short_sites() -> None:
    # Extreme skew with one class: Dirichlet draws almost never give every site 20 samples,
    # so the fallback moves samples over.
    labels = np.zeros(100, dtype=int)
    parts = partition_non_iid(labels, 5, alpha=0.001, seed=0, min_per_site=20)
    assert sorted(len(p) for p in parts) == [20, 20, 20, 20, 20]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(100))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_sites": 3, "alpha": 0.0}, "alpha"),
        ({"num_sites": 3, "alpha": -1.0}, "alpha"),
        ({"num_sites": 3, "alpha": float("nan")}, "alpha"),
        ({"num_sites": 11}, "at most 10 sites"),
        ({"num_sites": 0}, "num_sites"),
        ({"num_sites": 3, "min_per_site": 4}, "min_per_site"),
    ],
)
def test_partition_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition_non_iid(np.arange(10) % 2, **kwargs)


def test_partition_rejects_multi_column_labels() -> None:
    with pytest.raises(ConfigError, match="shape"):
        partition_non_iid(np.zeros((10, 3)), 2)


# --- write_medmnist_federation ---------------------------------------------------------------


def test_write_federation_round_trip(tmp_path: Path) -> None:
    npz = make_npz(tmp_path / "tinymnist.npz", sizes=(45, 6, 9), num_classes=3)
    source = np.load(npz)
    # Exact profiles (8-bit, no noise, gamma 1) so pixels can be compared with the source.
    exact = [
        dataclasses.replace(p, noise_std=0.0, contrast=1.0, bits_stored=8) for p in DEFAULT_PROFILES
    ]
    fed = write_medmnist_federation(
        npz, tmp_path / "fed", num_sites=3, alpha=0.5, seed=4, profiles=exact, min_per_site=5
    )
    assert fed.class_names == ["class-0", "class-1", "class-2"]
    assert sum(s.num_images for s in fed.sites) == 45
    assert fed.test is not None and fed.test.num_images == 9
    seen: list[int] = []
    for site, profile in [*zip(fed.sites, exact, strict=True), (fed.test, None)]:
        rows = read_labels_csv(site.labels_csv)
        assert len(rows) == site.num_images == len(list(site.dicom_dir.glob("*.dcm")))
        assert site.class_counts == np.bincount([r[1] for r in rows], minlength=3).tolist()
        for name, label in rows:
            ds = pydicom.dcmread(site.dicom_dir / name)
            dataset, split, index = str(ds.ImageComments).split()
            assert dataset == "tinymnist" and split == ("test" if profile is None else "train")
            index = int(index)
            assert label == int(source[f"{split}_labels"][index, 0])
            original = source[f"{split}_images"][index]
            pixels = ds.pixel_array
            if ds.PhotometricInterpretation == "MONOCHROME1":
                pixels = 255 - pixels
            factor = pixels.shape[0] // 28
            assert factor == (2 if ds.file_meta.TransferSyntaxUID.name.startswith("JPEG") else 1)
            np.testing.assert_array_equal(pixels[::factor, ::factor], original)
            if profile is not None:
                seen.append(index)
    assert sorted(seen) == list(range(45))  # every training image exactly once


def test_write_federation_caps_and_val(tmp_path: Path) -> None:
    npz = make_npz(tmp_path / "tinymnist.npz", sizes=(60, 20, 30))
    fed = write_medmnist_federation(
        npz,
        tmp_path / "fed",
        num_sites=2,
        max_train_per_site=15,
        max_test=7,
        include_val=True,
        profiles=[NEUTRAL_PROFILE],
        workers=2,
    )
    assert all(s.num_images <= 15 for s in fed.sites)
    assert fed.test is not None and fed.test.num_images == 7
    assert fed.extra["include_val"] is True
    with pytest.raises(ConfigError, match="max_test"):
        write_medmnist_federation(npz, tmp_path / "other", max_test=0)


def test_write_federation_is_deterministic(tmp_path: Path) -> None:
    npz = make_npz(tmp_path / "tinymnist.npz", sizes=(30, 4, 6))
    a = write_medmnist_federation(npz, tmp_path / "a", num_sites=2, seed=1, max_test=4)
    b = write_medmnist_federation(npz, tmp_path / "b", num_sites=2, seed=1, max_test=4, workers=2)
    for sa, sb in zip([*a.sites, a.test], [*b.sites, b.test], strict=True):
        assert sa.labels_csv.read_text() == sb.labels_csv.read_text()
        for f in sorted(sa.dicom_dir.iterdir()):
            assert f.read_bytes() == (sb.dicom_dir / f.name).read_bytes()


@needs_pneumonia
def test_write_small_pneumonia_federation(tmp_path: Path) -> None:
    fed = write_medmnist_federation(
        PNEUMONIA, tmp_path / "fed", num_sites=3, alpha=0.3, max_train_per_site=20, max_test=30
    )
    assert fed.class_names == ["normal", "pneumonia"]
    assert [s.num_images for s in fed.sites] == [20, 20, 20]
    assert fed.test is not None and fed.test.num_images == 30
    assert "pneumoniamnist" in fed.description
    ds = pydicom.dcmread(next(fed.sites[1].dicom_dir.glob("*.dcm")))
    assert ds.PhotometricInterpretation == DEFAULT_PROFILES[1].photometric
    assert ds.pixel_array.shape == (28, 28)
