"""The local, preprocessed image cache a site trains from.  It never leaves the site.

Layout of a cache folder::

    images.npy        uint8 [N, H, W], round(255 * x) of the preprocessed [0, 1] image;
                      loaded memory-mapped
    labels.npy        int64 [N], class indices
    manifest.json     format version, image size, classes, counts, settings fingerprint,
                      creation time, per-image records (hashed id, label, modality,
                      photometric): no paths, no UIDs in clear
    quarantine.jsonl  one JSON record per rejected input: hashed file id, reason code,
                      message; the local path only under the key ``local_path``

Writing is atomic per folder: every file is written to a temporary name, the old
manifest is removed, the data files are moved into place with :func:`os.replace` and
the new manifest goes last, so a folder with a manifest always holds the data it
describes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FedradError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "IMAGES_FILE",
    "LABELS_FILE",
    "MANIFEST_FILE",
    "QUARANTINE_FILE",
    "SiteCache",
    "to_uint8",
    "write_cache",
    "write_quarantine",
    "read_quarantine",
    "read_manifest",
    "load_cache",
    "remove_cache",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
MANIFEST_FILE = "manifest.json"
QUARANTINE_FILE = "quarantine.jsonl"
_TMP_SUFFIX = ".tmp"
_PREPARE_HINT = ("Run the site preparation step ('fedrad site prepare') on this site's "
                 "DICOM folder and labels file to (re)build it.")


@dataclass
class SiteCache:
    """A loaded site cache.

    Attributes
    ----------
    images:
        ``uint8`` ``[N, H, W]`` memory map (read-only); divide by 255 for [0, 1].
    labels:
        ``int64`` ``[N]`` class indices.
    meta:
        The parsed ``manifest.json``.
    path:
        The cache folder (site-local).
    """

    images: np.ndarray
    labels: np.ndarray
    meta: dict[str, Any]
    path: Path

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> int:
        """Side length of the (square) cached images."""
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        """Number of classes recorded in the manifest."""
        return int(self.meta["num_classes"])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] image to ``uint8`` as stored in the cache (``round(255 x)``)."""
    arr = np.asarray(image, dtype=np.float32)
    return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def _write_json_tmp(path: Path, obj: Any) -> Path:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _write_quarantine_tmp(path: Path, records: Iterable[Mapping[str, Any]]) -> Path:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(dict(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_quarantine(out_dir: str | os.PathLike[str],
                     quarantine: Iterable[Mapping[str, Any]]) -> Path:
    """Write (atomically replace) ``quarantine.jsonl`` alone; returns its path.

    Used when a site has no usable image, so hospital IT can still see why.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / QUARANTINE_FILE
    os.replace(_write_quarantine_tmp(target, quarantine), target)
    return target


def _stack_uint8(images: np.ndarray | Sequence[np.ndarray], tmp: Path) -> tuple[int, int, int]:
    """Write ``images`` as ``uint8 [N, H, W]`` .npy to ``tmp``; return the shape."""
    if isinstance(images, np.ndarray):
        if images.ndim != 3:
            raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
        shape = images.shape
        first = images[0] if len(images) else None
    else:
        if len(images) == 0:
            raise ValueError("images is empty: a cache needs at least one image")
        first = np.asarray(images[0])
        if first.ndim != 2:
            raise ValueError(f"each image must be 2-D, got shape {first.shape}")
        shape = (len(images), *first.shape)
    if shape[0] == 0 or first is None:
        raise ValueError("images is empty: a cache needs at least one image")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))
    try:
        for i in range(shape[0]):
            img = np.asarray(images[i])
            if img.shape != shape[1:]:
                raise ValueError(f"image {i} has shape {img.shape}, expected {shape[1:]}")
            out[i] = img if img.dtype == np.uint8 else to_uint8(img)
        out.flush()
    finally:
        del out
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def write_cache(
    out_dir: str | os.PathLike[str],
    images: np.ndarray | Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    *,
    records: Sequence[Mapping[str, Any]],
    quarantine: Iterable[Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> Path:
    """Write a site cache to ``out_dir`` atomically; returns the folder.

    Parameters
    ----------
    out_dir:
        Cache folder (created if needed).  An existing cache there is replaced.
    images:
        ``uint8`` images as stored, or float images in [0, 1] (quantised with
        :func:`to_uint8`): an ``[N, H, W]`` array or a sequence of ``[H, W]`` arrays.
    labels:
        ``N`` class indices in ``[0, meta["num_classes"])``.
    records:
        ``N`` per-image dicts (``id``: hashed file id, ``label``, ``modality``,
        ``photometric``, ...): nothing identifying in clear.
    quarantine:
        One dict per rejected input (``id``, ``code``, ``message``, ``local_path``...).
    meta:
        Manifest fields: at least ``num_classes``; usually ``class_names``,
        ``settings_fingerprint``, ``inputs_fingerprint``, ``site`` (hashed).  ``image_size``,
        ``count``, ``class_counts``, ``format_version`` and ``created`` are filled in.

    Raises
    ------
    ValueError
        If the arguments are inconsistent (a programming error, not site data).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(records) != label_arr.shape[0]:
        raise ValueError(f"{len(records)} records for {label_arr.shape[0]} labels")
    if "num_classes" not in meta:
        raise ValueError("meta must give num_classes")
    num_classes = int(meta["num_classes"])
    if label_arr.size and (label_arr.min() < 0 or label_arr.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    quarantine = list(quarantine)

    images_tmp = out / (IMAGES_FILE + _TMP_SUFFIX)
    labels_tmp = out / (LABELS_FILE + _TMP_SUFFIX)
    tmps: list[Path] = [images_tmp, labels_tmp]
    try:
        shape = _stack_uint8(images, images_tmp)
        if shape[0] != label_arr.shape[0]:
            raise ValueError(f"{shape[0]} images for {label_arr.shape[0]} labels")
        with open(labels_tmp, "wb") as f:
            np.save(f, label_arr)
            f.flush()
            os.fsync(f.fileno())
        quarantine_tmp = _write_quarantine_tmp(out / QUARANTINE_FILE, quarantine)
        tmps.append(quarantine_tmp)
        class_counts = np.bincount(label_arr, minlength=num_classes).tolist()
        manifest = {
            **dict(meta),
            "format_version": CACHE_FORMAT_VERSION,
            "image_size": shape[1] if shape[1] == shape[2] else [shape[1], shape[2]],
            "num_classes": num_classes,
            "count": shape[0],
            "class_counts": class_counts,
            "rejected": len(quarantine),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "records": [dict(r) for r in records],
        }
        manifest_tmp = _write_json_tmp(out / MANIFEST_FILE, manifest)
        tmps.append(manifest_tmp)
        # The manifest marks a complete cache: drop the old one before touching data.
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        os.replace(images_tmp, out / IMAGES_FILE)
        os.replace(labels_tmp, out / LABELS_FILE)
        os.replace(quarantine_tmp, out / QUARANTINE_FILE)
        os.replace(manifest_tmp, out / MANIFEST_FILE)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    logger.debug("wrote cache: %d images of %dx%d, %d quarantined", shape[0], shape[1],
                 shape[2], len(quarantine))
    return out


def remove_cache(cache_dir: str | os.PathLike[str]) -> None:
    """Remove the cache files (manifest first) from ``cache_dir``; the quarantine log stays."""
    path = Path(cache_dir)
    for name in (MANIFEST_FILE, IMAGES_FILE, LABELS_FILE):
        (path / name).unlink(missing_ok=True)


def _bad(message: str, path: Path, detail: str = "") -> FedradError:
    return FedradError("bad-cache", f"The site cache is unusable: {message}. {_PREPARE_HINT}",
                       local_detail=f"{path}{': ' + detail if detail else ''}")


def read_manifest(cache_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the parsed manifest of ``cache_dir``, or ``None`` when absent or unreadable."""
    path = Path(cache_dir) / MANIFEST_FILE
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def read_quarantine(cache_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return the quarantine records of ``cache_dir`` (empty when there are none)."""
    path = Path(cache_dir) / QUARANTINE_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_cache(cache_dir: str | os.PathLike[str]) -> SiteCache:
    """Open the site cache in ``cache_dir`` (images memory-mapped) and check it.

    Raises
    ------
    FedradError
        ``no-cache`` when there is no cache; ``bad-cache`` when its files are missing,
        unreadable or inconsistent with the manifest.  Messages carry no path (it is in
        ``local_detail``) and tell the user to run the preparation step.
    """
    path = Path(cache_dir)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FedradError("no-cache", f"No prepared image cache was found for this site. "
                          f"{_PREPARE_HINT}", local_detail=str(path))
    try:
        with open(manifest_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise _bad("its manifest cannot be read", manifest_path, repr(e)) from e
    if not isinstance(meta, dict):
        raise _bad("its manifest is not a JSON object", manifest_path)
    version = meta.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise _bad(f"it has format version {version!r}, this fedrad reads version "
                   f"{CACHE_FORMAT_VERSION}", manifest_path)
    try:
        images = np.load(path / IMAGES_FILE, mmap_mode="r")
        labels = np.load(path / LABELS_FILE)
    except (OSError, ValueError) as e:
        raise _bad("its image or label file is missing or unreadable", path, repr(e)) from e
    try:
        count = int(meta["count"])
        num_classes = int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise _bad("its manifest lacks 'count' or 'num_classes'", manifest_path) from e
    if images.dtype != np.uint8 or images.ndim != 3:
        raise _bad("images.npy is not a uint8 [N, H, W] array", path,
                   f"{images.dtype} {images.shape}")
    if labels.dtype != np.int64 or labels.ndim != 1:
        raise _bad("labels.npy is not an int64 [N] array", path, f"{labels.dtype} {labels.shape}")
    if images.shape[0] != count or labels.shape[0] != count:
        raise _bad("the number of images or labels does not match the manifest", path,
                   f"images {images.shape[0]}, labels {labels.shape[0]}, manifest {count}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise _bad("a label is outside the manifest's classes", path)
    size = meta.get("image_size")
    if size is not None and [size, size] != list(images.shape[1:]) and size != list(
            images.shape[1:]):
        raise _bad("the image size does not match the manifest", path,
                   f"{images.shape[1:]} vs {size}")
    return SiteCache(images=images, labels=labels, meta=meta, path=path)
