"""Site data preparation: DICOM folder + labels file -> local training cache + quarantine log.

:func:`prepare_site` validates every input, de-identifies its header
(:mod:`fedrad.client.deid`), decodes and preprocesses the usable images once (optionally
in a process pool) and writes the cache of :mod:`fedrad.common.cache`.
:func:`check_site` runs the same validation as a dry run and writes no pixels.
Every input ends up either in the cache or, with a reason code, in the quarantine log;
nothing is dropped silently.

Inputs are every file under the DICOM folder (hidden files and folders, the labels file
and the output folder excepted) plus every labels row that names a file which is not
there.  Reason codes, besides those of :data:`fedrad.common.dicom.REASON_CODES`:

``missing-file``  a labels row names a file (or SOP Instance UID) not in the folder
``not-a-file``    a labels row names a folder (e.g. a folder called ``x.dcm``)
``outside-folder``  a symbolic link that points outside the DICOM folder (not followed)
``broken-link``   a symbolic link whose target does not exist
``unreadable``    the file cannot be opened for reading (permissions)
``bad-row``       a labels row names neither a file nor a SOP Instance UID
``bad-label``     the label is not a class index / class name, or rows disagree
``unlabelled``    a file in the folder has no labels row
``duplicate``     a second file with an already accepted SOP Instance UID
``modality-not-allowed``  the Modality is not in the allow-list (``allowed_modalities``)
``too-small``     fewer rows or columns than ``min_size``
``too-large``     more rows or columns than ``max_size`` (or more pixels than ``max_pixels``)
``burned-in-annotation``  ``BurnedInAnnotation = YES`` (unless ``allow_burned_in``)
``timeout``       decoding took longer than ``file_timeout`` seconds (``workers > 1`` only:
                  with ``workers = 1`` files are decoded in this process and no limit is
                  enforced)
``preprocess-failed``  the image decoded but preprocessing failed (a fedrad bug: report it)

Default modality allow-list (:data:`DEFAULT_MODALITIES`): the radiology imaging
modalities CR, DX, DR (legacy), MG, CT, MR, PT, NM, US, XA, RF, IO, PX and OT (secondary
capture); ``("*",)`` admits every modality, including files without one.

The labels file is a CSV with a header holding ``label`` and ``file`` (a path relative
to the DICOM folder) and/or ``sop_instance_uid``.  A label is a class index
(``0 <= label < num_classes``) or one of the class names of the settings.

Everything recorded (manifest records, quarantine ids, logs) uses de-identified values:
file ids are keyed hashes with the site secret (``site-secret`` in the cache folder),
UIDs are remapped, the path appears only in the quarantine record's ``local_path`` (and
``local_detail``), which stay at the site.

Resuming: per-file results are checkpointed in ``<cache>/.partial/`` keyed by the
file's path, its file signature (:func:`_file_signature`: size, modification and
status-change times, inode) and the settings; an interrupted run continues where it
stopped and the folder is removed once the cache is written.  A file is never read
(nor hashed) to tell whether it changed: any write to it, a copy over it that keeps
its modification time, or a replacement by another file changes the signature and
the file is done again.
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import posixpath
import secrets
import shutil
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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
from fedrad.common.dicom import DecodedImage, DicomError, decode_dicom, read_dicom
from fedrad.common.errors import FedradError, SiteDataError, hashed_id
from fedrad.common.transforms import build_preprocess

from .deid import deidentify, describe, load_site_secret, remap_uid, secret_id

__all__ = ["CheckResult", "DEFAULT_MODALITIES", "PrepareResult", "PrepareOptions",
           "PARTIAL_DIR", "PIPELINE_VERSION", "check_site", "prepare_site",
           "settings_fingerprint"]

logger = logging.getLogger(__name__)

#: Bump when decoding, validation or preprocessing changes what ends up in a cache.
PIPELINE_VERSION = 2

#: Modalities admitted by default: radiology imaging (see the module docstring).
DEFAULT_MODALITIES: tuple[str, ...] = ("CR", "DX", "DR", "MG", "CT", "MR", "PT", "NM",
                                       "US", "XA", "RF", "IO", "PX", "OT")

#: Checkpoint folder (inside the cache folder) of an unfinished preparation.
PARTIAL_DIR = ".partial"

ProgressCallback = Callable[[int, int], None]
_Result = tuple[Any, ...]


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
    resumed:
        Files whose result came from the checkpoint of an interrupted run.
    """

    cache_dir: Path
    accepted: int
    rejected: int
    reasons: dict[str, int]
    seconds: float
    reused: bool = False
    resumed: int = 0


