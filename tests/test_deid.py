"""De-identification (client/deid.py) and the proof that nothing planted reaches the cache,
the logs or what the ClientApp sends."""

from __future__ import annotations

import json
import logging
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from fedrad.client.deid import (
    BASIC_PROFILE,
    SECRET_FILE,
    age_band,
    deidentify,
    describe,
    load_site_secret,
    remap_uid,
    secret_id,
)
from fedrad.common.cache import QUARANTINE_FILE, load_cache

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-corpus"
needs_corpus = pytest.mark.skipif(not (CORPUS / "MANIFEST.csv").is_file(),
                                  reason=f"DICOM corpus not found at {CORPUS}")

UID_ROOT = "1.2.826.0.1.3680043.99.4242"
PLANTED = {
    "PatientName": "Zyxwvut^Qwertyanna",
    "PatientID": "PID98765ZQX",
    "PatientBirthDate": "19370411",
    "StudyDate": "20190317",
    "AccessionNumber": "ACC77341QX",
    "InstitutionName": "St Plantedwood Memorial Hospital",
    "ReferringPhysicianName": "Drplanted^Referrer",
    "StudyDescription": "Chest pain follow-up for Mrs Plantedsurname",
    "StudyInstanceUID": UID_ROOT + ".1",
    "SeriesInstanceUID": UID_ROOT + ".2",
}
PRIVATE_VALUE = "Privatename^Hiddenperson"
SECRETS = [*PLANTED.values(), PRIVATE_VALUE, UID_ROOT, "Zyxwvut", "Plantedwood",
           "Plantedsurname", "PID98765ZQX"]


def test_profile_table_uses_known_keywords() -> None:
    from pydicom.datadict import tag_for_keyword

    unknown = [k for k in BASIC_PROFILE if tag_for_keyword(k) is None]
    assert not unknown
    assert set(BASIC_PROFILE.values()) <= {"X", "Z", "D", "U"}
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate",
                    "AccessionNumber", "InstitutionName", "ReferringPhysicianName",
                    "StudyDescription", "DeviceSerialNumber", "SOPInstanceUID"):
        assert keyword in BASIC_PROFILE


def test_remap_uid_is_consistent_and_keyed() -> None:
    a = remap_uid("1.2.3.4", b"secret-a")
    assert a == remap_uid("1.2.3.4", b"secret-a")
    assert a != remap_uid("1.2.3.5", b"secret-a")
    assert a != remap_uid("1.2.3.4", b"secret-b")
    assert a.startswith("2.25.") and a[5:].isdigit() and len(a) <= 64
    assert int(a[5:]) < 2**128
    assert secret_id("x/y.dcm", b"k") != secret_id("x/y.dcm", b"other")


def test_site_secret_file(tmp_path: Path) -> None:
    first = load_site_secret(tmp_path / "cache")
    path = tmp_path / "cache" / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 64 and load_site_secret(tmp_path / "cache") == first
    assert load_site_secret(None, "given") == b"given"
    with pytest.raises(ValueError):
        load_site_secret(None)


def test_age_band() -> None:
    assert age_band("047Y") == "40-49" and age_band("003M") == "0-9"
    assert age_band("095Y") == "90+" and age_band("bad") is None and age_band(None) is None


def _planted_dataset(src: Path, sop_uid: str) -> object:
    import pydicom

    ds = pydicom.dcmread(src)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.PatientSex = "F"
    ds.PatientAge = "047Y"
    ds.DeviceSerialNumber = "SERIAL-PLANTED-1"
    block = ds.private_block(0x0099, "PLANTEDCO", create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)
    return ds


