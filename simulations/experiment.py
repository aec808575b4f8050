"""``fedrad simulate CONFIG.yaml``: one federated experiment and its baselines on one machine.

A YAML file says which dataset, how it is spread over the simulated sites, which
federated strategies to run and which baselines to compare them with::

    name: pneumonia-5-sites
    dataset:
      kind: medmnist          # medmnist (.npz) | image-folder | dicom | synthetic
      path: ../shared/data/pneumoniamnist/pneumoniamnist.npz
      test-scanners: original # the central test set's pixels as given (or: sites)
    sites: 5
    partition:
      scheme: label-skew      # iid | label-skew | quantity-skew
      alpha: 0.3
    strategies:               # each a name, or {name: {settings for this strategy}}
      - fedavg
      - fedprox: {proximal-mu: 0.01}
      - fedbn
    baselines: [pooled, local]
    profiles:                 # optional scanner profiles, cycled over the sites
      - {name: site-a, manufacturer: Acme, noise-std: 0.01, photometric: MONOCHROME1}
    folds: 5                  # optional k-fold cross-validation of the sites' hold-out
    report: true              # report.html and its PNGs (default true)
    settings:                 # fedrad run settings (see fedrad.common.config)
      num-server-rounds: 10

Strategies: ``fedavg``, ``fedprox``, ``fedbn``, ``fedadam``, ``fedyogi``, ``fedadagrad``
and the robust ``median``, ``trimmed-mean`` and ``krum`` (see
:mod:`fedrad.server.strategies`).  The robust ones need each site's own update, so they
run with ``secure-aggregation`` off (said in the log); the others keep the run's setting.
A strategy named twice is labelled by its settings, e.g. ``fedprox(proximal-mu=0.1)``.

Every key is checked before anything is written or trained: an unknown key, a dataset
path that does not exist, or an impossible partition stops the run with a message that
names the key and what is accepted.

The run writes the sites' DICOM folders once, prepares each site's cache exactly as a
hospital would, runs each strategy through Flower's simulation engine, and trains the
baselines on the same caches with the same schedule (``num-server-rounds`` x
``local-epochs`` epochs, the same learning-rate decay):

* ``pooled``: one model on all sites' training images together (what centralising the
  data would give);
* ``local``: each site alone, every model scored on the same central test set.

Results: ``results.json`` and ``results.csv`` (one row per strategy / baseline, central
test metrics with confidence intervals), ``comparison.png`` (central AUC per round) and
``report.html`` with its PNGs (see :mod:`fedrad.simulations.report`).
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedrad.client.client_app import SiteContext, make_client_app
from fedrad.common.cache import load_cache
from fedrad.common.config import ROBUST_STRATEGIES, STRATEGIES, Settings, load_settings
from fedrad.common.errors import ConfigError, FedradError
from fedrad.common.metrics import count_outcomes, pooled_metrics
from fedrad.common.models import model_from_settings
from fedrad.common.splits import site_split
from fedrad.common.training import predict_scores, select_device, train_local
from fedrad.server.server_app import RoundReport, make_server_app

from .demo import MEDMNIST_DEFAULTS, ORIGINAL_PIXELS, SYNTHETIC_DEFAULTS, prepare_federation
from .dicom_folder import load_dicom_folder
from .dicom_writer import DEFAULT_PROFILES, ScannerProfile
from .engine import run_in_simulation
from .partition import SCHEMES

__all__ = ["ExperimentConfig", "ExperimentResult", "StrategyRun", "load_experiment",
           "run_experiment"]

log = logging.getLogger(__name__)

DATASET_KINDS = ("medmnist", "image-folder", "dicom", "synthetic")
BASELINES = ("pooled", "local")

_TOP_KEYS = ("name", "dataset", "sites", "partition", "strategies", "baselines", "settings",
             "seed", "workers", "profiles", "folds", "report")
_PROFILE_KEYS = tuple(f.replace("_", "-") for f in ScannerProfile.__dataclass_fields__)


@dataclass(frozen=True)
class StrategyRun:
    """One federated run of an experiment: its label and its full settings."""

    label: str
    settings: Settings
_DATASET_KEYS = ("kind", "path", "images-per-site", "max-train-per-site", "max-test",
                 "test-scanners")
#: ``dataset.test-scanners``: the central test set as the source pixels, or through the
#: sites' scanner profiles (image by image, as a test set gathered at the sites would be).
#: Default: ``original`` for MedMNIST and image folders, ``sites`` for synthetic phantoms.
TEST_SCANNERS = ("original", "sites")
_PARTITION_KEYS = ("scheme", "alpha", "min-per-site")


@dataclass
class ExperimentConfig:
    """A validated experiment file."""

    name: str
    kind: str
    path: Path | None
    sites: int
    scheme: str = "label-skew"
    alpha: float = 0.5
    min_per_site: int | None = None
    strategies: list[StrategyRun] = field(default_factory=list)
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    settings: Settings = field(default_factory=load_settings)
    seed: int = 0
    workers: int = 1
    images_per_site: int = 240
    max_train_per_site: int | None = None
    max_test: int | None = None
    test_scanners: str = "original"
    profiles: tuple[ScannerProfile, ...] = DEFAULT_PROFILES
    folds: int = 0
    report: bool = True


@dataclass
class ExperimentResult:
    """Where the experiment wrote its outputs, and one row per strategy or baseline."""

    out_dir: Path
    rows: list[dict[str, Any]]
    curves: dict[str, list[float]]
    seconds: float


def _check_keys(section: str, given: Mapping[str, Any], accepted: tuple[str, ...]) -> None:
    for key in given:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), accepted, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where = f"{section}.{key}" if section else str(key)
            raise ConfigError(
                f"Unknown key '{where}' in the experiment file.{hint} Accepted: "
                + ", ".join(accepted)
            )


def _choice_list(key: str, value: Any, accepted: tuple[str, ...]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    for item in items:
        if item not in accepted:
            raise ConfigError(f"'{key}' lists {item!r}; accepted: {', '.join(accepted)}")
    return items


def _choice(key: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ConfigError(f"'{key}' is {value!r}; accepted: {', '.join(accepted)}")
    return str(value)


def _int_or_none(key: str, value: Any, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"'{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _strategy_runs(value: Any, base: Settings, overrides: Mapping[str, Any]) -> list[StrategyRun]:
    """``strategies:`` entries -> one :class:`StrategyRun` each (settings checked now)."""
    items = [value] if isinstance(value, (str, dict)) else list(value or [])
    if not items:
        raise ConfigError("'strategies' is empty; list at least one of " + ", ".join(STRATEGIES))
    parsed: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        if isinstance(item, dict) and len(item) == 1:
            name, extra = next(iter(item.items()))
            if extra is not None and not isinstance(extra, dict):
                raise ConfigError(f"'strategies' entry {name}: its settings must be a mapping "
                                  f"like {{proximal-mu: 0.1}}, got {extra!r}")
            extra = dict(extra or {})
        elif isinstance(item, str):
            name, extra = item, {}
        else:
            raise ConfigError(f"'strategies' entries are names or {{name: {{settings}}}}; got "
                              f"{item!r}")
        if name not in STRATEGIES:
            close = difflib.get_close_matches(str(name), STRATEGIES, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"'strategies' lists {name!r};{hint} accepted: "
                              + ", ".join(STRATEGIES))
        parsed.append((str(name), extra))
    names = [n for n, _ in parsed]
    runs = []
    for name, extra in parsed:
        changes: dict[str, Any] = {"strategy": name, **extra, **overrides}
        if name in ROBUST_STRATEGIES and "secure-aggregation" not in changes:
            changes["secure-aggregation"] = False
        try:
            settings = base.replace(**{k.replace("-", "_"): v for k, v in changes.items()})
        except ConfigError as err:
            raise ConfigError(f"'strategies' entry {name}: {err.message}") from None
        label = name
        if names.count(name) > 1:
            label += "(" + ",".join(f"{k}={v}" for k, v in extra.items()) + ")"
        if label in [r.label for r in runs]:
            raise ConfigError(f"'strategies' lists {label} twice with the same settings")
        runs.append(StrategyRun(label, settings))
    return runs


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"'{key}' must be true or false, got {value!r}")
    return value


def _folds(value: Any) -> int:
    if value is None or value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"'folds' must be an integer >= 2 (k-fold cross-validation) or 0 "
                          f"(off), got {value!r}")
    return value


def _profiles(value: Any) -> tuple[ScannerProfile, ...]:
    if value is None:
        return DEFAULT_PROFILES
    if not isinstance(value, list) or not value:
        raise ConfigError("'profiles' must be a non-empty list of scanner profiles "
                          "(mappings with name, manufacturer, noise-std, ...)")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"'profiles' entry {i + 1} must be a mapping, got {item!r}")
        _check_keys(f"profiles[{i + 1}]", item, _PROFILE_KEYS)
        if "name" not in item or "manufacturer" not in item:
            raise ConfigError(f"'profiles' entry {i + 1} needs a name and a manufacturer")
        try:
            out.append(ScannerProfile(**{k.replace("-", "_"): v for k, v in item.items()}))
        except ConfigError as err:
            raise ConfigError(f"'profiles' entry {i + 1}: {err.message}") from None
        except TypeError:
            raise ConfigError(f"'profiles' entry {i + 1}: a value has the wrong type "
                              "(numbers for noise-std, contrast, bits-stored...)") from None
    return tuple(out)


def load_experiment(path: str | os.PathLike[str], *,
                    overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read and check an experiment YAML file (relative dataset paths: from the file).

    Raises
    ------
    ConfigError
        The file is missing or not YAML, a key is unknown, a value is out of range, or the
        dataset path does not exist or has the wrong layout.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"experiment file {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{file} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} must hold a mapping of keys (name, dataset, sites, ...)")
    _check_keys("", raw, _TOP_KEYS)
    dataset = raw.get("dataset") or {"kind": "synthetic"}
    if not isinstance(dataset, dict):
        raise ConfigError("'dataset' must be a mapping with 'kind' and 'path'")
    _check_keys("dataset", dataset, _DATASET_KEYS)
    kind = dataset.get("kind", "synthetic")
    if kind not in DATASET_KINDS:
        raise ConfigError(f"'dataset.kind' is {kind!r}; accepted: {', '.join(DATASET_KINDS)}")
    data_path: Path | None = None
    if kind != "synthetic":
        if not dataset.get("path"):
            raise ConfigError(f"'dataset.path' is required for dataset.kind={kind}")
        data_path = Path(str(dataset["path"]))
        if not data_path.is_absolute():
            data_path = (file.parent / data_path).resolve()
        if kind == "medmnist" and (not data_path.is_file() or data_path.suffix != ".npz"):
            raise ConfigError(
                f"'dataset.path' {data_path} is not a MedMNIST .npz file (kind: medmnist)")
        if kind == "image-folder" and not data_path.is_dir():
            raise ConfigError(
                f"'dataset.path' {data_path} is not a folder of class sub-folders "
                "(kind: image-folder)")
        if kind == "dicom":
            if "partition" in raw:
                raise ConfigError("'partition' does not apply to dataset.kind=dicom: the sites "
                                  "are the folders of dataset.path; remove it")
            found = load_dicom_folder(data_path)  # checks the layout now
            if found.test is None:
                raise ConfigError(f"'dataset.path' {data_path} has no test/ folder: kind dicom "
                                  "needs the central test set every model is scored on")
            if "sites" in raw and raw["sites"] != len(found.sites):
                raise ConfigError(f"'sites' is {raw['sites']!r} but {data_path} holds "
                                  f"{len(found.sites)} site folders; remove 'sites' or fix it")
            raw = {**raw, "sites": len(found.sites)}
    partition = raw.get("partition") or {}
    if not isinstance(partition, dict):
        raise ConfigError("'partition' must be a mapping with 'scheme' and 'alpha'")
    _check_keys("partition", partition, _PARTITION_KEYS)
    scheme = partition.get("scheme", "label-skew")
    if scheme not in SCHEMES:
        raise ConfigError(f"'partition.scheme' is {scheme!r}; accepted: {', '.join(SCHEMES)}")
    alpha = partition.get("alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"'partition.alpha' must be a number > 0, got {alpha!r}")
    sites = _int_or_none("sites", raw.get("sites", 3))
    settings_raw = dict(raw.get("settings") or {})
    if "seed" in settings_raw:
        raise ConfigError("'settings.seed': the experiment's seed is the top-level 'seed' key "
                          "(it seeds the partition and every run's training); move it there")
    overrides = dict(overrides or {})
    seed = _int_or_none("seed", raw.get("seed", 0), minimum=0) or 0
    if "seed" in overrides:  # --set seed=N: the whole experiment's seed, partition included
        text = str(overrides.pop("seed"))
        if not (text.isascii() and text.isdigit()):
            raise ConfigError(f"--set seed: expected an integer >= 0, got {text!r}")
        seed = int(text)
    settings_raw.update(overrides)
    defaults = SYNTHETIC_DEFAULTS if kind == "synthetic" else MEDMNIST_DEFAULTS
    settings = load_settings({**defaults, **settings_raw, "seed": seed})
    if settings.min_sites > sites:
        settings = settings.replace(min_sites=sites)
    strategies = _strategy_runs(raw.get("strategies", ["fedavg"]), settings, overrides)
    return ExperimentConfig(
        name=str(raw.get("name") or file.stem),
        kind=kind,
        path=data_path,
        sites=sites,
        scheme=scheme,
        alpha=float(alpha),
        min_per_site=_int_or_none("partition.min-per-site", partition.get("min-per-site")),
        strategies=strategies,
        baselines=_choice_list("baselines", raw.get("baselines", list(BASELINES)), BASELINES),
        settings=settings,
        seed=seed,
        workers=_int_or_none("workers", raw.get("workers", 1)) or 1,
        images_per_site=_int_or_none("dataset.images-per-site",
                                     dataset.get("images-per-site", 240)) or 240,
        max_train_per_site=_int_or_none("dataset.max-train-per-site",
                                        dataset.get("max-train-per-site")),
        max_test=_int_or_none("dataset.max-test", dataset.get("max-test")),
        test_scanners=_choice("dataset.test-scanners", dataset.get(
            "test-scanners", "sites" if kind == "synthetic" else "original"), TEST_SCANNERS),
        profiles=_profiles(raw.get("profiles")),
        folds=_folds(raw.get("folds")),
        report=_flag("report", raw.get("report", True)),
    )


def _write_federation(cfg: ExperimentConfig, root: Path):  # noqa: ANN202 - a Federation
    from .image_folder import load_image_folder
    from .medmnist import write_medmnist_federation
    from .synthetic import generate_synthetic_federation

    if cfg.kind == "synthetic":
        return generate_synthetic_federation(
            root, num_sites=cfg.sites, images_per_site=cfg.images_per_site,
            image_size=max(128, cfg.settings.image_size), seed=cfg.seed, workers=cfg.workers,
            profiles=cfg.profiles, overwrite=True,
            test_profile=ORIGINAL_PIXELS if cfg.test_scanners == "original" else None)
    if cfg.kind == "dicom":
        names = cfg.settings.classes if cfg.settings.class_names else None
        return load_dicom_folder(cfg.path, class_names=names)
    source: Any = cfg.path
    if cfg.kind == "image-folder":
        source = load_image_folder(cfg.path, seed=cfg.seed)
    return write_medmnist_federation(
        source, root, num_sites=cfg.sites, alpha=cfg.alpha, scheme=cfg.scheme, seed=cfg.seed,
        min_per_site=cfg.min_per_site, max_train_per_site=cfg.max_train_per_site,
        max_test=cfg.max_test, workers=cfg.workers, overwrite=True, profiles=cfg.profiles,
        test_profile=ORIGINAL_PIXELS if cfg.test_scanners == "original" else None)


def _folder(label: str) -> str:
    """A strategy label as a folder name (``fedprox(mu=0.1)`` -> ``fedprox_mu_0.1``)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in label).strip("_")


