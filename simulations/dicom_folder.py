"""A federation from DICOM folders that already exist: one sub-folder per site.

The layout ``fedrad simulate`` reads with ``dataset: {kind: dicom, path: ...}``::

    path/
      hospital-a/            one folder per site (its name is the site id)
        labels.csv           file (or sop_instance_uid), label: as for fedrad site prepare
        dicom/ ...           the DICOM files (or directly beside labels.csv)
      hospital-b/ ...
      test/                  optional: the coordinator's central test set, same layout

The sites are the folders, so no partition applies.  Labels are class indices or class
names; without ``class-names`` in the settings the names come from the labels files
(indices: ``class-0``, ``class-1``, ...; names: sorted).
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedrad.common.errors import ConfigError

from .dicom_writer import Federation, SiteFolder

__all__ = ["load_dicom_folder", "TEST_FOLDER"]

TEST_FOLDER = "test"


def _labels(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if "label" not in fields or not ({"file", "sop_instance_uid"} & set(fields)):
                raise ConfigError(
                    f"{path} needs a header with 'label' and 'file' (or 'sop_instance_uid'); "
                    f"it has {', '.join(fields) or 'no header'}")
            return [str(row["label"]).strip() for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{path} cannot be read as a labels file: {err}") from None


def _site(folder: Path) -> tuple[SiteFolder, list[str]]:
    labels_csv = folder / "labels.csv"
    if not labels_csv.is_file():
        raise ConfigError(
            f"'dataset.path': site folder {folder} has no labels.csv (kind: dicom expects "
            "one folder per site, each with labels.csv and its DICOM files)")
    labels = _labels(labels_csv)
    dicom = folder / "dicom"
    site = SiteFolder(site_id=folder.name, root=folder,
                      dicom_dir=dicom if dicom.is_dir() else folder, labels_csv=labels_csv,
                      num_images=len(labels), class_counts=[], profile="as found")
    return site, labels


def _class_names(all_labels: list[str], given: list[str] | None) -> list[str]:
    if given:
        return list(given)
    try:
        values = [float(v) for v in all_labels]
    except ValueError:
        return sorted(set(all_labels))
    if not all(v.is_integer() and v >= 0 for v in values):
        raise ConfigError("labels must be class indices 0, 1, ... or class names")
    return [f"class-{i}" for i in range(max(2, int(max(values, default=1)) + 1))]


def _counts(labels: list[str], names: list[str]) -> list[int]:
    """Images per class (labels that are neither a name nor an index are left for prepare)."""
    out = [0] * len(names)
    for value in labels:
        if value in names:
            out[names.index(value)] += 1
        elif value.isdigit() and int(value) < len(names):
            out[int(value)] += 1
    return out


def load_dicom_folder(path: str | Path, *, class_names: list[str] | None = None) -> Federation:
    """The federation of ``path``'s site folders (see the module docstring).

    Raises
    ------
    ConfigError
        ``path`` is not a folder, holds no site folder, or a site folder has no readable
        ``labels.csv``.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"'dataset.path' {root} is not a folder (kind: dicom)")
    found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    site_dirs = [p for p in found if p.name != TEST_FOLDER]
    if not site_dirs:
        raise ConfigError(
            f"'dataset.path' {root} holds no site folders (kind: dicom expects one folder per "
            "site, each with labels.csv and its DICOM files)")
    sites = [_site(p) for p in site_dirs]
    test = _site(root / TEST_FOLDER) if (root / TEST_FOLDER).is_dir() else None
    names = _class_names([v for _, labels in sites for v in labels], class_names)
    for folder, labels in [*sites, *([test] if test else [])]:
        folder.class_counts = _counts(labels, names)
    return Federation(
        sites=[s for s, _ in sites], test=test[0] if test else None, class_names=names,
        description=(f"DICOM folders in {root}: {len(sites)} sites "
                     f"({'/'.join(str(s.num_images) for s, _ in sites)} images)"
                     + (f", test set {test[0].num_images} images" if test else
                        ", no central test set")),
        root=root)
