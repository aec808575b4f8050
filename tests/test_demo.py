"""``fedrad demo`` end to end, small: synthetic DICOM sites -> caches -> Flower simulation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.common.cache import load_cache
from fedrad.common.splits import train_val_split
from fedrad.simulations.demo import DemoOptions, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_demo_runs_a_federation_and_writes_pooled_metrics(tmp_path: Path) -> None:
    reports = []
    opts = DemoOptions(
        out_dir=tmp_path / "demo", num_sites=3, images_per_site=40, workers=1,
        overrides={"num-server-rounds": 2, "image-size": 48, "local-epochs": 1},
    )
    result = run_demo(opts, say=lambda text: None, on_round=reports.append)
    assert [r.server_round for r in reports] == [1, 2]
    assert len(result.prepared) == 4  # three sites and the central test set
    rows = reports[-1].rows
    # secure aggregation is on by default: the server sees only sums, so no per-site rows
    assert result.settings.secure_aggregation
    assert set(rows) == {"pooled", "central"}
    pooled = rows["pooled"]
    for key in ("accuracy", "sensitivity", "specificity", "f1", "auc"):
        assert key in pooled
    # pooled n is the sum of the sites' held-out samples, not an average
    held_out = 0
    for prepared in result.prepared[:3]:
        labels = np.asarray(load_cache(prepared.cache_dir).labels)
        held_out += len(train_val_split(labels, result.settings.val_fraction,
                                        seed=result.settings.seed)[1])
    assert pooled["n"] == held_out
    assert not any(r.failures for r in reports)
    run_dir = result.run_dir
    history = json.loads((run_dir / "metrics.json").read_text())
    assert history
    with open(run_dir / "metrics.csv", newline="") as fh:
        scopes = {(row["round"], row["scope"]) for row in csv.DictReader(fh)}
    assert ("2", "pooled") in scopes and ("2", "central") in scopes
    assert (run_dir / "checkpoints" / "round-001.pt").is_file()
    assert (run_dir / "model-latest.pt").is_file()


def test_demo_cli_rejects_unknown_setting(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--set", "local-epoch=2"])
    assert result.exit_code == 2
    assert "local-epoch" in result.output and "local-epochs" in result.output


def test_demo_cli_rejects_missing_dataset(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "o"),
                                      "--data-path", str(missing)])
    assert result.exit_code == 2
    assert "nope.npz" in result.output


def test_demo_leaves_out_a_site_without_usable_images(tmp_path: Path, monkeypatch) -> None:
    import fedrad.simulations.demo as demo_mod
    from fedrad.common.errors import SiteDataError

    real_prepare = demo_mod.prepare_site
    launched = {}

    def prepare(dicom_dir, labels_csv, out_dir, settings, *, site_id, workers):
        if site_id == "site-2":
            raise SiteDataError("no-usable-image", "site 5f3a has no usable image")
        return real_prepare(dicom_dir, labels_csv, out_dir, settings, site_id=site_id,
                            workers=workers)

    def fake_simulation(server_app, client_app, num_sites):
        launched["num_sites"] = num_sites

    monkeypatch.setattr(demo_mod, "prepare_site", prepare)
    monkeypatch.setattr(demo_mod, "run_in_simulation", fake_simulation)
    said = []
    opts = DemoOptions(out_dir=tmp_path / "demo", num_sites=3, images_per_site=12, workers=1,
                       overrides={"num-server-rounds": 1, "image-size": 32})
    with pytest.raises(Exception, match="completed 0 of 1 rounds"):
        run_demo(opts, say=said.append)
    assert launched["num_sites"] == 2
    assert any("site-2: left out" in s and "no-usable-image" in s for s in said)
    assert any("Continuing with the 2 sites" in s for s in said)


def test_demo_stops_when_too_few_sites_remain(tmp_path: Path, monkeypatch) -> None:
    import fedrad.simulations.demo as demo_mod
    from fedrad.common.errors import SiteDataError

    def prepare(*args, site_id, **kwargs):
        raise SiteDataError("no-usable-image", f"site {site_id} has no usable image")

    monkeypatch.setattr(demo_mod, "prepare_site", prepare)
    opts = DemoOptions(out_dir=tmp_path / "demo", num_sites=2, images_per_site=12, workers=1,
                       overrides={"num-server-rounds": 1, "image-size": 32})
    with pytest.raises(SiteDataError, match="too-few-sites"):
        run_demo(opts, say=lambda s: None)


def test_demo_on_a_multiclass_npz_reports_per_class_and_macro_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
        for cls in range(3):  # each class brightens its own band of rows
            images[labels == cls, 9 * cls:9 * cls + 9, :] += 150
        return images, labels.reshape(-1, 1).astype(np.uint8)

    arrays = {}
    for name, n in (("train", 150), ("val", 30), ("test", 60)):
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = split(n)
    npz = tmp_path / "bandsmnist.npz"
    np.savez(npz, **arrays)
    reports = []
    opts = DemoOptions(out_dir=tmp_path / "demo", data_path=npz, num_sites=3, alpha=5.0,
                       workers=1, overrides={"num-server-rounds": 2, "image-size": 32,
                                             "secure-aggregation": False})
    result = run_demo(opts, say=lambda text: None, on_round=reports.append)
    assert result.settings.num_classes == 3
    central = reports[-1].rows["central"]
    assert central["n"] == 60
    for key in ("accuracy", "macro-sensitivity", "macro-specificity", "macro-f1", "macro-auc"):
        assert key in central
    classes = result.settings.classes
    assert len(classes) == 3
    assert f"{classes[2]}/auc" in reports[-1].rows["pooled"]
    # without secure aggregation the server also reports each site
    assert {"site:site-1", "site:site-2", "site:site-3"} <= set(reports[-1].rows)
    assert "macro-auc" in reports[-1].table