def _headline(row: Mapping[str, Any]) -> dict[str, Any]:
    """AUC, accuracy, sensitivity, specificity, F1 (macro for more than two classes)."""
    out = {}
    for key in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
        value = row.get(key, row.get(f"macro-{key}"))
        out[key] = None if value is None else float(value)
    for key in ("auc-ci-low", "auc-ci-high", "accuracy-ci-low", "accuracy-ci-high"):
        if key in row:
            out[key] = float(row[key])
    return out


def _train_schedule(settings: Settings, images: np.ndarray, labels: np.ndarray,
                    device: Any, *, sites: int = 1) -> Any:
    """Train one model on ``images`` with the federated run's schedule, round by round.

    With ``local-steps``, each round is ``sites`` x local-steps batches: what the ``sites``
    sites the images come from train together in one round.
    """
    import torch

    torch.manual_seed(settings.seed)
    model = model_from_settings(settings)
    for r in range(settings.num_server_rounds):
        train_local(
            model, images, labels, epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate * settings.lr_decay ** r,
            optimizer=settings.optimizer, momentum=settings.momentum,
            weight_decay=settings.weight_decay, device=device, amp=settings.amp,
            channels_last=settings.channels_last, seed=settings.seed + r + 1,
            augment=settings.augment, logit_adjust=settings.logit_adjust,
            steps=settings.local_steps * sites or None)
    return model


