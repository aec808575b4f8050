"""Site data preparation: DICOM folder + labels file -> local training cache + quarantine log.

:func:`prepare_site` validates every input, decodes and preprocesses the usable images
once (optionally in a process pool) and writes the cache of :mod:`fedrad.common.cache`.
Every input ends up either in the cache or, with a reason code, in the quarantine log;
nothing is dropped silently.

Inputs are every regular file under the DICOM folder (hidden files and folders, the
labels file and the output folder excepted) plus every labels row that names a file
which is not there.  Reason codes, besides those of
:data:`fedrad.common.dicom.REASON_CODES`:

``missing-file``  a labels row names a file (or SOP Instance UID) not in the folder
``bad-row``       a labels row names neither a file nor a SOP Instance UID
``bad-label``     the label is not a class index / class name, or rows disagree
``unlabelled``    a file in the folder has no labels row
``duplicate``     a second file with an already accepted SOP Instance UID
``preprocess-failed``  the image decoded but preprocessing failed (a fedrad bug: report it)

The labels file is a CSV with a header holding ``label`` and ``file`` (a path relative
to the DICOM folder) and/or ``sop_instance_uid``.  A label is a class index
(``0 <= label < num_classes``) or one of the class names of the settings.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import posixpath
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.common.cache import (
    load_cache,
    read_manifest,
    remove_cache,
    to_uint8,
    write_cache,
    write_quarantine,
)
from fedrad.common.config import Settings
from fedrad.common.dicom import DicomError, decode_dicom
from fedrad.common.errors import FedradError, SiteDataError, hashed_id
from fedrad.common.transforms import build_preprocess

__all__ = ["PrepareResult", "PrepareOptions", "PIPELINE_VERSION", "prepare_site",
           "settings_fingerprint"]

logger = logging.getLogger(__name__)

#: Bump when decoding or preprocessing changes what ends up in a cache.
PIPELINE_VERSION = 1

ProgressCallback = Callable[[int, int], None]


@dataclass
class PrepareResult:
    """Outcome of :func:`prepare_site`.

    Attributes
    ----------
    cache_dir:
        The cache folder (site-local).
    accepted:
        Images in the cache.
    rejected:
        Inputs in the quarantine log.
    reasons:
        Reason code -> number of rejected inputs.
    seconds:
        Wall time of this call.
    reused:
        True when an up-to-date cache was found and nothing was recomputed.
    """

    cache_dir: Path
    accepted: int
    rejected: int
    reasons: dict[str, int]
    seconds: float
    reused: bool = False


@dataclass(frozen=True)
class PrepareOptions:
    """What decoding and preprocessing need, picklable for worker processes."""

    image_size: int
    denoise_sigma: float
    equalize: bool
    crop_square: bool = False
    frame_policy: str = "middle"
    voi_policy: str = "auto"
    max_pixels: int = 64_000_000

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> PrepareOptions:
        return cls(image_size=int(settings.image_size),
                   denoise_sigma=float(settings.denoise_sigma),
                   equalize=bool(settings.equalize), **kwargs)


def settings_fingerprint(options: PrepareOptions, class_names: Sequence[str]) -> str:
    """Digest of everything in the settings that changes the cache's content."""
    payload = {"pipeline": PIPELINE_VERSION, "options": asdict(options),
               "classes": list(class_names)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- inputs


@dataclass
class _Rejection:
    key: str  # relative path (or the labels-file reference) of the input
    code: str
    message: str
    local_path: str
    local_detail: str | None = None
    row: int | None = None


@dataclass
class _LabelRef:
    rows: list[int] = field(default_factory=list)
    raw_labels: list[str] = field(default_factory=list)


def _scan_folder(root: Path, exclude: Sequence[Path]) -> list[str]:
    """Sorted POSIX paths, relative to ``root``, of the regular files under it."""
    excluded = {p.resolve() for p in exclude}
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (here / d).resolve() not in excluded)
        for name in filenames:
            path = here / name
            if name.startswith(".") or path.resolve() in excluded or not path.is_file():
                continue
            found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _normalise_ref(ref: str) -> str | None:
    """Normalise a ``file`` cell to a relative POSIX path; None if it leaves the folder."""
    ref = ref.strip().replace("\\", "/")
    if not ref:
        return ""
    if ref.startswith("/") or (len(ref) > 1 and ref[1] == ":"):
        return None
    norm = posixpath.normpath(ref)
    if norm == ".." or norm.startswith("../"):
        return None
    return norm


