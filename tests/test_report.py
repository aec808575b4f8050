"""The researcher's report: every picture and table of ``report.html``, checked against
an independent computation (scikit-learn) on the same predictions."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from fedrad.common.cache import load_cache, write_cache
from fedrad.common.config import load_settings
from fedrad.common.errors import FedradError
from fedrad.common.metrics import auc_resolution, count_outcomes, pooled_metrics
from fedrad.common.models import model_from_settings
from fedrad.common.splits import train_val_split
from fedrad.common.training import predict_scores
from fedrad.server.evaluator import MetricsLog
from fedrad.simulations.report import PERTURBATIONS, perturb, write_report

SIZE = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("results", "curves", "roc", "confusion", "sites", "modality", "errors",
            "subgroups", "robustness", "heatmaps")


def _write_cache(path: Path, n: int, num_classes: int, *, seed: int,
                 modalities: tuple[str, ...] = ("DX",), subgroups: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 110, (n, SIZE, SIZE)).astype(np.uint8)
    for k in range(1, num_classes):  # class k: a bright square at its own place
        images[labels == k, 4 * k:4 * k + 12, 4 * k:4 * k + 12] += 120
    records = []
    for i, label in enumerate(labels):
        record = {"id": f"img{i}", "label": int(label),
                  "modality": modalities[i % len(modalities)], "photometric": "MONOCHROME2"}
        if subgroups:
            record.update(sex="FM"[i % 2], age_band=("40-49", "60-69", None)[i % 3])
        records.append(record)
    write_cache(path, images, labels, records=records, quarantine=[],
                meta={"num_classes": num_classes})
    return path


def _history(out: Path, classes: list[str], rounds: int, seed: int) -> Path:
    """A metrics.json like the server's: pooled and central rows per round."""
    rng = np.random.default_rng(seed)
    log = MetricsLog(out, classes)
    for r in range(1, rounds + 1):
        for scope in ("pooled", "central"):
            labels = rng.integers(0, len(classes), 60)
            scores = rng.dirichlet(np.ones(len(classes)), 60)
            scores[np.arange(60), labels] += 0.15 * r
            scores /= scores.sum(axis=1, keepdims=True)
            log.record(r, scope, pooled_metrics(count_outcomes(scores, labels), classes))
    log.write()
    return out


def _model(settings, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_from_settings(settings)
    head = model.fc if hasattr(model, "fc") else model.heads.head
    torch.nn.init.normal_(head.weight, std=4.0 / head.in_features ** 0.5)  # scores spread
    return model.eval()


def _run(root: Path, *, model: str, classes: str, modalities: tuple[str, ...],
         subgroups: bool) -> dict:
    names = classes.split(",")
    settings = load_settings({"model": model, "image-size": SIZE, "num-classes": len(names),
                              "class-names": classes, "val-fraction": 0.3, "stem": "standard",
                              "num-server-rounds": 3})
    central = _write_cache(root / "central", 24, len(names), seed=1, modalities=modalities,
                           subgroups=subgroups)
    sites = {f"site-{i}": _write_cache(root / f"site-{i}", 20, len(names), seed=10 + i)
             for i in (1, 2)}
    models = {"fedavg": _model(settings, 0), "local:site-1": _model(settings, 1)}
    history = _history(root / "fedavg", names, 3, seed=2)
    rows = [{"name": "fedavg", "kind": "federated", "seconds": 1.5, "auc": 0.61,
             "auc-ci-low": 0.5, "auc-ci-high": 0.7, "accuracy": 0.55},
            {"name": "local:site-1", "kind": "baseline", "seconds": 0.7, "auc": 0.52}]
    out = root / "out"
    report = write_report(out, title="tiny experiment", settings=settings, models=models,
                          central_dir=central, site_dirs=sites,
                          histories={"fedavg": history}, rows=rows, device="cpu",
                          heatmaps_per_class=2)
    return {"report": report, "out": out, "settings": settings, "models": models,
            "central": central, "sites": sites, "history": history, "rows": rows,
            "tables": json.loads((out / "report.json").read_text())}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the CPU is shared, and these models are tiny."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> dict:
    """A two-class report: ResNet-18 models, two header modalities, no subgroup fields."""
    return _run(tmp_path_factory.mktemp("binary"), model="resnet18", classes="normal,opacity",
                modalities=("DX", "CR"), subgroups=False)


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory) -> dict:
    """A three-class MedNIST-named report: ViT-tiny, modality by class, sex and age band."""
    return _run(tmp_path_factory.mktemp("multi"), model="vit_tiny",
                classes="AbdomenCT,CXR,Hand", modalities=("DX",), subgroups=True)


