"""A MedNIST-style folder of images, one sub-folder per class, as a simulation dataset.

``root/<Class>/<file>.jpeg|png|...``, optionally with ``root/labels.csv`` (``path,label``,
plus an optional ``modality`` column).  Without a CSV, the sub-folder names are the
classes.  Images are read with Pillow as 8-bit grey; all must share one size.

There is no official split, so one is made: stratified, seeded, ``val_fraction`` and
``test_fraction`` of every class.  Each sample also carries its imaging modality, from the
CSV's ``modality`` column or, for MedNIST's six classes, from :data:`MEDNIST_MODALITIES`,
so reports can break metrics down by modality (X-ray, CT, MRI).

A file that cannot be read is listed in :attr:`ImageFolderData.skipped` with its reason;
the rest are loaded.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrad.common.errors import ConfigError, FedradError

from .medmnist import MedMNISTData

__all__ = ["ImageFolderData", "MEDNIST_MODALITIES", "load_image_folder"]

log = logging.getLogger(__name__)

#: The imaging modality of each MedNIST class.
MEDNIST_MODALITIES: dict[str, str] = {
    "AbdomenCT": "CT",
    "BreastMRI": "MRI",
    "CXR": "X-ray",
    "ChestCT": "CT",
    "Hand": "X-ray",
    "HeadCT": "CT",
}

_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class ImageFolderData(MedMNISTData):
    """A :class:`MedMNISTData` made from an image folder, with a modality per sample."""

    modalities: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def modality(self, split: str) -> np.ndarray:
        """Modality name of every sample of ``split`` (``"unknown"`` when not known)."""
        return self.modalities[split]


def _rows_from_csv(root: Path, csv_path: Path) -> list[tuple[str, str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if not {"path", "label"} <= fields:
            raise ConfigError(
                f"{csv_path}: expected columns 'path' and 'label' (and optionally "
                f"'modality'), found {sorted(fields)}"
            )
        rows = []
        for line in reader:
            label = str(line["label"]).strip()
            modality = str(line.get("modality") or MEDNIST_MODALITIES.get(label, "unknown"))
            rows.append((str(line["path"]).strip(), label, modality))
    return rows


def _rows_from_folders(root: Path) -> list[tuple[str, str, str]]:
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in _IMAGE_SUFFIXES:
                rows.append((f"{class_dir.name}/{file.name}", class_dir.name,
                             MEDNIST_MODALITIES.get(class_dir.name, "unknown")))
    return rows


def _stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float,
                      seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 11])
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        n_val = int(round(val_fraction * len(idx)))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> ImageFolderData:
    """Load a folder of class sub-folders as train/val/test splits.

    Raises
    ------
    ConfigError
        The folder does not exist, holds no images, has one class only, mixes image
        sizes, or the split fractions leave no training data.
    """
    from PIL import Image, UnidentifiedImageError

    base = Path(root)
    if not base.is_dir():
        raise ConfigError(
            f"image folder {base} does not exist or is not a folder; expected one sub-folder "
            "per class (e.g. ../shared/data/mednist)"
        )
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1
            and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val-fraction={val_fraction} and test-fraction={test_fraction} must be in [0, 1) "
            "and leave some training data (their sum below 1)"
        )
    csv_path = base / "labels.csv"
    rows = _rows_from_csv(base, csv_path) if csv_path.is_file() else _rows_from_folders(base)
    if not rows:
        raise ConfigError(
            f"{base} holds no images: expected <class>/<image>.jpeg|png files or a labels.csv"
        )
    class_names = sorted({label for _, label, _ in rows})
    if len(class_names) < 2:
        raise ConfigError(f"{base} has a single class ({class_names[0]}); need at least two")
    class_index = {c: i for i, c in enumerate(class_names)}
    images: list[np.ndarray] = []
    labels: list[int] = []
    modalities: list[str] = []
    skipped: list[tuple[str, str]] = []
    shape: tuple[int, ...] | None = None
    for rel, label, modality in rows:
        path = base / rel
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            skipped.append((rel, f"unreadable-image: {type(err).__name__}"))
            continue
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            skipped.append((rel, f"size-mismatch: {arr.shape} instead of {shape}"))
            continue
        images.append(arr)
        labels.append(class_index[label])
        modalities.append(modality)
    if skipped:
        log.warning("%s: %d of %d images skipped (first: %s)", base, len(skipped), len(rows),
                    skipped[0])
    if not images:
        raise FedradError("bad-dataset", f"{base}: none of its {len(rows)} images could be read")
    x = np.stack(images)
    y = np.asarray(labels, dtype=np.int64)
    m = np.asarray(modalities)
    splits = _stratified_split(y, val_fraction, test_fraction, seed)
    if len(splits["train"]) == 0:
        raise ConfigError(f"{base}: the split leaves no training images")
    arrays = {}
    for name, idx in splits.items():
        arrays[f"{name}_images"] = x[idx]
        arrays[f"{name}_labels"] = y[idx]
    return ImageFolderData(
        name=base.name.lower(),
        num_classes=len(class_names),
        is_rgb=False,
        class_names=class_names,
        modalities={name: m[idx] for name, idx in splits.items()},
        skipped=skipped,
        **arrays,
    )
