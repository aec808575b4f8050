"""Spread a 2-D MedMNIST dataset over simulated hospital sites, as DICOM site folders.

:func:`load_medmnist` reads and validates an official MedMNIST ``.npz`` (keys
``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``).  Only 2-D, single-label datasets are supported (not ChestMNIST's 14
labels, not the 3-D volumes); RGB datasets are converted to grey with the ITU-R BT.601 luma
weights (0.299 R + 0.587 G + 0.114 B), since the sites store monochrome radiographs.

:func:`partition_non_iid` splits the training labels over the sites with Dirichlet label
skew, and :func:`write_medmnist_federation` writes every site's share with that site's scanner
profile, plus the official test split as ``test/``::

    out_dir/site-1/dicom/img-00000.dcm ...   out_dir/site-1/labels.csv
    out_dir/test/...
    out_dir/federation.json

Images are written at their native size (28x28 for the classic files).  The installed JPEG 2000
encoder cannot encode images smaller than 32 pixels a side, so for a JPEG 2000 profile the
images are enlarged by an integer nearest-neighbour factor (28 -> 56); that is lossless and
simply looks like a site with a larger matrix.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.common.errors import ConfigError, FedradError

from .dicom_writer import (
    DEFAULT_PROFILES,
    MIN_JPEG2000_SIZE,
    Federation,
    ScannerProfile,
    SiteFolder,
    check_dicom_readable,
    prepare_output_dir,
    resolve_workers,
    run_tasks,
    write_dicom,
    write_labels_csv,
)

__all__ = [
    "MedMNISTData",
    "KNOWN_LABELS",
    "EXPECTED_KEYS",
    "load_medmnist",
    "partition_non_iid",
    "write_medmnist_federation",
]

logger = logging.getLogger(__name__)

#: The arrays an official MedMNIST ``.npz`` holds.
EXPECTED_KEYS: tuple[str, ...] = (
    "train_images",
    "train_labels",
    "val_images",
    "val_labels",
    "test_images",
    "test_labels",
)
_SPLITS = ("train", "val", "test")
#: Optional key holding class names, in label order, for non-official files.
_CLASS_NAME_KEYS = ("class_names", "label_names")

#: Label names of the 2-D single-label MedMNIST v2 datasets (from MedMNIST's ``INFO``),
#: keyed by file stem (``pneumoniamnist.npz`` and ``pneumoniamnist_64.npz`` both match).
KNOWN_LABELS: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    **{
        f"organ{view}mnist": [
            "bladder",
            "femur-left",
            "femur-right",
            "heart",
            "kidney-left",
            "kidney-right",
            "liver",
            "lung-left",
            "lung-right",
            "pancreas",
            "spleen",
        ]
        for view in "acs"
    },
}

# Seed-stream tags, so that partition, subsampling and image noise use unrelated streams.
_SUBSAMPLE_STREAM = 1
_IMAGE_STREAM = 2
_TEST_SITE = 10_000


@dataclass
class MedMNISTData:
    """A validated 2-D single-label MedMNIST dataset.

    Images are ``uint8`` arrays of shape ``(N, H, W)`` (grey; RGB files are converted), labels
    are ``int64`` arrays of shape ``(N,)``.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    is_rgb: bool
    class_names: list[str]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(images, labels)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in _SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {', '.join(_SPLITS)}")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")


def _dataset_stem(path: Path) -> str:
    """``pneumoniamnist_64.npz`` -> ``pneumoniamnist``."""
    return re.sub(r"_\d+$", "", path.stem.lower())


def _bad(path: Path, message: str, code: str = "bad-dataset") -> FedradError:
    return FedradError(code, f"{path}: {message}")