def _pngs(run: dict) -> list[Path]:
    out = run["out"]
    names = ["curves.png", "robustness.png"]
    if run["settings"].num_classes == 2:
        names.append("roc.png")
    for stem in ("fedavg", "local-site-1"):
        names += [f"roc-{stem}.png", f"confusion-{stem}.png", f"heatmaps-{stem}.png"]
    return [out / n for n in names]


def _scores(run: dict, name: str, images: np.ndarray) -> np.ndarray:
    return predict_scores(run["models"][name], images, device="cpu")


def _expected(y: np.ndarray, s: np.ndarray, num_classes: int) -> dict[str, float]:
    """accuracy, sensitivity, specificity, F1, exact AUC by scikit-learn (macro over the
    classes present for more than two classes), and ``auc_tol``: how far the report's AUC
    from 1000-bin score histograms may be from the exact one (half the share of
    positive-negative pairs in the same bin)."""
    p = s.argmax(axis=1)
    hist = count_outcomes(s, y)
    if num_classes == 2:
        both = len(set(y.tolist())) == 2
        return {"accuracy": accuracy_score(y, p),
                "sensitivity": recall_score(y, p, pos_label=1, zero_division=np.nan),
                "specificity": recall_score(y, p, pos_label=0, zero_division=np.nan),
                "f1": f1_score(y, p, pos_label=1, zero_division=np.nan),
                "auc": roc_auc_score(y, s[:, 1]) if both else math.nan,
                "auc_tol": auc_resolution(hist.pos_hist[1], hist.neg_hist[1]) + 1e-12}
    present = sorted(set(y.tolist()))
    spec, aucs, tols = [], [], []
    for k in present:
        neg = y != k
        if neg.any():
            spec.append(float(np.sum(neg & (p != k)) / neg.sum()))
            aucs.append(roc_auc_score(y == k, s[:, k]))
            tols.append(auc_resolution(hist.pos_hist[k], hist.neg_hist[k]))
    return {"accuracy": accuracy_score(y, p),
            "sensitivity": recall_score(y, p, labels=present, average="macro"),
            "specificity": float(np.mean(spec)) if spec else math.nan,
            "f1": f1_score(y, p, labels=present, average="macro"),
            "auc": float(np.mean(aucs)) if aucs else math.nan,
            "auc_tol": (float(np.mean(tols)) if tols else 0.0) + 1e-12}


def _close(got, want: float, tol: float = 1e-9) -> bool:
    if want is None or (isinstance(want, float) and math.isnan(want)):
        return got is None
    return got is not None and abs(got - want) <= tol


@pytest.mark.parametrize("which", ["binary", "multiclass"])
def test_every_png_is_written_and_valid(which, request):
    run = request.getfixturevalue(which)
    for path in _pngs(run):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, path.name
        assert len(data) > 5000, path.name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert min(im.size) > 200, (path.name, im.size)
            # not a blank canvas: the picture has many distinct colours
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 20, path.name


@pytest.mark.parametrize("which", ["binary", "multiclass"])
def test_html_is_self_contained_with_every_section(which, request):
    run = request.getfixturevalue(which)
    text = run["report"].read_text(encoding="utf-8")
    assert run["report"].name == "report.html"
    for section in SECTIONS:
        assert f'id="{section}"' in text, section
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == len(_pngs(run))
    for payload in embedded:
        import base64

        assert base64.b64decode(payload)[:8] == PNG_MAGIC
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "http:" not in rest and "https:" not in rest and "//" not in rest
    assert "<script" not in rest and "<link" not in rest and "@import" not in rest
    assert "src=" not in rest.replace('src=""', "")  # every image is embedded
    assert "tiny experiment" in text and "local:site-1" in text