def _save_model(model: Any, settings: Settings, path: Path) -> None:
    """A baseline's model in the checkpoint form ``fedrad evaluate`` and ``predict`` read."""
    from fedrad.server.checkpoint import atomic_torch_save

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"round": settings.num_server_rounds, "state_dict": state,
                       "run_config": settings.to_run_config()}, path)


def _score(model: Any, settings: Settings, cache: Any, device: Any) -> dict[str, Any]:
    scores = predict_scores(model, np.asarray(cache.images), device=device, amp=settings.amp,
                            channels_last=settings.channels_last)
    counts = count_outcomes(scores, np.asarray(cache.labels), bins=settings.score_bins)
    return pooled_metrics(counts, class_names=settings.classes)


def _site_train_split(site: SiteContext, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    cache = load_cache(site.data_dir)
    labels = np.asarray(cache.labels)
    train_idx, _ = site_split(labels, settings)
    return np.asarray(cache.images[train_idx]), labels[train_idx]


def _plot(curves: Mapping[str, list[float]], flat: Mapping[str, float], out: Path,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=f"{name} (federated)")
    styles = iter(["--", ":", "-."])
    for name, value in flat.items():
        ax.axhline(value, linestyle=next(styles, "--"), color="grey", label=name)
    # Room above and below every curve and baseline: a baseline at the top of the data
    # range would otherwise be drawn on the frame.
    values = [v for c in curves.values() for v in c] + list(flat.values())
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.05 * (hi - lo), 0.005)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("round")
    ax.set_ylabel("central test AUC")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _run_fold(cfg: ExperimentConfig, base: Settings, sites: Mapping[int, SiteContext],
              central: Any, central_dir: str, out: Path, say: Callable[[str], None],
              ) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, float]]:
    """Every strategy and baseline on one split of the sites' data (one fold, or the only one).

    Returns the result rows, the federated runs' central AUC per round and the baselines'
    central AUC (the flat lines of the comparison plot).
    """
    device = select_device("auto")
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    classes = {"num_classes": base.num_classes, "class_names": base.class_names,
               "cv_folds": base.cv_folds, "cv_fold": base.cv_fold}
    for run in cfg.strategies:
        strategy = run.label
        settings = run.settings.replace(out_dir=str(out / _folder(strategy)),
                                        central_eval_dir=central_dir, **classes)
        reports: list[RoundReport] = []
        say(f"[{strategy}] {settings.num_server_rounds} rounds over {len(sites)} sites"
            + ("" if settings.secure_aggregation else ", secure aggregation off"))
        t0 = time.perf_counter()
        run_in_simulation(make_server_app(settings, on_round=reports.append),
                          make_client_app(sites, threads=1), num_sites=len(sites))
        if len(reports) < settings.num_server_rounds:
            raise FedradError("run-failed", f"{strategy}: {len(reports)} of "
                              f"{settings.num_server_rounds} rounds completed; see the log")
        curves[strategy] = [float(_headline(r.rows["central"])["auc"]) for r in reports]
        rows.append({"name": strategy, "kind": "federated",
                     "seconds": round(time.perf_counter() - t0, 1),
                     **_headline(reports[-1].rows["central"])})
        say(f"[{strategy}] central AUC {rows[-1]['auc']:.4f}")
    flat: dict[str, float] = {}
    if "pooled" in cfg.baselines:
        t0 = time.perf_counter()
        parts = [_site_train_split(s, base) for s in sites.values()]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        say(f"[pooled] training on all {len(labels)} site training images together")
        model = _train_schedule(base, images, labels, device, sites=len(sites))
        _save_model(model, base, out / "pooled" / "model-latest.pt")
        rows.append({"name": "pooled", "kind": "baseline",
                     "seconds": round(time.perf_counter() - t0, 1),
                     **_headline(_score(model, base, central, device))})
        flat["pooled"] = rows[-1]["auc"]
        say(f"[pooled] central AUC {rows[-1]['auc']:.4f}")
    if "local" in cfg.baselines:
        local_aucs = []
        for site in sites.values():
            t0 = time.perf_counter()
            images, labels = _site_train_split(site, base)
            model = _train_schedule(base, images, labels, device)
            rows.append({"name": f"local:{site.site_id}", "kind": "baseline",
                         "seconds": round(time.perf_counter() - t0, 1),
                         **_headline(_score(model, base, central, device))})
            local_aucs.append(rows[-1]["auc"])
            say(f"[local {site.site_id}] central AUC {rows[-1]['auc']:.4f}")
        flat["local (mean)"] = float(np.mean(local_aucs))
    return rows, curves, flat


