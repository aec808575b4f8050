"""Inference: checkpoints -> predictions with heatmaps and latency, evaluation, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.client.prepare import prepare_site
from fedrad.common.config import load_settings
from fedrad.common.errors import FedradError
from fedrad.common.inference import (
    STAGES,
    Predictor,
    evaluate_images,
    load_checkpoint_model,
    preprocess_images,
    roc_curve_points,
)
from fedrad.common.metrics import auc_from_histograms, count_outcomes
from fedrad.common.models import model_from_settings
from fedrad.server.checkpoint import save_checkpoint
from fedrad.simulations.dicom_writer import DEFAULT_PROFILES, write_dicom, write_labels_csv
from fedrad.simulations.synthetic import make_phantom

SIZE = 32
CLASSES = "normal,opacity"


def _settings(model: str = "resnet18"):
    return load_settings({"model": model, "image-size": SIZE, "num-classes": 2,
                          "class-names": CLASSES})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A fedrad checkpoint of a ResNet-18 whose head is random (so scores vary)."""
    torch.manual_seed(0)
    settings = _settings()
    model = model_from_settings(settings)
    torch.nn.init.normal_(model.fc.weight, std=0.5 / model.fc.in_features)
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(out, 3, model.state_dict(), settings.to_run_config())
    return out / "model-latest.pt"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Six phantoms as DICOM from three scanner profiles, a labels file, and two bad files."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        image = make_phantom(rng, 96, opacity=bool(i % 2))
        name = f"img{i}.dcm"
        write_dicom(root / "dicom" / name, image, profile=DEFAULT_PROFILES[i % 3], rng=rng)
        rows.append((name, i % 2))
    write_labels_csv(root / "labels.csv", rows)
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.dcm").write_text("not an image, a text file exported by mistake\n")
    whole = (root / "dicom" / "img0.dcm").read_bytes()
    (bad / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    return root


def _good(site: Path) -> list[Path]:
    return sorted((site / "dicom").glob("*.dcm"))


def test_checkpoint_rebuilds_the_model_of_its_run_config(checkpoint):
    loaded = load_checkpoint_model(checkpoint, device="cpu")
    assert loaded.name == "resnet18"
    assert loaded.settings.image_size == SIZE
    assert loaded.classes == ["normal", "opacity"]
    assert loaded.server_round == 3
    assert not loaded.model.training
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(loaded.model.state_dict()["fc.weight"], saved["fc.weight"])


def test_bad_checkpoints_are_named_errors(tmp_path, checkpoint):
    with pytest.raises(FedradError, match="does not exist") as info:
        load_checkpoint_model(tmp_path / "nope.pt", device="cpu")
    assert info.value.code == "bad-checkpoint"
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["state_dict"], bare)
    with pytest.raises(FedradError, match="not a fedrad checkpoint"):
        load_checkpoint_model(bare, device="cpu")
    other = torch.load(checkpoint, weights_only=True)
    other["run_config"]["model"] = "densenet121"
    wrong = tmp_path / "wrong.pt"
    torch.save(other, wrong)
    with pytest.raises(FedradError, match="do not fit its run config"):
        load_checkpoint_model(wrong, device="cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(FedradError, match="cannot be read"):
        load_checkpoint_model(garbage, device="cpu")


def test_predict_gives_probabilities_heatmaps_and_stage_latencies(checkpoint, site):
    predictor = Predictor(load_checkpoint_model(checkpoint, device="cpu"))
    files = [*_good(site), site / "bad" / "notes.dcm", site / "bad" / "cut.dcm",
             site / "missing.dcm"]
    seen: list[str] = []
    results = predictor.predict_files(files, on_result=lambda r: seen.append(r.file))
    assert seen == [str(f) for f in files], "every file is reported, in order"
    good, bad = results[:6], results[6:]
    for r in good:
        assert r.ok and r.probabilities is not None
        assert r.probabilities.shape == (2,)
        assert r.probabilities.sum() == pytest.approx(1.0)
        assert r.predicted == int(np.argmax(r.probabilities))
        assert set(r.timings_ms) == {*STAGES, "total"}
        assert all(v >= 0 for v in r.timings_ms.values())
        assert r.timings_ms["total"] >= sum(r.timings_ms[s] for s in STAGES) * 0.99
        assert r.heatmap.shape == (SIZE, SIZE) and r.heatmap.dtype == np.float32
        assert 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0
        assert r.image.shape == (SIZE, SIZE) and r.image.dtype == np.uint8
    assert len({round(float(r.probabilities[1]), 6) for r in good}) > 1, "scores vary"
    assert [r.error_code for r in bad] == ["not-dicom", "truncated", "missing-file"]
    assert all(not r.ok and r.probabilities is None and r.error_message for r in bad)
    assert all("/" not in r.error_message for r in bad), "messages carry no paths"


def test_predict_preprocesses_exactly_as_site_preparation(checkpoint, site, tmp_path):
    settings = _settings()
    prepared = prepare_site(site / "dicom", site / "labels.csv", tmp_path / "cache", settings,
                            site_id="site-x", workers=1)
    assert prepared.accepted == 6
    from fedrad.common.cache import load_cache

    cache = load_cache(tmp_path / "cache")
    loaded = load_checkpoint_model(checkpoint, device="cpu")
    predictor = Predictor(loaded, heatmaps=False)
    by_file = [predictor.predict_file(p) for p in _good(site)]
    cached = {img.tobytes() for img in np.asarray(cache.images)}
    for r in by_file:
        assert r.image.tobytes() in cached, "the model sees the image the site cached"
    # The same model scores the cache as evaluation does: the same probabilities.
    result = evaluate_images(loaded, np.asarray(cache.images), np.asarray(cache.labels))
    by_image = {img.tobytes(): s for img, s in zip(np.asarray(cache.images), result.scores,
                                                   strict=True)}
    for r in by_file:
        np.testing.assert_allclose(r.probabilities, by_image[r.image.tobytes()], atol=1e-5)


def test_evaluate_images_counts_every_outcome(checkpoint):
    loaded = load_checkpoint_model(checkpoint, device="cpu")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(20, SIZE, SIZE), dtype=np.uint8)
    labels = np.arange(20) % 2
    result = evaluate_images(loaded, images, labels, batch_size=8)
    m = result.metrics
    assert m["n"] == 20 and result.counts.confusion.sum() == 20
    accuracy = float((result.scores.argmax(1) == labels).mean())
    assert m["accuracy"] == pytest.approx(accuracy)
    assert m["accuracy-ci-low"] <= m["accuracy"] <= m["accuracy-ci-high"]
    assert {"sensitivity", "specificity", "auc", "auc-ci-low"} <= set(m)
    with pytest.raises(FedradError, match="image-size=32") as info:
        evaluate_images(loaded, images[:, :16, :16], labels)
    assert info.value.code == "size-mismatch"