def test_central_and_per_modality_tables_match_sklearn(binary, multiclass):
    for run in (binary, multiclass):
        s = run["settings"]
        cache = load_cache(run["central"])
        y = np.asarray(cache.labels)
        tables = run["tables"]
        for name in run["models"]:
            scores = _scores(run, name, np.asarray(cache.images))
            want = _expected(y, scores, s.num_classes)
            central = tables["central"][name]
            auc_key = "auc" if s.num_classes == 2 else "macro-auc"
            assert central["n"] == len(y)
            assert central["accuracy"] == pytest.approx(want["accuracy"])
            assert abs(central[auc_key] - want["auc"]) <= want["auc_tol"]
            if s.num_classes == 2:
                modality = np.asarray([r["modality"] for r in cache.meta["records"]])
            else:  # MedNIST classes: the modality follows the class
                modality = np.asarray(["CT", "X-ray", "X-ray"])[y]
            rows = [r for r in tables["per_modality"] if r["model"] == name]
            assert sorted(r["modality"] for r in rows) == sorted(set(modality.tolist()))
            for row in rows:
                keep = modality == row["modality"]
                want = _expected(y[keep], scores[keep], s.num_classes)
                assert row["n"] == int(keep.sum())
                for key in ("accuracy", "sensitivity", "specificity", "f1"):
                    assert _close(row[key], want[key]), (name, row["modality"], key)
                assert _close(row["auc"], want["auc"], want["auc_tol"])


def test_per_site_table_and_site_errors_match_sklearn(binary, multiclass):
    for run in (binary, multiclass):
        s = run["settings"]
        tables = run["tables"]
        assert len(tables["per_site"]) == len(run["models"]) * len(run["sites"])
        for row, err in zip(tables["per_site"], tables["errors_by_site"], strict=True):
            assert (row["model"], row["site"]) == (err["model"], err["site"])
            cache = load_cache(run["sites"][row["site"]])
            labels = np.asarray(cache.labels)
            _, val = train_val_split(labels, s.val_fraction, seed=s.seed)
            y = labels[val]
            scores = _scores(run, row["model"], np.asarray(cache.images[val]))
            want = _expected(y, scores, s.num_classes)
            assert row["n"] == len(val) == err["n"] == 6
            for key in ("accuracy", "sensitivity", "specificity", "f1"):
                assert _close(row[key], want[key]), (row, key)
            assert _close(row["auc"], want["auc"], want["auc_tol"])
            cm = confusion_matrix(y, scores.argmax(axis=1), labels=list(range(s.num_classes)))
            if s.num_classes == 2:
                assert (err["false positives"], err["false negatives"]) == (cm[0, 1], cm[1, 0])
            else:
                for k, c in enumerate(s.classes):
                    assert err[f"{c} misclassified"] == cm[k].sum() - cm[k, k]
                    assert err[f"{c} n"] == cm[k].sum()


def test_errors_by_modality_add_up_to_the_central_confusion(binary):
    cache = load_cache(binary["central"])
    for name in binary["models"]:
        scores = _scores(binary, name, np.asarray(cache.images))
        cm = confusion_matrix(cache.labels, scores.argmax(axis=1), labels=[0, 1])
        rows = [r for r in binary["tables"]["errors_by_modality"] if r["model"] == name]
        assert sum(r["false positives"] for r in rows) == cm[0, 1]
        assert sum(r["false negatives"] for r in rows) == cm[1, 0]
        assert sum(r["n"] for r in rows) == len(cache)


def test_robustness_at_severity_zero_equals_the_clean_metrics(binary, multiclass):
    for run in (binary, multiclass):
        auc_key = "auc" if run["settings"].num_classes == 2 else "macro-auc"
        table = run["tables"]["robustness"]
        assert {(r["perturbation"], r["severity"]) for r in table} == {
            (k, s) for k in PERTURBATIONS for s in range(4)}
        for name in run["models"]:
            clean = run["tables"]["central"][name]
            for row in (r for r in table if r["model"] == name and r["severity"] == 0):
                assert row["auc"] == clean[auc_key]
                assert row["accuracy"] == clean["accuracy"]
                assert row["n"] == clean["n"]


def test_perturbations_are_deterministic_and_grow_with_severity():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 200, (3, SIZE, SIZE)).astype(np.uint8)
    for kind in PERTURBATIONS:
        assert perturb(images, kind, 0) is images
        diffs = []
        for severity in (1, 2, 3):
            a = perturb(images, kind, severity, seed=5)
            assert a.dtype == np.uint8 and a.shape == images.shape
            np.testing.assert_array_equal(a, perturb(images, kind, severity, seed=5))
            diffs.append(np.abs(a.astype(int) - images).mean())
        assert 0 < diffs[0] < diffs[1] < diffs[2], (kind, diffs)
    assert not np.array_equal(perturb(images, "gaussian-noise", 1, seed=5),
                              perturb(images, "gaussian-noise", 1, seed=6))