@dataclass
class CheckResult:
    """Outcome of :func:`check_site` (a dry run: nothing is cached).

    Attributes
    ----------
    accepted:
        Inputs that would be cached.
    rejected:
        Inputs that would be quarantined.
    reasons:
        Reason code -> number of rejected inputs.
    seconds:
        Wall time of this call.
    report:
        The JSON report written (site-local), or None.
    """

    accepted: int
    rejected: int
    reasons: dict[str, int]
    seconds: float
    report: Path | None = None


@dataclass(frozen=True)
class PrepareOptions:
    """What validation, decoding and preprocessing need, picklable for worker processes.

    Attributes
    ----------
    allowed_modalities:
        Modality allow-list; ``("*",)`` admits all (also files without a Modality).
    min_size, max_size:
        Smallest and largest accepted number of rows and of columns.
    allow_burned_in:
        Accept images whose header says ``BurnedInAnnotation = YES``.
    subgroup_fields:
        Keep sex and a ten-year age band per image (Retain Patient Characteristics).
    file_timeout:
        Seconds one file may take to decode and preprocess (enforced with workers > 1).
    """

    image_size: int
    denoise_sigma: float
    equalize: bool
    crop_square: bool = False
    frame_policy: str = "middle"
    voi_policy: str = "auto"
    max_pixels: int = 64_000_000
    allowed_modalities: tuple[str, ...] = DEFAULT_MODALITIES
    min_size: int = 16
    max_size: int = 16384
    allow_burned_in: bool = False
    subgroup_fields: bool = False
    file_timeout: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> PrepareOptions:
        if "allowed_modalities" in kwargs:
            kwargs["allowed_modalities"] = tuple(
                str(m).strip().upper() for m in kwargs["allowed_modalities"])
        return cls(image_size=int(settings.image_size),
                   denoise_sigma=float(settings.denoise_sigma),
                   equalize=bool(settings.equalize), **kwargs)