@needs_corpus
def test_deidentify_removes_planted_values() -> None:
    ds = _planted_dataset(CORPUS / "pydicom-wheel" / "CT_small.dcm", UID_ROOT + ".3")
    deidentify(ds, b"k")
    text = repr(ds) + repr(ds.file_meta)
    for value in [*SECRETS, "SERIAL-PLANTED-1", "047Y"]:
        assert value not in text, value
    assert str(ds.SOPInstanceUID) == remap_uid(UID_ROOT + ".3", b"k")
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert str(ds.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.2"  # a standard UID is kept
    assert ds.Modality == "CT" and ds.PatientIdentityRemoved == "YES"
    assert not any(elem.tag.is_private for elem in ds)
    assert "sex" not in describe(ds)


@needs_corpus
def test_retain_patient_characteristics() -> None:
    ds = _planted_dataset(CORPUS / "pydicom-wheel" / "CT_small.dcm", UID_ROOT + ".3")
    deidentify(ds, b"k", retain_patient_characteristics=True)
    fields = describe(ds, subgroups=True)
    assert fields["sex"] == "F" and fields["age_band"] == "40-49"
    assert "PatientName" not in ds or not ds.PatientName


# ------------------------------------------------------------- the end-to-end proof


@pytest.fixture()
def planted_site(tmp_path: Path) -> tuple[Path, Path]:
    if not (CORPUS / "MANIFEST.csv").is_file():
        pytest.skip(f"DICOM corpus not found at {CORPUS}")
    site = tmp_path / "dicom"
    site.mkdir()
    rows = ["file,label"]
    sources = ["CT_small.dcm", "MR_small.dcm"]
    for i in range(10):
        ds = _planted_dataset(CORPUS / "pydicom-wheel" / sources[i % 2], f"{UID_ROOT}.9.{i}")
        ds.save_as(site / f"img{i}.dcm")
        rows.append(f"img{i}.dcm,{i % 2}")
    # Two rejected inputs carrying the same identifiers: burned-in text, and a duplicate.
    burned = _planted_dataset(CORPUS / "pydicom-wheel" / "CT_small.dcm", f"{UID_ROOT}.8")
    burned.BurnedInAnnotation = "YES"
    burned.save_as(site / "burned.dcm")
    shutil.copy(site / "img0.dcm", site / "copy.dcm")
    rows += ["burned.dcm,0", "copy.dcm,0", "absent.dcm,1"]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    planted = (site / "img0.dcm").read_bytes()
    assert all(value.encode() in planted for value in SECRETS)  # the planting worked
    return site, labels


def _assert_clean(text: str, where: str) -> None:
    for value in SECRETS:
        assert value not in text, f"{value!r} found in {where}"


@needs_corpus
def test_nothing_planted_reaches_cache_logs_or_replies(
        planted_site: tuple[Path, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import ArrayRecord

    from fedrad.client.client_app import SiteContext, evaluate_on_site, train_on_site
    from fedrad.client.prepare import prepare_site
    from fedrad.common.config import load_settings
    from fedrad.common.models import model_from_settings

    site, labels = planted_site
    out = tmp_path / "cache"
    settings = load_settings({"image-size": 32, "model": "resnet18", "batch-size": 4,
                              "val-fraction": 0.3})
    with caplog.at_level(logging.DEBUG):
        result = prepare_site(site, labels, out, settings, site_id="hospital-z",
                              subgroup_fields=True)
        assert result.accepted == 10
        assert result.reasons == {"burned-in-annotation": 1, "duplicate": 1,
                                  "missing-file": 1}
        cache = load_cache(out)
        arrays = ArrayRecord(model_from_settings(settings).state_dict())
        ctx = SiteContext("hospital-z", out)
        new_arrays, train_metrics = train_on_site(arrays, settings, ctx, server_round=1)
        eval_metrics = evaluate_on_site(new_arrays, settings, ctx)
    assert caplog.records  # the capture worked
    for record in caplog.records:
        _assert_clean(record.getMessage(), f"log record {record.name}")
    _assert_clean(repr(train_metrics) + repr(eval_metrics), "the ClientApp's metrics")
    assert train_metrics["num-examples"] + eval_metrics["num-examples"] == 10

    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"images.npy", "labels.npy", "manifest.json",
                                       QUARANTINE_FILE, SECRET_FILE}
    for path in files:
        data = path.read_bytes()
        if path.name == QUARANTINE_FILE:
            for line in data.decode().splitlines():
                record = json.loads(line)
                assert str(site) in record.pop("local_path") or record["code"] == \
                    "missing-file"
                _assert_clean(json.dumps(record), f"a quarantine record {record['code']}")
            continue
        for value in SECRETS:
            assert value.encode() not in data, f"{value!r} found in {path.name}"
    records = cache.meta["records"]
    assert {r["sex"] for r in records} == {"F"} and {r["age_band"] for r in records} == \
        {"40-49"}
    assert all(r["manufacturer"] for r in records)
    assert len({r["id"] for r in records}) == 10
    assert np.asarray(cache.images).max() > 0