def test_roc_points_enclose_the_pooled_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    p1 = np.clip(0.35 * labels + rng.random(300) * 0.65, 0, 1)
    counts = count_outcomes(np.stack([1 - p1, p1], 1), labels, bins=50)
    fpr, tpr = roc_curve_points(counts, 1)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auc_from_histograms(counts.pos_hist[1], counts.neg_hist[1]))
    assert area > 0.7


def test_preprocess_images_gives_the_model_size():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    out = preprocess_images(images, _settings())
    assert out.shape == (3, SIZE, SIZE) and out.dtype == np.uint8
    assert out.max() == 255 and out.min() == 0  # scaled to the full range per image


runner = CliRunner()


def test_cli_predict_writes_a_row_per_file_and_heatmap_pngs(checkpoint, site, tmp_path):
    out = tmp_path / "pred"
    res = runner.invoke(app, ["predict", str(checkpoint), str(site / "dicom"),
                              str(site / "bad" / "notes.dcm"), "--out", str(out),
                              "--device", "cpu"])
    assert res.exit_code == 1, res.output  # one file failed
    assert "not-dicom" in res.output and "6 predicted, 1 failed" in res.output
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    assert set(rows[0]) >= {"file", "status", "p_normal", "p_opacity", "predicted",
                            "decode_ms", "preprocess_ms", "model_ms", "heatmap_ms",
                            "total_ms", "heatmap", "error"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6
    for r in ok:
        assert float(r["p_normal"]) + float(r["p_opacity"]) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] in ("normal", "opacity")
        png = out / r["heatmap"]
        with Image.open(png) as pic:
            assert pic.format == "PNG" and pic.size == (256 * 2 + 4, 256)
    bad = [r for r in rows if r["status"] != "ok"]
    assert bad[0]["status"] == "not-dicom" and bad[0]["error"] and not bad[0]["p_normal"]