def settings_fingerprint(options: PrepareOptions, class_names: Sequence[str],
                         secret: bytes = b"") -> str:
    """Digest of everything that changes the cache's content (the secret changes ids;
    the time limit does not count)."""
    content = {k: v for k, v in asdict(options).items() if k != "file_timeout"}
    payload = {"pipeline": PIPELINE_VERSION, "options": content,
               "classes": list(class_names),
               "secret": hashlib.sha256(b"fedrad-secret\x00" + secret).hexdigest()}
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


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _scan_folder(root: Path, exclude: Sequence[Path]) -> tuple[list[str], list[_Rejection]]:
    """Sorted POSIX paths, relative to ``root``, of the readable regular files under it,
    and the rejections of the entries that cannot be inputs (links out of the folder,
    broken links, unreadable files, special files)."""
    excluded = {p.resolve() for p in exclude}
    real_root = root.resolve()
    found: list[str] = []
    rejected: list[_Rejection] = []

    def reject(path: Path, code: str, message: str) -> None:
        rejected.append(_Rejection(path.relative_to(root).as_posix(), code, message,
                                   str(path)))

    def link_target(path: Path) -> Path | None:
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            reject(path, "broken-link", "The symbolic link points to nothing; fix or remove "
                   "it.")
            return None
        if not _is_within(target, real_root):
            reject(path, "outside-folder", "The symbolic link points outside the DICOM "
                   "folder and is not followed; copy the file into the folder instead.")
            return None
        return target

    def walk_error(error: OSError) -> None:
        where = Path(error.filename) if error.filename else root
        rejected.append(_Rejection(
            where.relative_to(root).as_posix() if where != root else ".", "unreadable",
            "A folder cannot be listed by this user, so its files are not seen; check its "
            "permissions (chmod / chown) and run again.", str(where), repr(error)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        here = Path(dirpath)
        kept = []
        for name in sorted(dirnames):
            path = here / name
            if name.startswith(".") or path.resolve() in excluded:
                continue
            if path.is_symlink():
                # Never followed: a link inside the folder is reached by its real path.
                link_target(path)
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = here / name
            if name.startswith("."):
                continue
            if path.is_symlink() and link_target(path) is None:
                continue
            if path.resolve() in excluded:
                continue
            if not path.is_file():
                reject(path, "not-a-file", "The entry is not a regular file (a device, "
                       "socket or pipe); remove it from the DICOM folder.")
            elif not os.access(path, os.R_OK):
                reject(path, "unreadable", "The file cannot be read by this user; check its "
                       "permissions (chmod / chown) and run again.")
            else:
                found.append(path.relative_to(root).as_posix())
    return sorted(found), sorted(rejected, key=lambda r: r.key)


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


def _file_signature(st: os.stat_result) -> str:
    """What tells a changed file from an unchanged one without reading it: size,
    modification time, status-change time (set by every write, and by a copy or
    restore that puts the old modification time back) and inode (a replacement)."""
    return f"{st.st_size}\x00{st.st_mtime_ns}\x00{st.st_ctime_ns}\x00{st.st_ino}"


def _inputs_fingerprint(root: Path, files: Sequence[str], skipped: Sequence[str],
                        labels_csv: Path, site: str) -> str:
    digest = hashlib.sha256()
    digest.update(site.encode() + b"\x00")
    digest.update(hashlib.sha256(labels_csv.read_bytes()).digest())
    for rel in files:
        st = (root / rel).stat()
        digest.update(f"{rel}\x00{_file_signature(st)}\n".encode())
    for rel in skipped:
        digest.update(f"{rel}\x00skipped\n".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------- workers


@functools.lru_cache(maxsize=4)
def _pipeline(options: PrepareOptions) -> Callable[[np.ndarray], np.ndarray]:
    return build_preprocess(options, crop_square=options.crop_square)


def _read_header(path: Path, *, force: bool = False) -> Any:
    """The header (no pixels) of ``path``, or None when it cannot be read as DICOM."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True, force=force)
    except Exception as e:  # noqa: BLE001 - decode_dicom classifies the failure
        logger.debug("header not readable (%s); decoding will classify it", type(e).__name__)
        return None


def _validate(fields: dict[str, Any], header: Any, options: PrepareOptions
              ) -> tuple[str, str, str] | None:
    """``(code, message, local_detail)`` for a file the site's policy rejects, else None."""
    allowed = options.allowed_modalities
    modality = (fields.get("modality") or "").upper()
    if "*" not in allowed and modality not in allowed:
        return ("modality-not-allowed",
                "The image's modality is not in the site's allow-list "
                f"({', '.join(allowed)}); widen the allow-list (--allow-modality) or remove "
                "the file.", f"modality {modality or '(none)'}")
    rows, cols = fields.get("rows"), fields.get("cols")
    if rows and cols:
        if min(rows, cols) < options.min_size:
            return ("too-small", f"The image is smaller than {options.min_size} pixels on a "
                    "side (--min-size); it is probably a thumbnail or a localiser.",
                    f"{rows}x{cols}")
        if max(rows, cols) > options.max_size:
            return ("too-large", f"The image is larger than {options.max_size} pixels on a "
                    "side (--max-size); raise the limit if the site has the memory.",
                    f"{rows}x{cols}")
    burned = str(header.get("BurnedInAnnotation", "") if header is not None else "")
    if burned.strip().upper() == "YES" and not options.allow_burned_in:
        return ("burned-in-annotation", "The header says the image has burned-in "
                "annotation (text that may identify the patient); it is quarantined. Use "
                "--allow-burned-in only after checking such images are clean.", "")
    return None


def _process_one(job: tuple[str, PrepareOptions, bytes]) -> _Result:
    """Validate, de-identify, decode and preprocess one file.

    Returns ``("ok", uint8 image, fields, remapped SOP Instance UID or None)`` or
    ``("error", code, message, local_detail)``.
    """
    path_str, options, secret = job
    with warnings.catch_warnings():
        # pydicom's value warnings may quote header values: keep them off stderr.
        warnings.simplefilter("ignore")
        return _process_file(Path(path_str), options, secret)


def _process_file(path: Path, options: PrepareOptions, secret: bytes) -> _Result:
    """One file, its header parsed once: policy checks on the header as read, decoding
    from that same dataset, then de-identification of it.

    The checks read Modality, Rows, Columns and BurnedInAnnotation, which the Basic
    Profile leaves as they are, so they see what they would see after
    de-identification.  Files without a Part 10 preamble, or whose header cannot be
    read, take :func:`_process_file_two_reads` (the reasons and their order stay the
    same).
    """
    try:
        ds = read_dicom(path)
    except DicomError:
        ds = None
    if ds is None or getattr(ds, "preamble", None) is None:
        return _process_file_two_reads(path, options, secret)
    if "Rows" in ds:  # an image: check the policy before decoding
        problem = _validate(describe(ds, subgroups=options.subgroup_fields), ds, options)
        if problem is not None:
            return ("error", *problem)
    try:
        decoded = decode_dicom(path, frame_policy=options.frame_policy,
                               voi_policy=options.voi_policy, max_pixels=options.max_pixels,
                               allow_affine=True, dataset=ds)
    except DicomError as e:
        return ("error", e.code, e.message, e.local_detail)
    deidentify(ds, secret, retain_patient_characteristics=options.subgroup_fields)
    return _finish(path, ds, decoded, options, secret)


def _process_file_two_reads(path: Path, options: PrepareOptions, secret: bytes) -> _Result:
    header = _read_header(path)
    if header is not None:
        deidentify(header, secret, retain_patient_characteristics=options.subgroup_fields)
    if header is not None and "Rows" in header:  # an image: check the policy before decoding
        problem = _validate(describe(header, subgroups=options.subgroup_fields), header,
                            options)
        if problem is not None:
            return ("error", *problem)
    try:
        decoded = decode_dicom(path, frame_policy=options.frame_policy,
                               voi_policy=options.voi_policy, max_pixels=options.max_pixels,
                               allow_affine=True)
    except DicomError as e:
        return ("error", e.code, e.message, e.local_detail)
    if header is None:  # no Part 10 preamble: it decoded, so its header reads with force
        header = _read_header(path, force=True)
        if header is not None:
            deidentify(header, secret,
                       retain_patient_characteristics=options.subgroup_fields)
    return _finish(path, header, decoded, options, secret)


def _finish(path: Path, header: Any, decoded: DecodedImage, options: PrepareOptions,
            secret: bytes) -> _Result:
    """Validate the decoded image's fields and preprocess it (``header`` de-identified)."""
    fields = describe(header, subgroups=options.subgroup_fields) if header is not None \
        else describe({}, subgroups=options.subgroup_fields)
    fields.update(modality=decoded.modality or fields["modality"],
                  photometric=decoded.photometric, bits_stored=decoded.bits_stored,
                  rows=decoded.rows, cols=decoded.cols, frames=decoded.frames)
    problem = _validate(fields, header, options)
    if problem is not None:
        return ("error", *problem)
    uid = None
    if header is not None and header.get("SOPInstanceUID", None):
        uid = str(header.SOPInstanceUID)
    elif decoded.sop_instance_uid:
        uid = remap_uid(decoded.sop_instance_uid, secret)
    try:
        pipeline = _pipeline(options) if decoded.affine is None else build_preprocess(
            options, crop_square=options.crop_square, affine=decoded.affine)
        image = to_uint8(pipeline(decoded.pixels))
    except Exception as e:  # noqa: BLE001 - recorded in the quarantine log, never dropped
        return ("error", "preprocess-failed", "The image decoded but preprocessing failed; "
                "this is a fedrad bug, please report it with the local log.",
                f"{path}: {type(e).__name__}: {e}")
    return ("ok", image, fields, uid)


def _pool_context() -> multiprocessing.context.BaseContext:
    # Never fork a parent that may run torch / OpenMP threads (fork can deadlock them).
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


_ResultCallback = Callable[[int, _Result], None]


def _run_serial(jobs: Sequence[Any], indices: Sequence[int], on_result: _ResultCallback,
                func: Callable[[Any], Any] | None = None) -> None:
    for i in indices:
        on_result(i, (func or _process_one)(jobs[i]))


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    # concurrent.futures cannot cancel a running task: stop its processes instead.
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()


def _run_jobs(jobs: Sequence[Any], indices: Sequence[int], workers: int, timeout: float,
              on_result: _ResultCallback, func: Callable[[Any], Any] | None = None) -> None:
    """Run ``func(jobs[i])`` (default :func:`_process_one`) for ``i`` in ``indices`` in
    ``workers`` processes, calling ``on_result(i, result)`` as each finishes (in
    completion order).

    With ``workers > 1`` a file running longer than ``timeout`` seconds gets a
    ``timeout`` result and the pool is restarted for the rest; a file whose worker dies
    twice gets ``worker-crashed``.  With ``workers <= 1`` the files run in this process
    and no time limit is enforced.
    """
    if workers <= 1 or len(indices) <= 1:
        _run_serial(jobs, indices, on_result, func)
        return
    queue = deque(indices)
    crashes: Counter[int] = Counter()
    any_result = False
    while queue:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
        running: dict[Future[_Result], tuple[int, float]] = {}
        restart = False
        try:
            while queue or running:
                while queue and len(running) < workers:
                    i = queue.popleft()
                    running[pool.submit(func or _process_one, jobs[i])] = (i, time.monotonic())
                now = time.monotonic()
                wait_s = max(0.05, min(t0 + timeout - now for _, t0 in running.values()))
                done, _ = wait(running, timeout=wait_s, return_when=FIRST_COMPLETED)
                for future in done:
                    i, _ = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        crashes[i] += 1
                        if crashes[i] >= 2:
                            on_result(i, ("error", "worker-crashed", "Decoding this file "
                                          "crashed the worker process (a codec failure or "
                                          "out of memory); re-export the file from PACS.",
                                          "the worker process died twice on this file"))
                        else:
                            queue.appendleft(i)
                        restart = True
                        continue
                    any_result = True
                    on_result(i, result)
                now = time.monotonic()
                for future, (i, t0) in list(running.items()):
                    if now - t0 > timeout:
                        running.pop(future)
                        on_result(i, ("error", "timeout", f"Decoding took longer than "
                                      f"{timeout:g} s (file-timeout); the file is quarantined.",
                                      f"no result after {timeout:g} s; worker stopped"))
                        restart = True
                if restart:
                    queue.extendleft(sorted((i for i, _ in running.values()), reverse=True))
                    running.clear()
                    break
        finally:
            if restart:
                _kill_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)
        if restart and not any_result and crashes:
            # Workers could not start (e.g. a main module they cannot re-import).
            logger.warning("worker processes failed; preparing in this process instead")
            _run_serial(jobs, list(queue), on_result, func)
            return


# ----------------------------------------------------------------------- checkpoint


class _Checkpoint:
    """Per-file results of an unfinished preparation, in ``<cache>/.partial/``."""

    def __init__(self, out: Path, settings_fp: str) -> None:
        self.folder = out / PARTIAL_DIR
        self.settings_fp = settings_fp

    def key(self, path: Path) -> str:
        st = path.stat()
        text = f"{self.settings_fp}\x00{path}\x00{_file_signature(st)}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load(self, key: str) -> _Result | None:
        meta_path = self.folder / f"{key}.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta["status"] == "ok":
                image = np.load(self.folder / f"{key}.npy")
                return ("ok", image, meta["fields"], meta["uid"])
            return ("error", meta["code"], meta["message"], meta["detail"])
        except (OSError, ValueError, KeyError) as e:
            logger.debug("checkpoint entry unusable (%s); redoing the file", e)
            return None

    def save(self, key: str, result: _Result) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if result[0] == "ok":
            _, image, fields, uid = result
            tmp = self.folder / f"{key}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, image)
            os.replace(tmp, self.folder / f"{key}.npy")
            meta: dict[str, Any] = {"status": "ok", "fields": fields, "uid": uid}
        else:
            _, code, message, detail = result
            meta = {"status": "error", "code": code, "message": message, "detail": detail}
        tmp = self.folder / f"{key}.json.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, self.folder / f"{key}.json")

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_failed(e: OSError, site: str, where: Path) -> SiteDataError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return SiteDataError(
            "disk-full", f"Site {site}: the disk holding the cache folder is full (see the "
            "local detail for the folder); free space there or choose another --out, then "
            "run the preparation again.  The previous cache, if any, is unchanged and the "
            "work done so far is kept for the next run.",
            local_detail=f"disk full while writing to {where}: {e}")
    return SiteDataError(
        "cache-write-failed", f"Site {site}: the cache folder cannot be written "
        f"({errno.errorcode.get(e.errno or 0, 'I/O error')}); check its permissions and free "
        "space.  The previous cache, if any, is unchanged.",
        local_detail=f"writing to {where}: {e}")


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


@dataclass
class _Outcome:
    images: list[np.ndarray]
    labels: list[int]
    records: list[dict[str, Any]]
    rejections: list[_Rejection]
    resumed: int


def _match_labels(root: Path, files: list[str], skipped: list[_Rejection], labels_path: Path,
                  by_file: dict[str, _LabelRef], by_uid: dict[str, _LabelRef],
                  rejections: list[_Rejection]) -> dict[str, _LabelRef]:
    """Match labels rows to files; rows naming nothing here are added to ``rejections``."""
    present = set(files) | {r.key for r in skipped}
    for ref, entry in sorted(by_file.items()):
        if ref in present:
            continue
        if (root / ref).is_dir():
            rejections.append(_Rejection(
                ref, "not-a-file", "A labels row names a folder, not a file (e.g. a folder "
                "called 'x.dcm'); name the DICOM file inside it.", str(root / ref),
                row=entry.rows[0]))
        else:
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
                    None, entry.rows[0]))
    return labelled