def test_subgroups_or_the_sentence_saying_there_are_none(binary, multiclass):
    assert "No subgroup fields in this data" in binary["report"].read_text()
    assert binary["tables"]["subgroups"] == []
    text = multiclass["report"].read_text()
    assert "No subgroup fields in this data" not in text
    rows = multiclass["tables"]["subgroups"]
    cache = load_cache(multiclass["central"])
    y = np.asarray(cache.labels)
    scores = _scores(multiclass, "fedavg", np.asarray(cache.images))
    for field, values in (("sex", {"F", "M"}), ("age_band", {"40-49", "60-69", "unknown"})):
        mine = [r for r in rows if r["model"] == "fedavg" and r["field"] == field]
        assert {r["value"] for r in mine} == values
        assert sum(r["n"] for r in mine) == len(cache)
        for row in mine:
            keep = np.asarray([str(rec.get(field) or "unknown") == row["value"]
                               for rec in cache.meta["records"]])
            assert row["accuracy"] == pytest.approx(
                accuracy_score(y[keep], scores[keep].argmax(axis=1)))


def test_models_are_left_where_and_as_they_were(binary):
    for model in binary["models"].values():
        assert not model.training
        assert next(model.parameters()).device.type == "cpu"


def test_missing_central_cache_is_a_clear_error(binary, tmp_path):
    with pytest.raises(FedradError, match="central test set cache") as info:
        write_report(tmp_path / "out", title="t", settings=binary["settings"],
                     models=binary["models"], central_dir=tmp_path / "nowhere",
                     site_dirs=binary["sites"], histories={}, rows=[], device="cpu")
    assert info.value.code == "no-cache"
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_fit_the_settings_is_named(binary, tmp_path):
    wrong = model_from_settings(binary["settings"].replace(num_classes=3, class_names=""))
    with pytest.raises(FedradError, match="model 'pooled' does not fit the settings") as info:
        write_report(tmp_path / "out", title="t", settings=binary["settings"],
                     models={"pooled": wrong}, central_dir=binary["central"], site_dirs={},
                     histories={}, rows=[], device="cpu")
    assert info.value.code == "model-mismatch"


def test_a_cache_of_other_classes_is_refused(binary, tmp_path):
    other = _write_cache(tmp_path / "three", 9, 3, seed=0)
    with pytest.raises(FedradError, match="site 'x' cache has 3 classes") as info:
        write_report(tmp_path / "out", title="t", settings=binary["settings"],
                     models=binary["models"], central_dir=binary["central"],
                     site_dirs={"x": other}, histories={}, rows=[], device="cpu")
    assert info.value.code == "class-mismatch"


def test_grad_cam_on_small_inputs_explains_an_earlier_block_and_says_so(binary, multiclass):
    # ResNet-18 with the standard stem at 32 px ends in a 1x1 layer4 map: layer2 (4x4) instead
    text = binary["report"].read_text()
    assert "Grad-CAM explains layer2 (4x4 map)" in text
    assert "carry little spatial information" not in text
    assert "Grad-CAM explains" not in multiclass["report"].read_text()
    assert "attention-rollout" in multiclass["report"].read_text()


def test_with_cv_folds_sites_are_scored_on_their_held_out_fold(binary, tmp_path):
    settings = binary["settings"].replace(cv_folds=2, cv_fold=1)
    write_report(tmp_path, title="t", settings=settings,
                 models={"fedavg": binary["models"]["fedavg"]}, central_dir=binary["central"],
                 site_dirs=binary["sites"], histories={}, rows=[], device="cpu",
                 heatmaps_per_class=0, robustness_max_images=4)
    tables = json.loads((tmp_path / "report.json").read_text())
    for row in tables["per_site"]:
        labels = np.asarray(load_cache(binary["sites"][row["site"]]).labels)
        _, val = train_val_split(labels, 0.3, seed=0, folds=2, fold=1)
        assert row["n"] == len(val) == 10
    assert "fold 1 of 2" in (tmp_path / "report.html").read_text()
    assert {r["n"] for r in tables["robustness"]} == {4}
