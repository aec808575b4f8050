"""``fedrad simulate``: experiment files are checked up front; a small run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.common.errors import ConfigError
from fedrad.simulations.experiment import load_experiment, run_experiment

ROOT = Path(__file__).resolve().parents[1]
PNEUMONIA = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("sites: 3\nstrategy: [fedavg]\n", "Unknown key 'strategy'.*Did you mean 'strategies'"),
        ("partition: {scheme: iid, alpah: 1}\n", "Unknown key 'partition.alpah'"),
        ("partition: {scheme: dirichlet}\n", "'partition.scheme' is 'dirichlet'"),
        ("partition: {alpha: 0}\n", "'partition.alpha' must be a number > 0"),
        ("strategies: [fedsgd]\n", "'strategies' lists 'fedsgd';.*accepted: fedavg, fedprox"),
        ("strategies: [{fedprox: {proximal-mu: -1}}]\n",
         "'strategies' entry fedprox: 'proximal-mu' must be >= 0"),
        ("strategies: [{fedprox: {proximal-mu: 0.1}}, {fedprox: {proximal-mu: 0.1}}]\n",
         "lists fedprox\\(proximal-mu=0.1\\) twice"),
        ("strategies: [{median: {secure-aggregation: true}}]\n",
         "entry median: 'strategy' median needs each site's own update"),
        ("strategies: []\n", "'strategies' is empty"),
        ("profiles: [{name: a, manufacturer: b, noise: 0.1}]\n",
         "Unknown key 'profiles\\[1\\].noise'.*Did you mean 'noise-std'"),
        ("profiles: [{name: a, manufacturer: b, bits-stored: 9}]\n", "bits_stored=9"),
        ("dataset: {kind: medmnist, path: nowhere.npz}\n", "is not a MedMNIST .npz"),
        ("dataset: {kind: image-folder, path: nowhere}\n", "is not a folder of class"),
        ("dataset: {kind: dcm}\n", "'dataset.kind' is 'dcm'"),
        ("dataset: {kind: dicom, path: nowhere}\n", "is not a folder \\(kind: dicom\\)"),
        ("sites: 0\n", "'sites' must be an integer >= 1"),
        ("folds: 1\n", "'folds' must be an integer >= 2"),
        ("report: maybe\n", "'report' must be true or false"),
        ("dataset: {kind: synthetic, test-scanners: clean}\n",
         "'dataset.test-scanners' is 'clean'; accepted: original, sites"),
        ("settings: {num-server-round: 2}\n", "Unknown setting 'num-server-round'"),
        ("settings: {seed: 2}\n", "'settings.seed'.*top-level 'seed' key"),
        ("- a list\n", "must hold a mapping"),
    ],
)
def test_bad_experiment_files_name_the_key(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_experiment(_write(tmp_path, text))


def test_a_seed_from_the_command_line_is_the_whole_experiments_seed(tmp_path: Path) -> None:
    """--set seed=N reseeds the partition, the baselines and every strategy alike."""
    path = _write(tmp_path, "seed: 4\nstrategies: [fedavg, {fedprox: {proximal-mu: 0.1}}]\n")
    assert load_experiment(path).seed == 4
    cfg = load_experiment(path, overrides={"seed": "7", "num-server-rounds": "2"})
    assert cfg.seed == 7 and cfg.settings.seed == 7 and cfg.settings.num_server_rounds == 2
    assert [run.settings.seed for run in cfg.strategies] == [7, 7]
    with pytest.raises(ConfigError, match="--set seed: expected an integer >= 0, got '-1'"):
        load_experiment(path, overrides={"seed": "-1"})


@pytest.mark.skipif(not PNEUMONIA.is_file(), reason="shared PneumoniaMNIST not present")
def test_shipped_experiment_files_load() -> None:
    for path in sorted((ROOT / "simulations" / "experiments").glob("*.yaml")):
        cfg = load_experiment(path)
        assert cfg.path is not None and cfg.path.exists(), path


def test_strategy_entries_carry_their_settings(tmp_path: Path) -> None:
    cfg = load_experiment(_write(tmp_path, (
        "strategies: [fedavg, {fedprox: {proximal-mu: 0.1}}, {fedprox: {proximal-mu: 1.0}},"
        " fedadam, median]\nsettings: {num-server-rounds: 4}\n"
        "profiles: [{name: a, manufacturer: Acme, photometric: MONOCHROME1}]\n")),
        overrides={"local-epochs": "2"})
    labels = [r.label for r in cfg.strategies]
    assert labels == ["fedavg", "fedprox(proximal-mu=0.1)", "fedprox(proximal-mu=1.0)",
                      "fedadam", "median"]
    by = {r.label: r.settings for r in cfg.strategies}
    assert by["fedprox(proximal-mu=1.0)"].proximal_mu == 1.0
    assert by["fedprox(proximal-mu=1.0)"].strategy == "fedprox"
    assert all(s.num_server_rounds == 4 and s.local_epochs == 2 for s in by.values())
    assert by["fedadam"].secure_aggregation and not by["median"].secure_aggregation
    assert [p.photometric for p in cfg.profiles] == ["MONOCHROME1"]


def test_impossible_partition_fails_before_training(tmp_path: Path) -> None:
    if not PNEUMONIA.is_file():
        pytest.skip("shared PneumoniaMNIST not present")
    cfg = load_experiment(_write(tmp_path, (
        f"dataset: {{kind: medmnist, path: {PNEUMONIA}}}\nsites: 5\n"
        "partition: {scheme: iid, min-per-site: 5000}\n")))
    with pytest.raises(ConfigError, match="min-per-site=5000 is impossible"):
        run_experiment(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "caches").exists()


@pytest.mark.slow
def test_small_synthetic_experiment_end_to_end(tmp_path: Path) -> None:
    exp = _write(tmp_path, (
        "name: tiny\ndataset: {kind: synthetic, images-per-site: 30}\nsites: 2\n"
        "baselines: [pooled, local]\n"
        "settings: {num-server-rounds: 2, image-size: 32, local-epochs: 1, batch-size: 16}\n"))
    result = CliRunner().invoke(app, ["simulate", str(exp), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["fedavg", "pooled", "local:site-1", "local:site-2"]
    assert len(data["curves"]["fedavg"]) == 2
    for row in data["rows"]:
        assert 0.0 <= row["auc"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
        assert row["auc-ci-low"] <= row["auc"] <= row["auc-ci-high"]
    # the federated row's final AUC is the last point of its curve
    assert data["rows"][0]["auc"] == pytest.approx(data["curves"]["fedavg"][-1])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "fedavg" in html and "pooled" in html and "data:image/png;base64," in html
    assert "report.html" in result.output
    assert (tmp_path / "out" / "results.csv").read_text().count("\n") == 5
    png = (tmp_path / "out" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "pooled" in result.output and "fedavg" in result.output


def test_dicom_folders_are_the_sites(tmp_path: Path) -> None:
    from fedrad.simulations.experiment import _write_federation
    from fedrad.simulations.synthetic import generate_synthetic_federation

    root = tmp_path / "hospitals"
    written = generate_synthetic_federation(root, num_sites=2, images_per_site=6, image_size=64,
                                            seed=1)
    (root / "federation.json").unlink(missing_ok=True)  # plain folders, no manifest
    cfg = load_experiment(_write(tmp_path, f"dataset: {{kind: dicom, path: {root}}}\n"))
    assert cfg.sites == 2
    federation = _write_federation(cfg, tmp_path / "unused")
    assert [s.site_id for s in federation.sites] == ["site-1", "site-2"]
    assert federation.test is not None and federation.test.num_images > 0
    for got, made in zip(federation.sites, written.sites, strict=True):
        assert got.num_images == made.num_images and got.class_counts == made.class_counts
    assert len(federation.class_names) == 2
    with pytest.raises(ConfigError, match="'sites' is 3 but .* holds 2 site folders"):
        load_experiment(_write(tmp_path, f"dataset: {{kind: dicom, path: {root}}}\nsites: 3\n"))
    with pytest.raises(ConfigError, match="'partition' does not apply"):
        load_experiment(_write(tmp_path, f"dataset: {{kind: dicom, path: {root}}}\n"
                                         "partition: {scheme: iid}\n"))
    (root / "site-2" / "labels.csv").unlink()
    with pytest.raises(ConfigError, match="site-2 has no labels.csv"):
        load_experiment(_write(tmp_path, f"dataset: {{kind: dicom, path: {root}}}\n"))


@pytest.mark.slow
def test_cross_validation_folds_and_the_same_numbers_twice(tmp_path: Path) -> None:
    text = ("name: cv\ndataset: {kind: synthetic, images-per-site: 24}\nsites: 2\nfolds: 2\n"
            "strategies: [fedavg]\nbaselines: [pooled]\nreport: false\n"
            "settings: {num-server-rounds: 1, image-size: 32, batch-size: 16}\n")
    results = []
    for run in ("a", "b"):
        cfg = load_experiment(_write(tmp_path, text))
        result = run_experiment(cfg, tmp_path / run)
        results.append(json.loads((result.out_dir / "results.json").read_text()))
    rows = results[0]["rows"]
    assert [(r["name"], r["fold"]) for r in rows] == [
        ("fedavg", 1), ("pooled", 1), ("fedavg", 2), ("pooled", 2),
        ("fedavg", "mean"), ("pooled", "mean")]
    for name in ("fedavg", "pooled"):
        per_fold = [r["auc"] for r in rows if r["name"] == name and r["fold"] != "mean"]
        mean = next(r for r in rows if r["name"] == name and r["fold"] == "mean")
        assert mean["auc"] == pytest.approx(sum(per_fold) / 2)
        assert mean["auc-sd"] == pytest.approx(abs(per_fold[0] - per_fold[1]) / 2 ** 0.5)
    assert (tmp_path / "a" / "fold-2" / "fedavg" / "model-latest.pt").is_file()
    # fixed seeds: the second run gives the same numbers
    for first, second in zip(rows, results[1]["rows"], strict=True):
        for key in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
            assert first[key] == pytest.approx(second[key], abs=1e-6), (first["name"], key)


def test_the_pooled_baseline_trains_as_many_batches_a_round_as_the_sites(monkeypatch) -> None:
    """With local-steps, each pooled round is sites x local-steps batches; without, the
    federation's local epochs."""
    import fedrad.simulations.experiment as experiment
    from fedrad.common.config import load_settings

    calls = []
    monkeypatch.setattr(experiment, "train_local",
                        lambda *args, **kwargs: calls.append((kwargs["steps"],
                                                              kwargs["epochs"])))
    images, labels = np.zeros((8, 28, 28), np.uint8), np.zeros(8, np.int64)
    settings = load_settings({"image-size": 28, "num-server-rounds": 2, "local-steps": 12,
                              "local-epochs": 3})
    experiment._train_schedule(settings, images, labels, "cpu", sites=5)
    assert calls == [(60, 3), (60, 3)]
    calls.clear()
    experiment._train_schedule(settings.replace(local_steps=0), images, labels, "cpu", sites=5)
    assert calls == [(None, 3), (None, 3)]