def _run_pipeline(root: Path, labels_path: Path, out: Path | None, files: list[str],
                  skipped: list[_Rejection], classes: list[str], options: PrepareOptions,
                  secret: bytes, settings_fp: str, *, site: str, workers: int,
                  progress: ProgressCallback | None, dry_run: bool) -> _Outcome:
    """Everything between the folder scan and the cache write (shared with the check)."""
    by_file, by_uid, label_rejections = _read_labels(labels_path)
    rejections = list(skipped) + label_rejections
    labelled = _match_labels(root, files, skipped, labels_path, by_file, by_uid, rejections)
    total_inputs = len(files) + len(rejections)

    jobs: list[tuple[str, PrepareOptions, bytes]] = []
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
        jobs.append((str(root / rel), options, secret))
        job_files.append(rel)
        job_labels.append(label)

    results: dict[int, _Result] = {}
    checkpoint = None if dry_run or out is None else _Checkpoint(out, settings_fp)
    keys: list[str] = []
    if checkpoint is not None:
        keys = [checkpoint.key(Path(job[0])) for job in jobs]
        for i, key in enumerate(keys):
            loaded = checkpoint.load(key)
            if loaded is not None:
                results[i] = loaded
    resumed = len(results)
    if resumed:
        logger.info("site %s: resuming an interrupted preparation (%d of %d files done)",
                    site, resumed, len(jobs))
    total = len(jobs)
    if progress is not None:
        progress(resumed, total)

    def on_result(i: int, result: _Result) -> None:
        if dry_run and result[0] == "ok":
            result = ("ok", None, result[2], result[3])
        results[i] = result
        if checkpoint is not None:
            try:
                checkpoint.save(keys[i], result)
            except OSError as e:
                raise _write_failed(e, site, checkpoint.folder) from e
        if progress is not None:
            progress(len(results), total)

    todo = [i for i in range(total) if i not in results]
    _run_jobs(jobs, todo, workers, options.file_timeout, on_result)

    outcome = _Outcome([], [], [], [], resumed)
    seen_uids: dict[str, str] = {}
    for i, (rel, label) in enumerate(zip(job_files, job_labels, strict=True)):
        result = results[i]
        if result[0] == "error":
            _, code, message, detail = result
            rejections.append(_Rejection(rel, code, message, str(root / rel), detail))
            if code == "preprocess-failed":
                logger.warning("site %s: preprocessing failed for file %s", site,
                               secret_id(rel, secret))
            continue
        _, image, fields, uid = result
        file_id = secret_id(rel, secret)
        if uid is not None and uid in seen_uids:
            rejections.append(_Rejection(
                rel, "duplicate", "Another file with the same SOP Instance UID is already in "
                "the cache; remove the copy.", str(root / rel),
                f"same SOP Instance UID as file id {seen_uids[uid]}"))
            continue
        if uid is not None:
            seen_uids[uid] = file_id
        outcome.images.append(image)
        outcome.labels.append(label)
        outcome.records.append({"id": file_id, "label": label, **fields})
    outcome.rejections = rejections
    if len(outcome.labels) + len(rejections) != total_inputs:
        raise RuntimeError(f"internal error: {len(outcome.labels)} accepted + "
                           f"{len(rejections)} rejected != {total_inputs} inputs")
    return outcome


