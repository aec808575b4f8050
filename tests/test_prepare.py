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