def _to_grey_uint8(images: np.ndarray, key: str, path: Path) -> tuple[np.ndarray, bool]:
    """Validate one image array; return ``(N, H, W)`` uint8 and whether it was RGB."""
    arr = np.asarray(images)
    is_rgb = False
    if arr.ndim == 4 and arr.shape[-1] in (1, 3):
        is_rgb = arr.shape[-1] == 3
    elif arr.ndim == 4:
        raise _bad(
            path,
            f"'{key}' has shape {arr.shape}, which looks like 3-D volumes (N, D, H, W); only "
            "2-D single-label MedMNIST datasets are supported (e.g. pneumoniamnist.npz)",
            code="unsupported-dataset",
        )
    elif arr.ndim != 3:
        raise _bad(
            path,
            f"'{key}' has shape {arr.shape}; expected (N, H, W) grey or (N, H, W, 3) RGB images",
        )
    if arr.shape[0] == 0:
        raise _bad(path, f"'{key}' holds no images")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise _bad(path, f"'{key}' contains NaN or infinite values")
        hi = float(arr.max()) if arr.size else 0.0
        arr = np.rint(arr * 255.0 if hi <= 1.0 else arr)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise _bad(path, f"'{key}' has dtype {arr.dtype}; expected uint8 images")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 255:
        raise _bad(path, f"'{key}' values span [{lo:g}, {hi:g}]; expected 0..255 (uint8)")
    if arr.ndim == 4:
        if is_rgb:
            # ITU-R BT.601 luma, as used by PIL's "L" conversion.
            arr = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            arr = np.rint(arr)
        else:
            arr = arr[..., 0]
    return np.ascontiguousarray(arr, dtype=np.uint8), is_rgb


def _to_labels(labels: np.ndarray, key: str, n_images: int, path: Path) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] > 1:
        raise _bad(
            path,
            f"'{key}' has shape {arr.shape}: {arr.shape[1]} label columns means a multi-label "
            "dataset (e.g. ChestMNIST); only 2-D single-label MedMNIST datasets are supported",
            code="unsupported-dataset",
        )
    if arr.ndim == 2:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise _bad(path, f"'{key}' has shape {arr.shape}; expected (N,) or (N, 1) labels")
    if len(arr) != n_images:
        raise _bad(path, f"'{key}' has {len(arr)} labels for {n_images} images")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
            raise _bad(path, f"'{key}' must hold integer class indices, got dtype {arr.dtype}")
    out = arr.astype(np.int64)
    if out.size and out.min() < 0:
        raise _bad(path, f"'{key}' holds negative labels; expected class indices 0..K-1")
    return out