def _start(dicom_dir: str | os.PathLike[str], site_id: str) -> tuple[Path, str]:
    root = Path(dicom_dir)
    site = hashed_id(site_id)
    if not root.is_dir():
        raise SiteDataError("no-dicom-folder", f"Site {site}: the DICOM folder was not found "
                            "or is not a folder; check the site's data-dir setting.",
                            local_detail=str(root))
    return root, site


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
    allowed_modalities: Sequence[str] = DEFAULT_MODALITIES,
    min_size: int = 16,
    max_size: int = 16384,
    allow_burned_in: bool = False,
    subgroup_fields: bool = False,
    file_timeout: float = 120.0,
    site_secret: str | bytes | None = None,
) -> PrepareResult:
    """Turn a site's DICOM folder and labels file into its local training cache.

    Parameters
    ----------
    dicom_dir:
        Folder of DICOM files (searched recursively; symbolic links are followed only
        when they stay inside it).
    labels_csv:
        Labels CSV (see the module docstring).
    out_dir:
        Cache folder; see :mod:`fedrad.common.cache`.  When it already holds a cache made
        from the same inputs (relative paths, file signatures, labels file)
        and the same settings, it is reused as is.  An interrupted run resumes from
        ``<out_dir>/.partial/``.
    settings:
        Run settings: ``image_size``, ``denoise_sigma``, ``equalize``, ``num_classes``
        and ``class_names`` are used.
    site_id:
        The site's name; only its hash appears in messages and in the manifest.
    workers:
        Processes for decoding and preprocessing (1: in this process, no time limit).
    progress:
        Optional ``callback(done, total)`` over the files to decode.
    crop_square:
        Centre-crop non-square images to a square instead of stretching them.
    allowed_modalities:
        Modality allow-list (default :data:`DEFAULT_MODALITIES`; ``["*"]``: all).
    min_size, max_size:
        Accepted range of rows and of columns.
    allow_burned_in:
        Accept images whose header says ``BurnedInAnnotation = YES``.
    subgroup_fields:
        Record sex and a ten-year age band per image (for subgroup metrics).
    file_timeout:
        Seconds one file may take (enforced with ``workers > 1``).
    site_secret:
        Key of the hashed ids and UID remapping; default: ``<out_dir>/site-secret``
        (created with 0600 permissions when absent).

    Returns
    -------
    PrepareResult

    Raises
    ------
    SiteDataError
        ``no-labels-file`` / ``bad-labels-file`` for a missing or malformed labels
        file, ``no-usable-image`` when no input can be used (the quarantine log is
        still written to ``out_dir``), ``disk-full`` / ``cache-write-failed`` when the
        cache cannot be written (the previous cache stays intact).  Messages carry
        hashed ids and reason counts, never paths.
    """
    start = time.perf_counter()
    root, site = _start(dicom_dir, site_id)
    labels_path = Path(labels_csv)
    out = Path(out_dir)
    try:
        secret = load_site_secret(out, site_secret)
    except OSError as e:
        raise _write_failed(e, site, out) from e
    classes = list(settings.classes)
    options = PrepareOptions.from_settings(
        settings, crop_square=crop_square, allowed_modalities=tuple(allowed_modalities),
        min_size=min_size, max_size=max_size, allow_burned_in=allow_burned_in,
        subgroup_fields=subgroup_fields, file_timeout=file_timeout)
    settings_fp = settings_fingerprint(options, classes, secret)

    files, skipped = _scan_folder(root, exclude=[labels_path, out])
    if not labels_path.is_file():
        _read_labels(labels_path)  # raises the no-labels-file error
    inputs_fp = _inputs_fingerprint(root, files, [r.key for r in skipped], labels_path, site)
    reused = _reuse(out, settings_fp, inputs_fp, start)
    if reused is not None:
        logger.info("site %s: cache is up to date (%d images, %d rejected); reusing it",
                    site, reused.accepted, reused.rejected)
        return reused

    outcome = _run_pipeline(root, labels_path, out, files, skipped, classes, options, secret,
                            settings_fp, site=site, workers=workers, progress=progress,
                            dry_run=False)
    rejections = outcome.rejections
    quarantine = [_quarantine_record(r, secret) for r in rejections]
    for record in quarantine:
        logger.debug("rejected file %s (%s)", record["id"], record["code"])
    reasons = dict(sorted(Counter(r.code for r in rejections).items()))

    if not outcome.images:
        try:
            remove_cache(out)
            write_quarantine(out, quarantine)
        except OSError as e:
            raise _write_failed(e, site, out) from e
        _Checkpoint(out, settings_fp).clear()
        counts = ", ".join(f"{n} {code}" for code, n in reasons.items()) or "no input files"
        raise SiteDataError(
            "no-usable-image",
            f"Site {site} has no usable image ({counts}). See the quarantine log "
            "(quarantine.jsonl in the site's cache folder) for each file, fix the "
            "inputs and run the preparation again.")

    class_counts = Counter(outcome.labels)
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
        "deidentification": "DICOM PS3.15 Annex E Basic Application Level Confidentiality "
                            "Profile" + (", Retain Patient Characteristics Option"
                                         if subgroup_fields else ""),
        "subgroup_fields": subgroup_fields,
        "reasons": reasons,
    }
    try:
        write_cache(out, outcome.images, outcome.labels, records=outcome.records,
                    quarantine=quarantine, meta=meta)
    except OSError as e:
        raise _write_failed(e, site, out) from e
    _Checkpoint(out, settings_fp).clear()
    seconds = time.perf_counter() - start
    logger.info("site %s: %d images cached, %d inputs rejected %s in %.1f s", site,
                len(outcome.images), len(rejections), reasons or "", seconds)
    return PrepareResult(cache_dir=out, accepted=len(outcome.images),
                         rejected=len(rejections), reasons=reasons, seconds=seconds,
                         resumed=outcome.resumed)


