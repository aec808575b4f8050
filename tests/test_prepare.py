"""Site preparation (client/prepare.py) and the local cache (common/cache.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedrad.client.prepare import PrepareResult, prepare_site
from fedrad.common.cache import (
    IMAGES_FILE,
    LABELS_FILE,
    MANIFEST_FILE,
    QUARANTINE_FILE,
    load_cache,
    read_quarantine,
    write_cache,
)
from fedrad.common.config import load_settings
from fedrad.common.errors import FedradError, SiteDataError, hashed_id

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS = DATA / "dicom-corpus"
needs_corpus = pytest.mark.skipif(not (CORPUS / "MANIFEST.csv").is_file(),
                                  reason=f"DICOM corpus not found at {CORPUS}")

SETTINGS = load_settings({"image-size": 32, "class-names": "normal,abnormal"})
GOOD = {  # file in the site -> corpus source
    "ct/CT_small.dcm": "pydicom-wheel/CT_small.dcm",
    "mr/MR_small.dcm": "pydicom-wheel/MR_small.dcm",
    "cr/mono1.dcm": "cxr-real/txv_Fake_MONOHR1.dcm",
    "us/rgb.dcm": "pydicom-wheel/ExplVR_BigEnd.dcm",
}
LABELS = (
    "file,label\n"
    "ct/CT_small.dcm,0\n"
    "mr/MR_small.dcm,abnormal\n"
    "cr/mono1.dcm,1\n"
    "us/rgb.dcm,normal\n"
    "rt/rtplan.dcm,0\n"           # no pixel data
    "notes.txt,1\n"               # not DICOM
    "ct/copy_of_ct.dcm,0\n"       # same SOP Instance UID as CT_small -> duplicate
    "gone/missing.dcm,1\n"        # not in the folder
    "mr/bad_label.dcm,7\n"        # label out of range
)                                 # mr/unlabelled.dcm has no row


def _make_site(root: Path) -> tuple[Path, Path]:
    site = root / "dicom"
    for rel, src in GOOD.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / src, site / rel)
    (site / "rt").mkdir()
    shutil.copy(CORPUS / "pydicom-wheel" / "rtplan.dcm", site / "rt" / "rtplan.dcm")
    shutil.copy(CORPUS / "pydicom-wheel" / "CT_small.dcm", site / "ct" / "copy_of_ct.dcm")
    shutil.copy(CORPUS / "pydicom-wheel" / "MR_small.dcm", site / "mr" / "bad_label.dcm")
    shutil.copy(CORPUS / "pydicom-wheel" / "MR_small.dcm", site / "mr" / "unlabelled.dcm")
    (site / "notes.txt").write_text("not an image\n")
    (site / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are not inputs
    labels = root / "labels.csv"
    labels.write_text(LABELS)
    return site, labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path,
                                                                   PrepareResult]:
    if not (CORPUS / "MANIFEST.csv").is_file():
        pytest.skip(f"DICOM corpus not found at {CORPUS}")
    root = tmp_path_factory.mktemp("site")
    site, labels = _make_site(root)
    out = root / "cache"
    calls: list[tuple[int, int]] = []
    result = prepare_site(site, labels, out, SETTINGS, site_id="hospital-a",
                          progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 7) and calls[-1] == (7, 7)  # 7 labelled files to decode
    return site, labels, out, result


@needs_corpus
def test_counts_and_reasons(prepared: tuple) -> None:
    _, _, out, result = prepared
    assert result.cache_dir == out and not result.reused
    assert result.accepted == 4
    assert result.reasons == {"bad-label": 1, "duplicate": 1, "missing-file": 1,
                              "no-pixel-data": 1, "not-dicom": 1, "unlabelled": 1}
    assert result.rejected == 6
    # Every input is accounted for: 9 files in the folder + 1 labels row naming no file.
    assert result.accepted + result.rejected == 9 + 1
    records = read_quarantine(out)
    assert sorted(r["code"] for r in records) == sorted(
        code for code, n in result.reasons.items() for _ in range(n))


@needs_corpus
def test_cache_content(prepared: tuple) -> None:
    site, _, out, _ = prepared
    cache = load_cache(out)
    assert cache.images.shape == (4, 32, 32) and cache.images.dtype == np.uint8
    assert isinstance(cache.images, np.memmap)
    assert cache.labels.dtype == np.int64
    assert cache.labels.tolist() == [1, 0, 1, 0]  # sorted paths: cr, ct, mr, us
    assert cache.images.max() == 255 and cache.images.min() == 0
    meta = cache.meta
    assert meta["class_names"] == ["normal", "abnormal"] and meta["num_classes"] == 2
    assert meta["count"] == 4 and meta["class_counts"] == [2, 2]
    assert meta["image_size"] == 32 and meta["site"] == hashed_id("hospital-a")
    assert [r["modality"] for r in meta["records"]] == ["CR", "CT", "MR", "US"]
    assert [r["photometric"] for r in meta["records"]] == [
        "MONOCHROME1", "MONOCHROME2", "MONOCHROME2", "RGB"]


@needs_corpus
def test_nothing_identifying_in_manifest(prepared: tuple) -> None:
    import pydicom

    site, _, out, _ = prepared
    text = (out / MANIFEST_FILE).read_text()
    uid = str(pydicom.dcmread(site / "ct" / "CT_small.dcm", stop_before_pixels=True)
              .SOPInstanceUID)
    for secret in (str(site), "CT_small", "mono1", uid):
        assert secret not in text
    for record in read_quarantine(out):
        assert set(record) >= {"id", "code", "message", "local_path"}
        assert str(site) not in record["message"] and str(site) not in record["id"]
    assert any(str(site) in r["local_path"] for r in read_quarantine(out))


@needs_corpus
def test_second_run_reuses_the_cache(prepared: tuple) -> None:
    site, labels, out, first = prepared
    stamp = (out / IMAGES_FILE).stat().st_mtime_ns
    again = prepare_site(site, labels, out, SETTINGS, site_id="hospital-a")
    assert again.reused
    assert (again.accepted, again.rejected, again.reasons) == (
        first.accepted, first.rejected, first.reasons)
    assert (out / IMAGES_FILE).stat().st_mtime_ns == stamp


@needs_corpus
def test_changed_settings_or_inputs_rebuild(tmp_path: Path) -> None:
    site, labels = _make_site(tmp_path)
    out = tmp_path / "cache"
    small = SETTINGS.replace(image_size=16)
    assert not prepare_site(site, labels, out, small).reused
    assert load_cache(out).images.shape[1:] == (16, 16)
    assert prepare_site(site, labels, out, small).reused
    bigger = prepare_site(site, labels, out, SETTINGS)
    assert not bigger.reused and load_cache(out).images.shape[1:] == (32, 32)
    # A new file is a new input: the cache is rebuilt and the file is counted.
    shutil.copy(CORPUS / "pydicom-wheel" / "MR_small.dcm", site / "extra.dcm")
    rebuilt = prepare_site(site, labels, out, SETTINGS)
    assert not rebuilt.reused and rebuilt.reasons["unlabelled"] == 2


@needs_corpus
def test_two_workers_give_identical_output(prepared: tuple, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    site, labels, out, first = prepared
    (tmp_path / "w2").mkdir()
    shutil.copy(out / "site-secret", tmp_path / "w2" / "site-secret")  # same hashed ids
    with caplog.at_level(logging.WARNING, logger="fedrad.client.prepare"):
        result = prepare_site(site, labels, tmp_path / "w2", SETTINGS, site_id="hospital-a",
                              workers=2)
    assert not caplog.records  # the worker pool ran (no fallback to this process)
    assert (result.accepted, result.rejected, result.reasons) == (
        first.accepted, first.rejected, first.reasons)
    one, two = load_cache(out), load_cache(tmp_path / "w2")
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.labels, two.labels)
    assert one.meta["records"] == two.meta["records"]
    assert read_quarantine(out) == read_quarantine(tmp_path / "w2")


@needs_corpus
def test_labels_by_sop_instance_uid(tmp_path: Path) -> None:
    import pydicom

    site = tmp_path / "dicom"
    site.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(CORPUS / "pydicom-wheel" / name, site / name)
    uids = {n: str(pydicom.dcmread(site / n, stop_before_pixels=True).SOPInstanceUID)
            for n in ("CT_small.dcm", "MR_small.dcm")}
    labels = tmp_path / "labels.csv"
    labels.write_text("sop_instance_uid,label\n"
                      f"{uids['CT_small.dcm']},1\n{uids['MR_small.dcm']},0\n1.2.3.4.5,1\n")
    result = prepare_site(site, labels, tmp_path / "cache", SETTINGS)
    assert (result.accepted, result.reasons) == (2, {"missing-file": 1})
    assert load_cache(tmp_path / "cache").labels.tolist() == [1, 0]


@needs_corpus
def test_site_without_usable_image(tmp_path: Path) -> None:
    site = tmp_path / "private-site-folder"
    site.mkdir()
    (site / "a.txt").write_text("hello")
    shutil.copy(CORPUS / "pydicom-wheel" / "rtplan.dcm", site / "plan.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\na.txt,0\nplan.dcm,1\nnope.dcm,0\n")
    out = tmp_path / "cache"
    with pytest.raises(SiteDataError) as info:
        prepare_site(site, labels, out, SETTINGS, site_id="hospital-b")
    err = info.value
    assert err.code == "no-usable-image"
    text = str(err)
    assert hashed_id("hospital-b") in text
    assert "1 not-dicom" in text and "1 no-pixel-data" in text and "1 missing-file" in text
    assert str(tmp_path) not in text and "private-site-folder" not in text
    assert "hospital-b" not in text
    assert len(read_quarantine(out)) == 3
    with pytest.raises(FedradError) as missing:
        load_cache(out)
    assert missing.value.code == "no-cache"


def test_labels_file_errors(tmp_path: Path) -> None:
    site = tmp_path / "dicom"
    site.mkdir()
    with pytest.raises(SiteDataError) as info:
        prepare_site(site, tmp_path / "absent.csv", tmp_path / "c", SETTINGS)
    assert info.value.code == "no-labels-file" and str(tmp_path) not in str(info.value)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\nx.dcm,1\n")
    with pytest.raises(SiteDataError) as info:
        prepare_site(site, bad, tmp_path / "c", SETTINGS)
    assert info.value.code == "bad-labels-file" and "'label'" in str(info.value)


# -------------------------------------------------------------------------- cache


def _write_small_cache(out: Path) -> None:
    images = np.linspace(0, 1, 3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    write_cache(out, images, [0, 1, 1],
                records=[{"id": str(i), "label": lab} for i, lab in enumerate([0, 1, 1])],
                quarantine=[{"id": "q", "code": "not-dicom", "message": "m",
                             "local_path": "/x"}],
                meta={"num_classes": 2, "class_names": ["a", "b"]})


def test_write_and_load_cache(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _write_small_cache(out)
    cache = load_cache(out)
    assert cache.images.dtype == np.uint8 and cache.images.shape == (3, 4, 4)
    assert cache.images[0, 0, 0] == 0 and cache.images[-1, -1, -1] == 255
    assert cache.labels.tolist() == [0, 1, 1] and len(cache) == 3
    assert cache.meta["class_counts"] == [1, 2] and cache.meta["format_version"] == 1
    assert read_quarantine(out)[0]["code"] == "not-dicom"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    with pytest.raises(ValueError, match="labels"):
        write_cache(out, np.zeros((2, 4, 4), np.uint8), [0, 1, 1], records=[{}, {}, {}],
                    quarantine=[], meta={"num_classes": 2})
    assert load_cache(out).labels.tolist() == [0, 1, 1]  # a failed write leaves the old cache
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_load_cache_errors(tmp_path: Path) -> None:
    with pytest.raises(FedradError) as info:
        load_cache(tmp_path / "nothing")
    assert info.value.code == "no-cache" and "prepare" in str(info.value)
    assert str(tmp_path) not in str(info.value)

    out = tmp_path / "cache"
    _write_small_cache(out)
    np.save(out / LABELS_FILE, np.array([0, 1], dtype=np.int64))
    with pytest.raises(FedradError) as info:
        load_cache(out)
    assert info.value.code == "bad-cache" and str(tmp_path) not in str(info.value)

    _write_small_cache(out)
    (out / IMAGES_FILE).write_bytes(b"garbage")
    with pytest.raises(FedradError) as info:
        load_cache(out)
    assert info.value.code == "bad-cache"

    _write_small_cache(out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FedradError) as info:
        load_cache(out)
    assert info.value.code == "bad-cache" and "version" in str(info.value)
    assert (out / QUARANTINE_FILE).is_file()


# ------------------------------------------------------------- validation and hardening


def _copy(src: str, dst: Path, **changes: str) -> None:
    import pydicom

    dst.parent.mkdir(parents=True, exist_ok=True)
    if not changes:
        shutil.copy(CORPUS / src, dst)
        return
    ds = pydicom.dcmread(CORPUS / src)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(dst)


@needs_corpus
def test_validation_rules(tmp_path: Path) -> None:
    site = tmp_path / "dicom"
    _copy("pydicom-wheel/MR_small.dcm", site / "ok.dcm")  # MR 64 x 64
    _copy("pydicom-wheel/CT_small.dcm", site / "big.dcm")  # CT 128 x 128
    _copy("pydicom-wheel/dicomdirtests/77654033/CR1/6154", site / "tiny.dcm")  # CR 16 x 16
    _copy("pydicom-wheel/ExplVR_BigEnd.dcm", site / "us.dcm")  # US
    _copy("pydicom-wheel/MR_small.dcm", site / "burned.dcm", BurnedInAnnotation="YES",
          SOPInstanceUID="1.2.3.4.5.6.7")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{n}.dcm,0\n" for n in
                                                ("ok", "big", "tiny", "us", "burned")))
    rules = {"allowed_modalities": ["ct", "MR", "CR"], "min_size": 50, "max_size": 100}
    result = prepare_site(site, labels, tmp_path / "c1", SETTINGS, **rules)
    assert result.accepted == 1
    assert result.reasons == {"burned-in-annotation": 1, "modality-not-allowed": 1,
                              "too-large": 1, "too-small": 1}
    for record in read_quarantine(tmp_path / "c1"):
        assert str(site) not in record["message"] and "local_path" in record
    allowed = prepare_site(site, labels, tmp_path / "c2", SETTINGS, allow_burned_in=True,
                           allowed_modalities=["*"], min_size=1)
    assert allowed.accepted == 5 and allowed.rejected == 0
    records = load_cache(tmp_path / "c2").meta["records"]
    assert [r["modality"] for r in records] == ["CT", "MR", "MR", "CR", "US"]
    assert [(r["rows"], r["cols"]) for r in records][:2] == [(128, 128), (64, 64)]
    assert records[0]["pixel_spacing"] == pytest.approx(0.661468)
    assert records[0]["transfer_syntax"] == "Explicit VR Little Endian"


@needs_corpus
def test_filesystem_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "dicom"
    _copy("pydicom-wheel/MR_small.dcm", site / "ok.dcm")
    _copy("pydicom-wheel/CT_small.dcm", site / "locked.dcm")
    (site / "empty.dcm").write_bytes(b"")
    (site / "text.dcm").write_text("this is not DICOM\n")
    (site / "folder.dcm").mkdir()
    outside = tmp_path / "elsewhere.dcm"
    shutil.copy(CORPUS / "pydicom-wheel" / "CT_small.dcm", outside)
    (site / "link_out.dcm").symlink_to(outside)
    (site / "link_in.dcm").symlink_to(site / "ok.dcm")
    (site / "dangling.dcm").symlink_to(tmp_path / "nothing.dcm")
    (site / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    names = ("ok", "locked", "empty", "text", "folder", "link_out", "link_in", "dangling")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{n}.dcm,0\n" for n in names))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False
                        if Path(p).name == "locked.dcm" else real_access(p, mode, *a, **k))
    (site / "closed").mkdir()
    real_scandir = os.scandir

    def scandir(path: object = ".") -> object:  # tests run as root: simulate a closed folder
        if isinstance(path, (str, os.PathLike)) and Path(path).name == "closed":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = prepare_site(site, labels, tmp_path / "cache", SETTINGS)
    by_name = {Path(r["local_path"]).name: r for r in read_quarantine(tmp_path / "cache")}
    assert {n: r["code"] for n, r in by_name.items()} == {
        "locked.dcm": "unreadable", "empty.dcm": "empty-file", "text.dcm": "not-dicom",
        "folder.dcm": "not-a-file", "link_out.dcm": "outside-folder",
        "dangling.dcm": "broken-link", "linked_dir": "outside-folder",
        "ok.dcm": "duplicate",  # link_in.dcm (a link inside the folder) sorts first
        "closed": "unreadable"}
    assert result.accepted == 1
    for record in by_name.values():
        assert str(tmp_path) not in record["message"] and record["message"].endswith(".")


@needs_corpus
def test_disk_full_keeps_the_previous_cache(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from fedrad.common import cache as cache_module

    site, labels = _make_site(tmp_path)
    out = tmp_path / "cache"
    first = prepare_site(site, labels, out, SETTINGS)
    before = (out / IMAGES_FILE).read_bytes(), (out / MANIFEST_FILE).read_text()
    shutil.copy(CORPUS / "pydicom-wheel" / "MR_small.dcm", site / "new.dcm")  # forces a rebuild

    def full_disk(images: object, tmp: Path) -> tuple[int, int, int]:
        tmp.write_bytes(b"\x93NUMPY half written")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(cache_module, "_stack_uint8", full_disk)
    with pytest.raises(SiteDataError) as info:
        prepare_site(site, labels, out, SETTINGS)
    err = info.value
    assert err.code == "disk-full" and "disk" in str(err) and "full" in str(err)
    assert str(tmp_path) not in str(err) and str(out) in (err.local_detail or "")
    assert ((out / IMAGES_FILE).read_bytes(), (out / MANIFEST_FILE).read_text()) == before
    assert len(load_cache(out)) == first.accepted
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    monkeypatch.undo()
    again = prepare_site(site, labels, out, SETTINGS)
    assert again.resumed == 7 and again.reasons["unlabelled"] == 2  # decoded work was kept
    assert not (out / ".partial").exists()


@needs_corpus
def test_interrupted_prepare_resumes_to_the_same_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedrad.client import prepare as prepare_module

    site, labels = _make_site(tmp_path)
    full = prepare_site(site, labels, tmp_path / "full", SETTINGS, site_secret="s3cret")
    out = tmp_path / "resumed"
    real = prepare_module._process_one
    calls: list[str] = []

    def interrupt_after_three(job: tuple) -> tuple:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(prepare_module, "_process_one", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_site(site, labels, out, SETTINGS, site_secret="s3cret")
    assert not (out / MANIFEST_FILE).exists()
    assert len(list((out / ".partial").glob("*.json"))) == 3

    def counting(job: tuple) -> tuple:
        calls.append(job[0])
        return real(job)

    calls.clear()
    monkeypatch.setattr(prepare_module, "_process_one", counting)
    resumed = prepare_site(site, labels, out, SETTINGS, site_secret="s3cret")
    assert resumed.resumed == 3 and len(calls) == 7 - 3
    assert (resumed.accepted, resumed.reasons) == (full.accepted, full.reasons)
    for name in (IMAGES_FILE, LABELS_FILE):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert load_cache(out).meta["records"] == load_cache(tmp_path / "full").meta["records"]
    assert read_quarantine(out) == read_quarantine(tmp_path / "full")
    assert not (out / ".partial").exists()


@needs_corpus
def test_check_site_is_a_dry_run(prepared: tuple, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedrad.cli import app
    from fedrad.client.prepare import check_site

    site, labels, _, first = prepared
    report_dir = tmp_path / "report"
    result = check_site(site, labels, SETTINGS, out_report=report_dir)
    assert (result.accepted, result.rejected, result.reasons) == (
        first.accepted, first.rejected, first.reasons)
    assert sorted(p.name for p in report_dir.iterdir()) == ["check-report.json",
                                                           "site-secret"]
    report = json.loads((report_dir / "check-report.json").read_text())
    assert report["reasons"] == first.reasons and report["accepted"] == 4
    assert len(report["quarantine"]) == first.rejected
    cli = CliRunner().invoke(app, ["site", "check", "--dicom-dir", str(site), "--labels",
                                   str(labels), "--set", "image-size=32", "--set",
                                   "class-names=normal,abnormal"])
    assert cli.exit_code == 0, cli.output
    assert "4 images usable, 6 would be quarantined" in cli.output
    assert "duplicate: 1" in cli.output


def test_a_file_over_the_time_limit_is_stopped() -> None:
    import time

    from fedrad.client.prepare import _run_jobs

    results: dict[int, object] = {}
    start = time.monotonic()
    _run_jobs([0.01, 600.0, 0.01, 0.01, 0.01], range(5), 2, 3.0,
              lambda i, r: results.__setitem__(i, r), func=time.sleep)
    assert time.monotonic() - start < 60
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert results[1][:2] == ("error", "timeout")
    assert all(results[i] is None for i in (0, 2, 3, 4))  # the others still ran


def _rewrite_keeping_size_and_mtime(path: Path) -> None:
    """Turn the image of an uncompressed 16-bit file by 180 degrees in place: same size,
    same inode, and the old modification time put back (as ``cp -p`` would)."""
    import pydicom

    st = path.stat()
    element = pydicom.dcmread(path, defer_size=256).get_item("PixelData", keep_deferred=True)
    start, length = element.value_tell, element.length
    data = bytearray(path.read_bytes())
    data[start:start + length] = np.frombuffer(bytes(data[start:start + length]),
                                               "<u2")[::-1].tobytes()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns,
                                                                 st.st_ino)


def _cached_image(out: Path, rel: str, secret: str) -> np.ndarray:
    from fedrad.client.deid import secret_id

    cache = load_cache(out)
    index = [r["id"] for r in cache.meta["records"]].index(secret_id(rel, secret.encode()))
    return np.array(cache.images[index])


@needs_corpus
def test_a_file_rewritten_with_its_old_mtime_is_prepared_again(tmp_path: Path) -> None:
    site, labels = _make_site(tmp_path)
    out = tmp_path / "cache"
    prepare_site(site, labels, out, SETTINGS, site_secret="s3cret")
    before = _cached_image(out, "mr/MR_small.dcm", "s3cret")
    assert prepare_site(site, labels, out, SETTINGS, site_secret="s3cret").reused
    _rewrite_keeping_size_and_mtime(site / "mr" / "MR_small.dcm")
    again = prepare_site(site, labels, out, SETTINGS, site_secret="s3cret")
    assert not again.reused
    after = _cached_image(out, "mr/MR_small.dcm", "s3cret")
    assert not np.array_equal(before, after)
    fresh = prepare_site(site, labels, tmp_path / "fresh", SETTINGS, site_secret="s3cret")
    assert (again.accepted, again.reasons) == (fresh.accepted, fresh.reasons)
    assert np.array_equal(after, _cached_image(tmp_path / "fresh", "mr/MR_small.dcm",
                                               "s3cret"))


@needs_corpus
def test_resume_redoes_a_file_changed_since_its_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedrad.client import prepare as prepare_module

    site, labels = _make_site(tmp_path)
    out = tmp_path / "resumed"
    real = prepare_module._process_one
    calls: list[str] = []

    def interrupt_after_three(job: tuple) -> tuple:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(Path(job[0]).relative_to(site).as_posix())
        return real(job)

    monkeypatch.setattr(prepare_module, "_process_one", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_site(site, labels, out, SETTINGS, site_secret="s3cret")
    done = list(calls)
    assert "ct/CT_small.dcm" in done
    _rewrite_keeping_size_and_mtime(site / "ct" / "CT_small.dcm")

    def counting(job: tuple) -> tuple:
        calls.append(Path(job[0]).relative_to(site).as_posix())
        return real(job)

    calls.clear()
    monkeypatch.setattr(prepare_module, "_process_one", counting)
    resumed = prepare_site(site, labels, out, SETTINGS, site_secret="s3cret")
    assert resumed.resumed == 2 and "ct/CT_small.dcm" in calls
    assert not set(calls) & (set(done) - {"ct/CT_small.dcm"})  # the others are not redone
    monkeypatch.undo()
    fresh = prepare_site(site, labels, tmp_path / "fresh", SETTINGS, site_secret="s3cret")
    assert (resumed.accepted, resumed.reasons) == (fresh.accepted, fresh.reasons)
    for name in (IMAGES_FILE, LABELS_FILE):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
