"""Partition schemes and the MedNIST-style image folder dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrad.common.errors import ConfigError
from fedrad.simulations.image_folder import MEDNIST_MODALITIES, load_image_folder
from fedrad.simulations.medmnist import write_medmnist_federation
from fedrad.simulations.partition import SCHEMES, partition_indices

MEDNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mednist"


def _labels(n_per_class: int = 100, classes: int = 4) -> np.ndarray:
    return np.repeat(np.arange(classes), n_per_class)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_sample_lands_on_exactly_one_site(scheme: str) -> None:
    y = _labels()
    parts = partition_indices(y, 5, scheme=scheme, alpha=0.3, seed=1)
    assert len(parts) == 5
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(y)))
    assert min(len(p) for p in parts) >= 10
    again = partition_indices(y, 5, scheme=scheme, alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_skews_do_what_they_say() -> None:
    y = _labels(200)
    iid = partition_indices(y, 4, scheme="iid", seed=0)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1
    # IID sites see every class in about the global proportion
    for p in iid:
        share = np.bincount(y[p], minlength=4) / len(p)
        assert np.all(np.abs(share - 0.25) < 0.1)
    qty = partition_indices(y, 4, scheme="quantity-skew", alpha=0.3, seed=0)
    sizes = sorted(len(p) for p in qty)
    assert sizes[-1] > 2 * sizes[0]
    lab = partition_indices(y, 4, scheme="label-skew", alpha=0.1, seed=0)
    dominant = [np.bincount(y[p], minlength=4).max() / len(p) for p in lab]
    assert max(dominant) > 0.6


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"scheme": "dirichlet"}, "partition scheme 'dirichlet' is unknown"),
        ({"scheme": "label-skew", "alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"scheme": "quantity-skew", "alpha": -1.0}, "alpha=-1.0 must be > 0"),
        ({"scheme": "iid", "min_per_site": 200}, "min-per-site=200 is impossible"),
    ],
)
def test_impossible_partitions_name_the_setting(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        partition_indices(_labels(), 5, **kwargs)


def test_more_sites_than_samples() -> None:
    with pytest.raises(ConfigError, match="cannot split 8 samples over 9 sites"):
        partition_indices(_labels(2), 9, scheme="iid")


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name, level in (("CXR", 60), ("HeadCT", 180)):
        (root / name).mkdir()
        for i in range(20):
            arr = np.clip(rng.normal(level, 10, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    (root / "CXR" / "broken.png").write_bytes(b"not an image")
    return root


def test_image_folder_splits_modalities_and_skips(small_folder: Path) -> None:
    data = load_image_folder(small_folder, seed=3)
    assert data.class_names == ["CXR", "HeadCT"]
    assert len(data.train_labels) + len(data.val_labels) + len(data.test_labels) == 40
    assert np.bincount(data.test_labels).tolist() == [2, 2]  # stratified 10 %
    assert data.train_images.shape[1:] == (16, 16) and data.train_images.dtype == np.uint8
    assert set(data.modality("train")) == {"X-ray", "CT"}
    # class 0 (CXR) is darker than class 1 (HeadCT): labels follow their folders
    means = [data.train_images[data.train_labels == c].mean() for c in (0, 1)]
    assert means[0] < means[1]
    assert data.skipped == [("CXR/broken.png", "unreadable-image: UnidentifiedImageError")]


def test_image_folder_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no images"):
        load_image_folder(tmp_path)


def test_image_folder_becomes_a_dicom_federation(small_folder: Path, tmp_path: Path) -> None:
    data = load_image_folder(small_folder, seed=0)
    fed = write_medmnist_federation(data, tmp_path / "fed", num_sites=2, scheme="iid",
                                    workers=1, min_per_site=5)
    assert [s.num_images for s in fed.sites] == [16, 16]
    assert fed.test is not None and fed.test.num_images == 4
    assert "IID split" in fed.description


@pytest.mark.skipif(not MEDNIST.is_dir(), reason="shared MedNIST data not present")
def test_real_mednist_folder() -> None:
    data = load_image_folder(MEDNIST, seed=0)
    assert data.class_names == sorted(MEDNIST_MODALITIES)
    assert data.train_images.shape[1:] == (64, 64)
    assert len(data.test_labels) == 600 and not data.skipped
    test_modalities = data.modality("test")
    assert {m: int((test_modalities == m).sum()) for m in ("X-ray", "CT", "MRI")} == {
        "X-ray": 200, "CT": 300, "MRI": 100}