def check_site(
    dicom_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    settings: Settings,
    *,
    site_id: str = "site",
    workers: int = 1,
    progress: ProgressCallback | None = None,
    out_report: str | os.PathLike[str] | None = None,
    crop_square: bool = False,
    allowed_modalities: Sequence[str] = DEFAULT_MODALITIES,
    min_size: int = 16,
    max_size: int = 16384,
    allow_burned_in: bool = False,
    subgroup_fields: bool = False,
    file_timeout: float = 120.0,
    site_secret: str | bytes | None = None,
) -> CheckResult:
    """Run :func:`prepare_site`'s validation as a dry run: decode, check, cache nothing.

    Every file is validated, de-identified, decoded and preprocessed exactly as by
    :func:`prepare_site` (so decodability is checked), but no pixels are written.  With
    ``out_report`` a site-local ``check-report.json`` (counts by reason and one record
    per rejected input, with its local path) is written there.  ``site_secret``
    defaults to ``<out_report>/site-secret`` or, without a report folder, a throw-away
    secret (the ids then differ from run to run).  Other parameters as for
    :func:`prepare_site`.
    """
    start = time.perf_counter()
    root, site = _start(dicom_dir, site_id)
    labels_path = Path(labels_csv)
    report_dir = Path(out_report) if out_report is not None else None
    if site_secret is None and report_dir is None:
        site_secret = secrets.token_hex(32)
    secret = load_site_secret(report_dir, site_secret)
    classes = list(settings.classes)
    options = PrepareOptions.from_settings(
        settings, crop_square=crop_square, allowed_modalities=tuple(allowed_modalities),
        min_size=min_size, max_size=max_size, allow_burned_in=allow_burned_in,
        subgroup_fields=subgroup_fields, file_timeout=file_timeout)
    exclude = [labels_path] + ([report_dir] if report_dir is not None else [])
    files, skipped = _scan_folder(root, exclude=exclude)
    outcome = _run_pipeline(root, labels_path, None, files, skipped, classes, options, secret,
                            "", site=site, workers=workers, progress=progress, dry_run=True)
    reasons = dict(sorted(Counter(r.code for r in outcome.rejections).items()))
    report_path = None
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        report_path = report_dir / "check-report.json"
        report = {"site": site, "accepted": len(outcome.labels),
                  "rejected": len(outcome.rejections), "reasons": reasons,
                  "class_counts": [outcome.labels.count(i) for i in range(len(classes))],
                  "class_names": classes,
                  "quarantine": [_quarantine_record(r, secret) for r in outcome.rejections]}
        tmp = report_path.with_name(report_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, report_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_failed(e, site, report_dir) from e
    seconds = time.perf_counter() - start
    logger.info("site %s: check found %d usable images, %d inputs rejected %s in %.1f s",
                site, len(outcome.labels), len(outcome.rejections), reasons or "", seconds)
    return CheckResult(accepted=len(outcome.labels), rejected=len(outcome.rejections),
                       reasons=reasons, seconds=seconds, report=report_path)


def _quarantine_record(r: _Rejection, secret: bytes) -> dict[str, Any]:
    record: dict[str, Any] = {"id": secret_id(r.key, secret), "code": r.code,
                              "message": r.message, "local_path": r.local_path}
    if r.row is not None:
        record["labels_row"] = r.row
    if r.local_detail:
        record["local_detail"] = r.local_detail
    return record
