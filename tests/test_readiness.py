"""Site readiness report (client/readiness.py): aggregates only, small cells suppressed."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest

from fedrad.client.prepare import prepare_site
from fedrad.client.readiness import (
    OTHER,
    REASON_EXPLANATIONS,
    SUMMARY_JSON,
    bar_chart_svg,
    build_readiness,
    compare_summaries,
    readiness_text,
    shareable_summary,
    write_readiness,
    write_shareable_summary,
)
from fedrad.common.cache import read_manifest, read_quarantine
from fedrad.common.config import load_settings
from fedrad.simulations.synthetic import generate_synthetic_federation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS = DATA / "dicom-corpus"

SETTINGS = load_settings({"image-size": 32, "class-names": "normal,opacity"})
CORPUS_FILES = {  # file in the site -> corpus source; each a category of one
    "corpus/ct-scan-7f3a9.dcm": "pydicom-wheel/CT_small.dcm",
    "corpus/cr-mono1-b81c2.dcm": "cxr-real/txv_Fake_MONOHR1.dcm",
    "corpus/rtplan-55d0e.dcm": "pydicom-wheel/rtplan.dcm",
    "corpus/ct-copy-0c4e1.dcm": "pydicom-wheel/CT_small.dcm",
}


def _records(n: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"id": f"rec{i:04d}", "label": i % 2, **fields} for i in range(n)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A prepared site: 12 synthetic 64 px radiographs, corpus files and broken inputs."""
    if not (CORPUS / "MANIFEST.csv").is_file():
        pytest.skip(f"DICOM corpus not found at {CORPUS}")
    root = tmp_path_factory.mktemp("readiness")
    fed = generate_synthetic_federation(root / "fed", num_sites=1, images_per_site=12,
                                        test_images=0, image_size=64, workers=1)
    synth = fed.sites[0]
    dicom = root / "site" / "dicom"
    shutil.copytree(synth.dicom_dir, dicom / "synth")
    rows = ["file,label"]
    for line in synth.labels_csv.read_text().splitlines()[1:]:
        name, label = line.split(",")
        rows.append(f"synth/{name},{label}")
    for rel, src in CORPUS_FILES.items():
        (dicom / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / src, dicom / rel)
        rows.append(f"{rel},1")
    (dicom / "corpus" / "secret-notes-91ab.txt").write_text("Patient DOE^JANE\n")
    rows.append("corpus/secret-notes-91ab.txt,0")
    rows.append("corpus/gone-file-3e2d.dcm,1")  # missing-file
    labels = root / "site" / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    out = root / "site" / "cache"
    prepare_site(dicom, labels, out, SETTINGS, site_id="st-elsewhere-hospital")

    secrets: set[str] = {"st-elsewhere-hospital", "DOE^JANE"}
    for path in dicom.rglob("*"):
        if not path.is_file():
            continue
        secrets.add(path.name)
        secrets.add(str(path.relative_to(dicom)))
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                        "PatientName", "PatientID", "AccessionNumber"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 4:
                secrets.add(value)
    manifest = read_manifest(out)
    quarantine = read_quarantine(out)
    for record in manifest["records"] + quarantine:
        for key in ("id", "local_path", "local_detail"):
            if record.get(key):
                secrets.add(str(record[key]))
    return {"out": out, "manifest": manifest, "quarantine": quarantine, "secrets": secrets}


def _all_cells(report: dict[str, Any]) -> list[dict[str, Any]]:
    cells = list(report["rejected_by_reason"]) + list(report["labels"])
    for dist in report["distributions"].values():
        cells += dist
    return cells


def test_counts_match_manifest_and_quarantine(site: dict[str, Any]) -> None:
    exact = build_readiness(site["out"], min_cell=1)
    manifest, quarantine = site["manifest"], site["quarantine"]
    assert exact["totals"] == {"accepted": manifest["count"], "rejected": len(quarantine),
                               "inputs": manifest["count"] + len(quarantine)}
    assert {c["name"]: c["count"] for c in exact["rejected_by_reason"]} == \
        dict(Counter(q["code"] for q in quarantine))
    assert [c["count"] for c in exact["labels"]] == manifest["class_counts"]
    modalities = {c["name"]: c["count"] for c in exact["distributions"]["modality"]}
    assert modalities == dict(Counter(str(r["modality"]).upper() for r in manifest["records"]))
    assert sum(modalities.values()) == manifest["count"]
    assert {"not-dicom", "no-pixel-data", "missing-file", "duplicate"} <= set(
        c["name"] for c in exact["rejected_by_reason"])


def test_small_cells_are_suppressed(site: dict[str, Any]) -> None:
    report = build_readiness(site["out"])
    for cell in _all_cells(report):
        assert cell["count"] is None or cell["count"] == 0 or cell["count"] >= 5, cell
        if cell["count"] is None:
            assert cell["display"] in ("<5", "suppressed")
    modality_names = [c["name"] for c in report["distributions"]["modality"]]
    assert "CT" not in modality_names and "CR" not in modality_names  # one image each
    assert OTHER in modality_names
    # The single duplicate and the single missing file keep their reason name, not count.
    reasons = {c["name"]: c for c in report["rejected_by_reason"]}
    assert reasons["duplicate"]["count"] is None
    assert reasons["duplicate"]["explanation"] == REASON_EXPLANATIONS["duplicate"]
    assert readiness_text(report).startswith(f"readiness: {site['manifest']['count']} images")