def _read_labels(labels_csv: Path) -> tuple[dict[str, _LabelRef], dict[str, _LabelRef],
                                             list[_Rejection]]:
    """Parse the labels CSV into file refs, SOP-Instance-UID refs and bad rows."""
    if not labels_csv.is_file():
        raise SiteDataError("no-labels-file", "The labels file was not found; give a CSV "
                            "with a header 'file,label' (or 'sop_instance_uid,label').",
                            local_detail=str(labels_csv))
    try:
        with open(labels_csv, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            if "label" not in header or not ({"file", "sop_instance_uid"} & set(header)):
                raise SiteDataError(
                    "bad-labels-file",
                    "The labels file needs a header with a 'label' column and a 'file' "
                    "(path relative to the DICOM folder) or 'sop_instance_uid' column; "
                    f"found columns: {', '.join(header) or 'none'}.",
                    local_detail=str(labels_csv))
            reader.fieldnames = header
            by_file: dict[str, _LabelRef] = {}
            by_uid: dict[str, _LabelRef] = {}
            bad_rows: list[_Rejection] = []
            for row_no, row in enumerate(reader, start=2):
                raw_label = (row.get("label") or "").strip()
                ref = _normalise_ref(row.get("file") or "")
                uid = (row.get("sop_instance_uid") or "").strip()
                if ref is None:
                    cell = (row.get("file") or "").strip()
                    bad_rows.append(_Rejection(
                        f"row:{row_no}:{cell}", "missing-file",
                        "A labels row names a file outside the DICOM folder; give paths "
                        "relative to the DICOM folder.", str(labels_csv), cell, row_no))
                elif ref:
                    entry = by_file.setdefault(ref, _LabelRef())
                    entry.rows.append(row_no)
                    entry.raw_labels.append(raw_label)
                elif uid:
                    entry = by_uid.setdefault(uid, _LabelRef())
                    entry.rows.append(row_no)
                    entry.raw_labels.append(raw_label)
                else:
                    bad_rows.append(_Rejection(
                        f"row:{row_no}", "bad-row", "A labels row names neither a file nor "
                        "a SOP Instance UID.", str(labels_csv), None, row_no))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SiteDataError("bad-labels-file", "The labels file cannot be read as a UTF-8 "
                            "CSV; save it as CSV with a 'file,label' header.",
                            local_detail=f"{labels_csv}: {e!r}") from e
    return by_file, by_uid, bad_rows


def _parse_label(raw: str, classes: Sequence[str]) -> int | None:
    if raw in classes:
        return classes.index(raw)
    lowered = [c.lower() for c in classes]
    if raw.lower() in lowered:
        return lowered.index(raw.lower())
    try:
        value = float(raw)
    except ValueError:
        return None
    if value.is_integer() and 0 <= int(value) < len(classes):
        return int(value)
    return None


def _resolve_label(ref: _LabelRef, classes: Sequence[str]) -> int | str:
    """Return the class index, or a message saying why the label is bad."""
    parsed = {_parse_label(raw, classes) for raw in ref.raw_labels}
    if None in parsed:
        return (f"The label is not a class index (0 to {len(classes) - 1}) or a class name "
                f"({', '.join(classes)}); fix the labels file.")
    if len(parsed) > 1:
        return "Several labels rows give this file different labels; keep one."
    return parsed.pop()


def _read_uid(path: Path) -> str | None:
    """SOP Instance UID from a header read, or None if it cannot be read."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"],
                                 force=True)
        uid = ds.get("SOPInstanceUID", None)
    except Exception as e:  # noqa: BLE001 - unreadable files are rejected by decoding later
        logger.debug("no SOP Instance UID readable from %s: %r", path, e)
        return None
    return str(uid).strip() if uid else None


def _inputs_fingerprint(root: Path, files: Sequence[str], labels_csv: Path, site: str,
                        ) -> str:
    digest = hashlib.sha256()
    digest.update(site.encode() + b"\x00")
    digest.update(hashlib.sha256(labels_csv.read_bytes()).digest())
    for rel in files:
        st = (root / rel).stat()
        digest.update(f"{rel}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------- workers


@functools.lru_cache(maxsize=4)
def _pipeline(options: PrepareOptions) -> Callable[[np.ndarray], np.ndarray]:
    return build_preprocess(options, crop_square=options.crop_square)


def _process_one(job: tuple[str, PrepareOptions]) -> tuple[Any, ...]:
    """Decode + preprocess one file.  Returns ``("ok", uint8 image, modality,
    photometric, uid)`` or ``("error", code, message, local_detail)``."""
    path, options = job
    try:
        decoded = decode_dicom(path, frame_policy=options.frame_policy,
                               voi_policy=options.voi_policy, max_pixels=options.max_pixels)
    except DicomError as e:
        return ("error", e.code, e.message, e.local_detail)
    try:
        image = to_uint8(_pipeline(options)(decoded.pixels))
    except Exception as e:  # noqa: BLE001 - recorded in the quarantine log, never dropped
        return ("error", "preprocess-failed", "The image decoded but preprocessing failed; "
                "this is a fedrad bug, please report it with the local log.",
                f"{path}: {type(e).__name__}: {e}")
    return ("ok", image, decoded.modality, decoded.photometric, decoded.sop_instance_uid)


def _pool_context() -> multiprocessing.context.BaseContext:
    # Never fork a parent that may run torch / OpenMP threads (fork can deadlock them).
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _run_serial(jobs: list[tuple[str, PrepareOptions]],
                progress: ProgressCallback | None) -> list[tuple[Any, ...]]:
    results = []
    for done, job in enumerate(jobs, start=1):
        results.append(_process_one(job))
        if progress is not None:
            progress(done, len(jobs))
    return results


def _run_jobs(jobs: list[tuple[str, PrepareOptions]], workers: int,
              progress: ProgressCallback | None) -> list[tuple[Any, ...]]:
    """Process ``jobs`` in order, in ``workers`` processes; results keep the job order."""
    total = len(jobs)
    if progress is not None:
        progress(0, total)
    if workers <= 1 or total <= 1:
        return _run_serial(jobs, progress)
    chunksize = max(1, min(32, total // (workers * 4)))
    results: list[tuple[Any, ...]] = []
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
            for done, result in enumerate(pool.map(_process_one, jobs, chunksize=chunksize),
                                          start=1):
                results.append(result)
                if progress is not None:
                    progress(done, total)
    except BrokenProcessPool as e:
        # Workers could not start (e.g. a main module they cannot re-import) or died.
        logger.warning("worker processes failed (%s); preparing in this process instead", e)
        return _run_serial(jobs, progress)
    return results


# ----------------------------------------------------------------------- main entry


def _reuse(out_dir: Path, settings_fp: str, inputs_fp: str, start: float
           ) -> PrepareResult | None:
    manifest = read_manifest(out_dir)
    if not manifest or manifest.get("settings_fingerprint") != settings_fp \
            or manifest.get("inputs_fingerprint") != inputs_fp:
        return None
    try:
        cache = load_cache(out_dir)
    except FedradError as e:
        logger.info("existing cache is unusable (%s); preparing again", e.code)
        return None
    reasons = {str(k): int(v) for k, v in (manifest.get("reasons") or {}).items()}
    return PrepareResult(cache_dir=out_dir, accepted=len(cache), rejected=sum(reasons.values()),
                         reasons=reasons, seconds=time.perf_counter() - start, reused=True)


def prepare_site(
    dicom_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: Settings,
    *,
    site_id: str = "site",
    workers: int = 1,
    progress: ProgressCallback | None = None,
    crop_square: bool = False,
) -> PrepareResult:
    """Turn a site's DICOM folder and labels file into its local training cache.

    Parameters
    ----------
    dicom_dir:
        Folder of DICOM files (searched recursively).
    labels_csv:
        Labels CSV (see the module docstring).
    out_dir:
        Cache folder; see :mod:`fedrad.common.cache`.  When it already holds a cache made
        from the same inputs (relative paths, sizes, modification times, labels file)
        and the same preprocessing settings, it is reused as is.
    settings:
        Run settings: ``image_size``, ``denoise_sigma``, ``equalize``, ``num_classes``
        and ``class_names`` are used.
    site_id:
        The site's name; only its hash appears in messages and in the manifest.
    workers:
        Processes for decoding and preprocessing (1: in this process).
    progress:
        Optional ``callback(done, total)`` over the files to decode.
    crop_square:
        Centre-crop non-square images to a square instead of stretching them.

    Returns
    -------
    PrepareResult

    Raises
    ------
    SiteDataError
        ``no-labels-file`` / ``bad-labels-file`` for a missing or malformed labels
        file, ``no-usable-image`` when no input can be used (the quarantine log is
        still written to ``out_dir``).  Messages carry hashed ids and reason counts,
        never paths.
    """
    start = time.perf_counter()
    root = Path(dicom_dir)
    labels_path = Path(labels_csv)
    out = Path(out_dir)
    site = hashed_id(site_id)
    if not root.is_dir():
        raise SiteDataError("no-dicom-folder", f"Site {site}: the DICOM folder was not found "
                            "or is not a folder; check the site's data-dir setting.",
                            local_detail=str(root))
    classes = list(settings.classes)
    options = PrepareOptions.from_settings(settings, crop_square=crop_square)
    settings_fp = settings_fingerprint(options, classes)

    files = _scan_folder(root, exclude=[labels_path, out])
    by_file, by_uid, rejections = _read_labels(labels_path)
    inputs_fp = _inputs_fingerprint(root, files, labels_path, site)
    reused = _reuse(out, settings_fp, inputs_fp, start)
    if reused is not None:
        logger.info("site %s: cache is up to date (%d images, %d rejected); reusing it",
                    site, reused.accepted, reused.rejected)
        return reused

    # Match labels rows to files.
    present = set(files)
    for ref, entry in sorted(by_file.items()):
        if ref not in present:
            rejections.append(_Rejection(
                ref, "missing-file", "A labels row names a file that is not in the DICOM "
                "folder; fix the labels file or add the file.", str(root / ref),
                row=entry.rows[0]))
    labelled: dict[str, _LabelRef] = {rel: by_file[rel] for rel in files if rel in by_file}
    if by_uid:
        matched: set[str] = set()
        for rel in files:
            uid = _read_uid(root / rel)
            if uid is None or uid not in by_uid:
                continue
            matched.add(uid)
            if rel in labelled:  # named both by path and by UID: both rows must agree
                both = labelled[rel]
                labelled[rel] = _LabelRef(both.rows + by_uid[uid].rows,
                                          both.raw_labels + by_uid[uid].raw_labels)
            else:
                labelled[rel] = by_uid[uid]
        for uid, entry in sorted(by_uid.items()):
            if uid not in matched:
                rejections.append(_Rejection(
                    "uid:" + uid, "missing-file", "A labels row names a SOP Instance UID "
                    "that no file in the DICOM folder has.", str(labels_path),
                    f"SOP Instance UID {uid}", entry.rows[0]))
    # Inputs are the files plus the labels rows rejected so far (they name no file here).
    total_inputs = len(files) + len(rejections)

    jobs: list[tuple[str, PrepareOptions]] = []
    job_files: list[str] = []
    job_labels: list[int] = []
    for rel in files:
        if rel not in labelled:
            rejections.append(_Rejection(rel, "unlabelled", "The file has no row in the "
                                         "labels file; add one or remove the file.",
                                         str(root / rel)))
            continue
        label = _resolve_label(labelled[rel], classes)
        if isinstance(label, str):
            rejections.append(_Rejection(rel, "bad-label", label, str(root / rel),
                                         row=labelled[rel].rows[0]))
            continue
        jobs.append((str(root / rel), options))
        job_files.append(rel)
        job_labels.append(label)

    images: list[np.ndarray] = []
    labels: list[int] = []
    records: list[dict[str, Any]] = []
    seen_uids: dict[str, str] = {}
    for rel, label, result in zip(job_files, job_labels, _run_jobs(jobs, workers, progress),
                                  strict=True):
        if result[0] == "error":
            _, code, message, detail = result
            rejections.append(_Rejection(rel, code, message, str(root / rel), detail))
            if code == "preprocess-failed":
                logger.warning("site %s: preprocessing failed for file %s: %s", site,
                               hashed_id(rel, salt=site_id), detail)
            continue
        _, image, modality, photometric, uid = result
        if uid is not None and uid in seen_uids:
            rejections.append(_Rejection(
                rel, "duplicate", "Another file with the same SOP Instance UID is already in "
                "the cache; remove the copy.", str(root / rel),
                f"same SOP Instance UID as {seen_uids[uid]}"))
            continue
        if uid is not None:
            seen_uids[uid] = rel
        images.append(image)
        labels.append(label)
        records.append({"id": hashed_id(rel, salt=site_id), "label": label,
                        "modality": modality, "photometric": photometric})

    quarantine = [_quarantine_record(r, site_id) for r in rejections]
    for r in rejections:
        logger.debug("rejected %s (%s): %s [%s]", r.local_path, r.code, r.message,
                     r.local_detail)
    reasons = dict(sorted(Counter(r.code for r in rejections).items()))
    if len(images) + len(rejections) != total_inputs:
        raise RuntimeError(f"internal error: {len(images)} accepted + {len(rejections)} "
                           f"rejected != {total_inputs} inputs")

    if not images:
        remove_cache(out)
        write_quarantine(out, quarantine)
        counts = ", ".join(f"{n} {code}" for code, n in reasons.items()) or "no input files"
        raise SiteDataError(
            "no-usable-image",
            f"Site {site} has no usable image ({counts}). See the quarantine log "
            "(quarantine.jsonl in the site's cache folder) for each file, fix the "
            "inputs and run the preparation again.")

    class_counts = Counter(labels)
    for index, name in enumerate(classes):
        if class_counts.get(index, 0) == 0:
            logger.warning("site %s has no image of class %d (%s)", site, index, name)
    meta = {
        "site": site,
        "class_names": classes,
        "num_classes": len(classes),
        "settings_fingerprint": settings_fp,
        "inputs_fingerprint": inputs_fp,
        "pipeline_version": PIPELINE_VERSION,
        "preprocessing": asdict(options),
        "reasons": reasons,
    }
    write_cache(out, images, labels, records=records, quarantine=quarantine, meta=meta)
    seconds = time.perf_counter() - start
    logger.info("site %s: %d images cached, %d inputs rejected %s in %.1f s", site,
                len(images), len(rejections), reasons or "", seconds)
    return PrepareResult(cache_dir=out, accepted=len(images), rejected=len(rejections),
                         reasons=reasons, seconds=seconds)


def _quarantine_record(r: _Rejection, site_id: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": hashed_id(r.key, salt=site_id), "code": r.code,
                              "message": r.message, "local_path": r.local_path}
    if r.row is not None:
        record["labels_row"] = r.row
    if r.local_detail:
        record["local_detail"] = r.local_detail
    return record