def test_cli_predict_with_only_good_files_exits_zero(checkpoint, site, tmp_path):
    res = runner.invoke(app, ["predict", str(checkpoint), str(_good(site)[0]), "--out",
                              str(tmp_path / "p"), "--device", "cpu", "--no-heatmaps"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "p" / "heatmaps").exists()


def test_cli_bad_checkpoint_exits_two_with_the_reason(tmp_path, site):
    res = runner.invoke(app, ["predict", str(tmp_path / "none.pt"), str(_good(site)[0]),
                              "--out", str(tmp_path / "p")])
    assert res.exit_code == 2
    assert "bad-checkpoint" in res.output


def test_cli_evaluate_on_a_cache_writes_metrics_and_plots(checkpoint, site, tmp_path):
    prepare_site(site / "dicom", site / "labels.csv", tmp_path / "cache", _settings(),
                 site_id="site-y", workers=1)
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(tmp_path / "cache"),
                              "--out", str(out), "--device", "cpu", "--heatmaps", "4"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["n"] == 6 and report["round"] == 3
    assert np.sum(report["confusion"]) == 6
    assert report["class_names"] == ["normal", "opacity"]
    for name in ("confusion.png", "roc.png", "heatmaps.png"):
        with Image.open(out / name) as pic:
            assert pic.format == "PNG" and pic.width > 200


def test_cli_evaluate_on_a_medmnist_npz(checkpoint, shared_data, tmp_path):
    npz = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(npz), "--split",
                              "val", "--out", str(out), "--device", "cpu", "--heatmaps", "0",
                              "--max-images", "60"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["n"] == 60
    assert "val split" in report["data"] and "60 of 524" in report["data"]  # 524: the split
    assert sum(map(sum, report["confusion"])) == 60
    assert not (out / "heatmaps.png").exists()


def test_cli_evaluate_rejects_other_data(checkpoint, tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    res = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(tmp_path / "x.csv"),
                              "--out", str(tmp_path / "e"), "--device", "cpu"])
    assert res.exit_code == 2 and "prepared cache folder" in res.output


@pytest.mark.gpu
def test_predict_on_cuda_matches_the_cpu(checkpoint, site):
    files = _good(site)
    cpu = Predictor(load_checkpoint_model(checkpoint, device="cpu")).predict_files(files)
    gpu_model = load_checkpoint_model(checkpoint, device="cuda")
    assert gpu_model.device.type == "cuda"
    gpu = Predictor(gpu_model).predict_files(files)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.ok and b.heatmap.shape == (SIZE, SIZE)
        # bf16 autocast on CUDA: probabilities agree to bf16 precision.
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=0.05)
        assert set(b.timings_ms) == {*STAGES, "total"}


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_predicts_one_pass_heatmap_equals_the_separate_computation(name, site, tmp_path):
    torch.manual_seed(1)
    settings = _settings(name)
    model = model_from_settings(settings)
    head = model.heads.head if name == "vit_tiny" else model.fc
    torch.nn.init.normal_(head.weight, std=1.0 / head.in_features)
    save_checkpoint(tmp_path, 1, model.state_dict(), settings.to_run_config())
    predictor = Predictor(load_checkpoint_model(tmp_path / "model-latest.pt", device="cpu"))
    result = predictor.predict_file(_good(site)[1])
    x = predictor.input_batch(result.image[None])
    separate = predictor.heatmap(x, result.predicted)[0].numpy()
    np.testing.assert_allclose(result.heatmap, separate, atol=1e-5)
    np.testing.assert_allclose(result.probabilities,
                               predictor.forward(x)[0].double().numpy(), atol=1e-6)
    assert result.heatmap.max() == pytest.approx(1.0)