def load_medmnist(npz_path: str | os.PathLike[str]) -> MedMNISTData:
    """Load and validate a 2-D single-label MedMNIST ``.npz``.

    Parameters
    ----------
    npz_path:
        Path to e.g. ``pneumoniamnist.npz`` (MedMNIST v2; ``*_64.npz`` etc. also work).

    Returns
    -------
    MedMNISTData
        Grey ``uint8`` images ``(N, H, W)`` and ``int64`` labels ``(N,)`` per split.

    Raises
    ------
    FedradError
        ``no-dataset`` if the file is missing; ``bad-dataset`` if it is not a readable
        ``.npz``, lacks keys or holds inconsistent arrays; ``unsupported-dataset`` for 3-D
        volumes or multi-label files.
    """
    path = Path(npz_path)
    if not path.is_file():
        raise FedradError(
            "no-dataset",
            f"MedMNIST file not found: {path}. Expected an official MedMNIST v2 .npz such as "
            f"pneumoniamnist.npz with the arrays {', '.join(EXPECTED_KEYS)}",
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = sorted(npz.files)
            missing = [k for k in EXPECTED_KEYS if k not in npz.files]
            if missing:
                raise _bad(
                    path,
                    f"missing key(s) {', '.join(missing)}; a MedMNIST .npz holds "
                    f"{', '.join(EXPECTED_KEYS)} (found: {', '.join(found) or 'nothing'})",
                )
            raw = {k: npz[k] for k in EXPECTED_KEYS}
            names_key = next((k for k in _CLASS_NAME_KEYS if k in npz.files), None)
            file_names = [str(x) for x in npz[names_key].tolist()] if names_key else None
    except FedradError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise _bad(path, f"cannot be read as a NumPy .npz archive ({e})") from e

    arrays: dict[str, np.ndarray] = {}
    rgb_flags = []
    for split in _SPLITS:
        images, is_rgb = _to_grey_uint8(raw[f"{split}_images"], f"{split}_images", path)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = _to_labels(
            raw[f"{split}_labels"], f"{split}_labels", len(images), path
        )
        rgb_flags.append(is_rgb)
    shapes = {arrays[f"{s}_images"].shape[1:] for s in _SPLITS}
    if len(shapes) != 1 or len(set(rgb_flags)) != 1:
        raise _bad(path, f"the splits have different image shapes or channels: {sorted(shapes)}")

    max_label = max(int(arrays[f"{s}_labels"].max()) for s in _SPLITS)
    stem = _dataset_stem(path)
    if file_names is not None:
        class_names = file_names
    elif stem in KNOWN_LABELS and max_label < len(KNOWN_LABELS[stem]):
        class_names = list(KNOWN_LABELS[stem])
    else:
        class_names = [f"class-{i}" for i in range(max_label + 1)]
    if max_label >= len(class_names):
        raise _bad(
            path, f"labels go up to {max_label} but only {len(class_names)} class names are given"
        )
    if rgb_flags[0]:
        logger.info("%s: RGB images converted to grey (BT.601 luma)", path.name)
    return MedMNISTData(
        name=stem,
        num_classes=len(class_names),
        is_rgb=rgb_flags[0],
        class_names=class_names,
        **arrays,
    )


def partition_non_iid(
    labels: np.ndarray | Sequence[int],
    num_sites: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_per_site: int | None = None,
) -> list[np.ndarray]:
    """Split sample indices over sites with Dirichlet label skew.

    For each class, its (shuffled) indices are cut across the sites in proportions drawn
    from ``Dirichlet(alpha, ..., alpha)``: small ``alpha`` gives sites dominated by a few
    classes, large ``alpha`` approaches an IID split.  Draws that leave a site with fewer
    than ``min_per_site`` samples are redrawn (up to 100 times); after that, random samples
    move from the largest sites to the short ones.

    Parameters
    ----------
    labels:
        Class index per sample, shape ``(N,)`` or ``(N, 1)``.
    num_sites:
        Number of sites, 1 to N.
    alpha:
        Dirichlet concentration, > 0.
    seed:
        Random seed.
    min_per_site:
        Fewest samples per site (default ``min(10, N // num_sites)``).

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` index array per site; together they hold every index exactly once.
    """
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(f"labels must have shape (N,) or (N, 1), got {y.shape}")
    n = len(y)
    if not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ConfigError(f"num_sites={num_sites!r} must be a positive integer")
    if num_sites > n:
        raise ConfigError(f"cannot split {n} samples over {num_sites} sites: use at most {n} sites")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(
            f"alpha={alpha!r} must be > 0 (small, e.g. 0.1: strong label skew; large, "
            "e.g. 100: nearly IID)"
        )
    if min_per_site is None:
        min_per_site = min(10, n // num_sites)
    if min_per_site < 0 or min_per_site * num_sites > n:
        raise ConfigError(
            f"min_per_site={min_per_site} is impossible with {n} samples over {num_sites} "
            f"sites; use at most {n // num_sites}"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]

    parts: list[list[int]] = []
    for _attempt in range(100):
        chunks: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_sites, float(alpha)))
            if not np.all(np.isfinite(props)):  # extreme alpha underflow: one site takes all
                props = np.eye(num_sites)[rng.integers(num_sites)]
            cuts = np.rint(np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, piece in enumerate(np.split(idx, cuts)):
                chunks[k].append(piece)
        parts = [np.concatenate(c).tolist() for c in chunks]
        if min(len(p) for p in parts) >= min_per_site:
            break
    else:
        logger.info("Dirichlet draws kept leaving a site short; moving samples to fill it")
        for k in range(num_sites):
            while len(parts[k]) < min_per_site:
                donor = int(np.argmax([len(p) for p in parts]))
                take = min(min_per_site - len(parts[k]), len(parts[donor]) - min_per_site)
                pick = set(rng.choice(len(parts[donor]), size=take, replace=False).tolist())
                parts[k].extend(parts[donor][i] for i in sorted(pick))
                parts[donor] = [x for i, x in enumerate(parts[donor]) if i not in pick]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _upscale_factor(side: int, profile: ScannerProfile) -> int:
    acquired = side * profile.resolution  # what the profile's detector will sample
    if profile.transfer_syntax.startswith("jpeg2000") and round(acquired) < MIN_JPEG2000_SIZE:
        return math.ceil(MIN_JPEG2000_SIZE / acquired)
    return 1


def _write_one(task: tuple[Any, ...]) -> None:
    """Worker: write one MedMNIST image (top level so process pools can pickle it)."""
    path, image, profile, seed_key, patient_name, patient_id, number, comment = task
    factor = _upscale_factor(min(image.shape), profile)
    if factor > 1:
        image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    rng = np.random.default_rng(seed_key)
    write_dicom(
        path,
        image.astype(np.float32) / 255.0,
        profile=profile,
        rng=rng,
        patient_name=patient_name,
        patient_id=patient_id,
        instance_number=number,
        extra={"ImageComments": comment},
    )


def _write_folder(
    root: Path,
    site_id: str,
    tag: str,
    images: np.ndarray,
    labels: np.ndarray,
    source: list[str],
    profiles: Sequence[ScannerProfile],
    num_classes: int,
    seed: int,
    site_index: int,
    workers: int,
) -> SiteFolder:
    dicom_dir = root / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    rows = []
    for i in range(len(labels)):
        name = f"img-{i:05d}.dcm"
        tasks.append(
            (
                dicom_dir / name,
                images[i],
                profiles[i % len(profiles)],
                [seed, _IMAGE_STREAM, site_index, i],
                f"SYNTH^{tag}{i + 1:05d}",
                f"{tag}-{i + 1:06d}",
                i + 1,
                source[i],
            )
        )
        rows.append((name, int(labels[i])))
    run_tasks(_write_one, tasks, workers)
    labels_csv = root / "labels.csv"
    write_labels_csv(labels_csv, rows)
    check_dicom_readable(dicom_dir / rows[0][0])
    return SiteFolder(
        site_id=site_id,
        root=root,
        dicom_dir=dicom_dir,
        labels_csv=labels_csv,
        num_images=len(rows),
        class_counts=np.bincount(labels, minlength=num_classes).tolist(),
        profile=",".join(dict.fromkeys(p.name for p in profiles)),
    )


def _subsample(indices: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(indices) <= cap:
        return indices
    return np.sort(rng.choice(indices, size=cap, replace=False))


def _scheme_words(scheme: str, alpha: float) -> str:
    if scheme == "iid":
        return "IID split"
    kind = "label" if scheme == "label-skew" else "quantity"
    return f"Dirichlet alpha={alpha:g} {kind} skew"


def write_medmnist_federation(
    npz_path: str | os.PathLike[str] | MedMNISTData,
    out_dir: str | os.PathLike[str],
    *,
    num_sites: int = 3,
    alpha: float = 0.5,
    scheme: str = "label-skew",
    seed: int = 0,
    profiles: Sequence[ScannerProfile] = DEFAULT_PROFILES,
    test_profile: ScannerProfile | None = None,
    max_train_per_site: int | None = None,
    max_test: int | None = None,
    include_val: bool = False,
    min_per_site: int | None = None,
    workers: int | None = 1,
    overwrite: bool = False,
) -> Federation:
    """Write a MedMNIST dataset as a federation of DICOM site folders.

    The training split (plus the validation split with ``include_val``) is spread over the
    sites by :func:`partition_non_iid`; each site's images are written with its scanner
    profile (profiles are cycled over the sites).  The official test split becomes ``test/``.

    Parameters
    ----------
    npz_path:
        MedMNIST ``.npz`` (see :func:`load_medmnist`), or an already loaded dataset (e.g.
        an image folder from :func:`fedrad.simulations.image_folder.load_image_folder`).
    out_dir:
        Output folder; receives ``site-1`` ... ``site-N``, ``test`` and ``federation.json``.
    num_sites, alpha, scheme, seed, min_per_site:
        Partition settings (see :func:`fedrad.simulations.partition.partition_indices`;
        ``label-skew`` is :func:`partition_non_iid`); ``seed`` also fixes subsampling and
        scanner noise, so the output does not depend on ``workers``.
    profiles:
        Scanner profiles, cycled over the sites.
    test_profile:
        Profile of the test set; ``None`` mixes the site profiles image by image.
    max_train_per_site:
        Optional cap on each site's image count (random subsample of its share).
    max_test:
        Optional cap on the test set size (random subsample).
    include_val:
        Add the official validation split to the pool spread over the sites.
    workers:
        Worker processes (1: none; 0 or ``None``: one per CPU).
    overwrite:
        Replace site/test folders left by an earlier run instead of refusing.

    Returns
    -------
    Federation
        Also saved as ``out_dir/federation.json``.
    """
    if not profiles:
        raise ConfigError("profiles is empty; give at least one ScannerProfile")
    for name, cap in (("max_train_per_site", max_train_per_site), ("max_test", max_test)):
        if cap is not None and cap < 1:
            raise ConfigError(f"{name}={cap!r} must be >= 1 (or None for no cap)")
    from .partition import partition_indices

    data = npz_path if isinstance(npz_path, MedMNISTData) else load_medmnist(npz_path)
    images, labels = data.train_images, data.train_labels
    source = [f"{data.name} train {i}" for i in range(len(labels))]
    if include_val:
        images = np.concatenate([images, data.val_images])
        labels = np.concatenate([labels, data.val_labels])
        source += [f"{data.name} val {i}" for i in range(len(data.val_labels))]
    parts = partition_indices(labels, num_sites, scheme=scheme, alpha=alpha, seed=seed,
                              min_per_site=min_per_site)
    n_workers = resolve_workers(workers)
    out = Path(out_dir)
    site_ids = [f"site-{k + 1}" for k in range(num_sites)]
    prepare_output_dir(out, [*site_ids, "test"], overwrite=overwrite)

    start = time.perf_counter()
    sub_rng = np.random.default_rng([seed, _SUBSAMPLE_STREAM])
    sites = []
    for k, (site_id, idx) in enumerate(zip(site_ids, parts, strict=True)):
        idx = _subsample(idx, max_train_per_site, sub_rng)
        profile = profiles[k % len(profiles)]
        sites.append(
            _write_folder(
                out / site_id,
                site_id,
                f"M{k + 1}",
                images[idx],
                labels[idx],
                [source[i] for i in idx],
                [profile],
                data.num_classes,
                seed,
                k,
                n_workers,
            )
        )
        logger.info(
            "%s: %d images %s, profile %s", site_id, len(idx), sites[-1].class_counts, profile.name
        )
    test_idx = _subsample(np.arange(len(data.test_labels)), max_test, sub_rng)
    test_profiles = [test_profile] if test_profile is not None else list(profiles)
    test = _write_folder(
        out / "test",
        "test",
        "MT",
        data.test_images[test_idx],
        data.test_labels[test_idx],
        [f"{data.name} test {i}" for i in test_idx],
        test_profiles,
        data.num_classes,
        seed,
        _TEST_SITE,
        n_workers,
    )
    elapsed = time.perf_counter() - start
    description = (
        f"{data.name} federation: {num_sites} sites, {_scheme_words(scheme, alpha)} "
        f"({'/'.join(str(s.num_images) for s in sites)} images), test split "
        f"{test.num_images} images, seed {seed}"
    )
    federation = Federation(
        sites=sites,
        test=test,
        class_names=list(data.class_names),
        description=description,
        root=out,
        extra={
            "generator": "medmnist",
            "dataset": data.name,
            "alpha": alpha,
            "partition": scheme,
            "seed": seed,
            "include_val": include_val,
        },
    )
    federation.save(out)
    logger.info("wrote %s in %.1f s (%d workers)", description, elapsed, n_workers)
    return federation