def _fold_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per strategy or baseline: the mean and standard deviation over the folds."""
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        summary: dict[str, Any] = {"name": name, "kind": mine[0]["kind"], "fold": "mean",
                                   "seconds": round(sum(r["seconds"] for r in mine), 1)}
        for key in ("auc", "accuracy", "sensitivity", "specificity", "f1"):
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                summary[key] = float(np.mean(values))
                summary[f"{key}-sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out.append(summary)
    return out


def _fold_label(fold: Any, folds: int) -> str:
    if fold is None:
        return ""
    return f" (mean of {folds} folds)" if fold == "mean" else f" (fold {fold})"


def _write_report(cfg: ExperimentConfig, base: Settings, sites: Mapping[int, SiteContext],
                  central_dir: str, out: Path, rows: list[dict[str, Any]],
                  say: Callable[[str], None]) -> Path:
    """``report.html`` from the final models (with folds: those of fold 1)."""
    from fedrad.common.inference import load_checkpoint_model

    from .report import write_report

    first = out / "fold-1" if cfg.folds else out
    runs = {r.label: first / _folder(r.label) for r in cfg.strategies}
    if "pooled" in cfg.baselines:
        runs["pooled"] = first / "pooled"
    models = {name: load_checkpoint_model(folder / "model-latest.pt", device="cpu").model
              for name, folder in runs.items()}
    say("writing the report: final models on the central test set, the sites' hold-out, "
        "perturbed images and heatmaps")
    settings = base.replace(cv_folds=cfg.folds, cv_fold=0) if cfg.folds else base
    path = write_report(
        out, title=cfg.name, settings=settings, models=models, central_dir=Path(central_dir),
        site_dirs={s.site_id: s.data_dir for s in sites.values()},
        histories={r.label: runs[r.label] for r in cfg.strategies},
        rows=[{**r, "name": r["name"] + _fold_label(r.get("fold"), cfg.folds)}
              for r in rows if r.get("fold") in (None, 1, "mean")])
    say(f"report: {path}")
    return path


def run_experiment(cfg: ExperimentConfig, out_dir: str | os.PathLike[str], *,
                   say: Callable[[str], None] = log.info) -> ExperimentResult:
    """Run every strategy and baseline of ``cfg``; write results under ``out_dir``.

    With ``folds: k`` every strategy and baseline runs once per fold (each site's held-out
    split is that fold), under ``out_dir/fold-N``; ``results`` add a mean and standard
    deviation row per strategy and baseline, and the curves are the folds' mean.
    """
    started = time.perf_counter()
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    say(f"Experiment {cfg.name}: {cfg.sites} sites from {cfg.path or 'synthetic phantoms'}")
    federation = _write_federation(cfg, out / "sites")
    say(federation.description)
    base = cfg.settings
    if len(federation.class_names) != base.num_classes or not base.class_names:
        base = base.replace(num_classes=len(federation.class_names),
                            class_names=",".join(federation.class_names))
    _, sites, central_dir = prepare_federation(federation, out / "caches", base,
                                               workers=cfg.workers, say=say)
    if not central_dir:
        raise FedradError("no-test-set", "the federation has no central test set to score on")
    central = load_cache(central_dir)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    flat: dict[str, float] = {}
    for fold in range(cfg.folds) if cfg.folds else [None]:
        if fold is None:
            fold_base, fold_out = base, out
        else:
            say(f"cross-validation fold {fold + 1} of {cfg.folds}")
            fold_base = base.replace(cv_folds=cfg.folds, cv_fold=fold)
            fold_out = out / f"fold-{fold + 1}"
        got = _run_fold(cfg, fold_base, sites, central, central_dir, fold_out, say)
        for row in got[0]:
            rows.append(row if fold is None else {**row, "fold": fold + 1})
        for name, curve in got[1].items():
            curves.setdefault(name, []).append(curve)
        for name, value in got[2].items():
            flat.setdefault(name, []).append(value)
    curves = {k: [float(v) for v in np.mean(c, axis=0)] for k, c in curves.items()}
    flat = {k: float(np.mean(v)) for k, v in flat.items()}
    if cfg.folds:
        rows.extend(_fold_summary(rows))
    (out / "results.json").write_text(json.dumps(
        {"name": cfg.name, "settings": base.to_run_config(), "rows": rows, "curves": curves},
        indent=2))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("name", "kind"), k))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    _plot(curves, flat, out / "comparison.png", f"{cfg.name}: central test AUC")
    if cfg.report:
        _write_report(cfg, base, sites, central_dir, out, rows, say)
    return ExperimentResult(out_dir=out, rows=rows, curves=curves,
                            seconds=time.perf_counter() - started)