def test_nothing_identifying_in_files(site: dict[str, Any], tmp_path: Path) -> None:
    report = build_readiness(site["out"])
    paths = write_readiness(report, tmp_path)
    summary_path = write_shareable_summary(report, tmp_path)
    assert [p.name for p in paths] == ["readiness.json", "readiness.html", "readiness.md"]
    assert summary_path.name == SUMMARY_JSON
    assert json.loads(paths[0].read_text()) == report
    texts = {p.name: p.read_text(encoding="utf-8") for p in (*paths, summary_path)}
    assert len(site["secrets"]) > 20
    for name, text in texts.items():
        for secret in site["secrets"]:
            assert secret not in text, f"{secret!r} appears in {name}"
    page = texts["readiness.html"]
    assert page.count("<svg") == 2 + 9  # reasons, labels, nine distributions
    assert "://" not in page
    assert not re.search(r"<(script|link|img|iframe)\b", page, re.IGNORECASE)
    assert "what it means" in page and REASON_EXPLANATIONS["not-dicom"] in page


def test_open_vocabulary_merges_rare_values() -> None:
    records = _records(30, modality="DX", manufacturer="Acme Radiography", model="DR 3000",
                       photometric="MONOCHROME2", bits_stored=12, rows=2048, cols=2048,
                       pixel_spacing=[0.143, 0.143], frames=1,
                       transfer_syntax="1.2.840.10008.1.2.4.90")
    records += _records(1, modality="CR", manufacturer="Rare Vendor Inc", model="Odd-1",
                        rows=512, cols=400, transfer_syntax="1.2.3.4.99999.1")
    records += _records(6)  # no metadata at all: "unknown"
    report = build_readiness((records, [{"id": "x", "code": "not-dicom"}] * 7,
                              {"class_names": ["normal", "opacity"], "image_size": 64}))
    text = json.dumps(report)
    for rare in ("Rare Vendor Inc", "Odd-1", "CR", "512-1023", "1.2.3.4.99999.1",
                 "1.2.840.10008.1.2.4.90", "rec0"):
        assert rare not in text
    dists = report["distributions"]
    assert {c["name"]: c["display"] for c in dists["manufacturer"]} == {
        "Acme Radiography": "30", "unknown": "6", OTHER: "<5"}
    assert dists["image_size"][0] == {"name": "2048-3071 x 2048-3071", "count": 30,
                                      "display": "30"}
    assert dists["pixel_spacing"][0]["name"] == "0.1-0.15 mm"
    assert dists["transfer_syntax"][0]["name"] == "JPEG 2000 Image Compression (Lossless Only)"
    assert dists["bits_stored"][0]["name"] == "12 bits"
    assert report["rejected_by_reason"] == [{"name": "not-dicom", "count": 7, "display": "7",
                                             "explanation": REASON_EXPLANATIONS["not-dicom"]}]


def test_single_hidden_class_gets_a_second_cell_hidden() -> None:
    records = [{"label": 0}] * 40 + [{"label": 1}] * 2 + [{"label": 2}] * 9
    report = build_readiness((records, [], {"class_names": ["a", "b", "c"]}))
    cells = {c["name"]: c for c in report["labels"]}
    assert cells["b"]["display"] == "<5" and cells["b"]["fraction"] is None
    assert cells["c"]["count"] is None and cells["c"]["display"] == "suppressed"
    assert cells["a"]["count"] == 40 and cells["a"]["fraction"] == pytest.approx(40 / 51,
                                                                                 abs=1e-4)


def test_compare_summaries_flags_mismatches() -> None:
    meta = {"class_names": ["normal", "opacity"], "settings_fingerprint": "f1"}
    big = _records(40, modality="DX", rows=2048, cols=2048)
    small = [{**r, "label": 0} for r in _records(30, modality="DX", rows=256, cols=256)]
    a = shareable_summary(build_readiness((big, [], {**meta, "image_size": 64, "site": "aaa"})))
    b = shareable_summary(build_readiness((small, [], {**meta, "image_size": 32,
                                                       "site": "bbb"})))
    warnings = compare_summaries([a, b])
    joined = "\n".join(warnings)
    assert "Prepared image sizes differ" in joined and "site aaa: 64" in joined
    assert "most common source image size differs" in joined
    assert "site bbb has no image of class 'opacity'" in joined
    assert "Prevalence of class 'normal' differs widely" in joined
    assert compare_summaries([a, dict(a)]) == []
    assert "vendor" not in json.dumps(a).lower()


def test_bar_chart_svg_marks_suppressed_cells() -> None:
    svg = bar_chart_svg([{"name": "DX", "count": 30, "display": "30"},
                         {"name": OTHER, "count": None, "display": "<5"}], title="Modality")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "stroke-dasharray" in svg and "&lt;5" in svg and ">DX<" in svg


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_cell"):
        build_readiness(([], [], {}), min_cell=0)
    with pytest.raises(FileNotFoundError, match="fedrad site prepare"):
        build_readiness(Path("/nonexistent/cache-folder"))
