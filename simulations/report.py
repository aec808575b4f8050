"""The researcher's report of a ``fedrad simulate`` run: one self-contained ``report.html``.

:func:`write_report` scores every final model of an experiment on the central test set and
on each site's held-out split, and writes into the run's folder ``report.html`` (every
picture embedded as a base64 PNG, no script, no style sheet or font from the network, so
the single file can be mailed and opens offline), ``report.json`` (the tables' numbers)
and the PNGs themselves:

``curves.png``
    pooled (sites' held-out splits) and central AUC, accuracy, sensitivity, specificity
    and F1 per round of each federated strategy, from its ``metrics.json``;
``roc.png``
    (two classes) every model's ROC curve on the central test set, AUC and 95 % interval
    in the legend; ``roc-<model>.png`` and ``confusion-<model>.png`` are the pictures
    ``fedrad evaluate`` draws (:func:`~fedrad.common.inference.plot_roc`,
    :func:`~fedrad.common.inference.plot_confusion`);
``robustness.png``
    AUC and accuracy under test-time Gaussian noise, contrast reduction and blur
    (:data:`PERTURBATIONS`) at three severities;
``heatmaps-<model>.png``
    a few central test images per class with Grad-CAM (CNNs) or attention rollout
    (``vit_tiny``) maps, the same images for every model.

Tables: results as the experiment recorded them; AUC with its 95 % interval per model (and
per class for more than two classes); each model on each site's held-out split (the split
the sites evaluate on, :func:`~fedrad.common.splits.site_split`); per modality and per
subgroup (sex, age band) on the central test set; errors (false positives and negatives,
or misclassified images per true class) by site and by modality.  Every metric is
:func:`~fedrad.common.metrics.pooled_metrics` of outcome counts, the numbers the server
reports; for more than two classes sensitivity, specificity and F1 are macro averages over
the classes (per modality or subgroup: over the classes present in it).

Modality: the cache manifest's per-image ``modality`` (the DICOM header's).  When every
class is a MedNIST class the modality follows the class (:data:`MEDNIST_MODALITIES`):
the simulated sites' DICOM headers carry their scanner profile's modality, not the source
image's.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrad.common.cache import SiteCache, load_cache
from fedrad.common.config import Settings
from fedrad.common.errors import ConfigError, FedradError
from fedrad.common.heatmaps import (
    CAM_LAYERS,
    MIN_CAM_SIDE,
    cam_layer,
    compute_heatmaps,
    heatmap_grid_png,
    heatmap_method,
)
from fedrad.common.inference import plot_confusion, plot_roc, roc_curve_points
from fedrad.common.metrics import (
    OutcomeCounts,
    count_outcomes,
    hanley_mcneil_interval,
    pooled_metrics,
)
from fedrad.common.models import model_from_settings
from fedrad.common.splits import site_split
from fedrad.common.training import normalize_batch, predict_scores, select_device
from fedrad.server.evaluator import MetricsLog

from .image_folder import MEDNIST_MODALITIES

__all__ = ["PERTURBATIONS", "REPORT_FILE", "perturb", "write_report"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
REPORT_JSON = "report.json"

#: Test-time perturbations: name -> (parameter per severity 1, 2, 3; what the parameter is).
#: Severity 0 is the clean image.
PERTURBATIONS: dict[str, tuple[tuple[float, ...], str]] = {
    "gaussian-noise": ((0.04, 0.08, 0.16), "noise std (fraction of full scale)"),
    "contrast": ((0.75, 0.5, 0.25), "contrast factor around each image's mean"),
    "blur": ((0.5, 1.0, 2.0), "Gaussian blur sigma (pixels)"),
}

_SUBGROUP_FIELDS = ("sex", "age_band")
_NO_SUBGROUPS = ("No subgroup fields in this data: the caches carry no sex or age band "
                 "(sites keep them only with 'fedrad site prepare --subgroup-fields').")


# ------------------------------------------------------------------------- helpers


def _headline_keys(num_classes: int) -> dict[str, str]:
    """Display name -> pooled_metrics key (macro averages for more than two classes)."""
    if num_classes == 2:
        return {"AUC": "auc", "accuracy": "accuracy", "sensitivity": "sensitivity",
                "specificity": "specificity", "F1": "f1"}
    return {"AUC": "macro-auc", "accuracy": "accuracy", "sensitivity": "macro-sensitivity",
            "specificity": "macro-specificity", "F1": "macro-f1"}


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    v = _float(value)
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _file_stem(name: str) -> str:
    """A model name as a file-name part (``local:site-1`` -> ``local-site-1``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    return plt


def _load(what: str, path: Path) -> SiteCache:
    try:
        return load_cache(path)
    except FedradError as err:
        raise FedradError(err.code, f"report: the {what} cache cannot be used: {err.message}",
                          local_detail=err.local_detail or str(path)) from err


def _check_cache(what: str, cache: SiteCache, settings: Settings) -> None:
    if cache.num_classes != settings.num_classes:
        raise FedradError(
            "class-mismatch",
            f"report: the {what} cache has {cache.num_classes} classes but the settings "
            f"{settings.num_classes} ({', '.join(settings.classes)}); give the caches the "
            "experiment trained and scored on", local_detail=str(cache.path))
    if cache.image_size != settings.image_size:
        raise FedradError(
            "size-mismatch",
            f"report: the {what} cache holds {cache.image_size} px images but the settings' "
            f"image-size is {settings.image_size}; give the caches prepared for this run",
            local_detail=str(cache.path))


def _check_models(models: Mapping[str, torch.nn.Module], settings: Settings) -> None:
    if not models:
        raise ConfigError("report: no models given; pass the final model of each strategy "
                          "and baseline (name -> torch module)")
    shell = model_from_settings(settings, initialise=False)  # only its shapes are read
    reference = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    for name, model in models.items():
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"report: model {name!r} is a {type(model).__name__}, not a "
                              "torch.nn.Module")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if shapes == reference:
            continue
        missing = sorted(set(reference) - set(shapes))
        wrong = sorted(k for k in set(reference) & set(shapes) if reference[k] != shapes[k])
        detail = (f"tensor {wrong[0]} has shape {shapes[wrong[0]]}, expected "
                  f"{reference[wrong[0]]}" if wrong else
                  f"tensor {missing[0]} is missing" if missing else
                  f"it has extra tensors ({sorted(set(shapes) - set(reference))[0]}, ...)")
        raise FedradError(
            "model-mismatch",
            f"report: model {name!r} does not fit the settings ({settings.model}, "
            f"{settings.num_classes} classes, {settings.image_size} px, stem {settings.stem}): "
            f"{detail}")


def _metrics(counts: OutcomeCounts, settings: Settings) -> dict[str, Any]:
    return pooled_metrics(counts, class_names=settings.classes)


def _subset_metrics(scores: np.ndarray, labels: np.ndarray, settings: Settings
                    ) -> dict[str, Any]:
    """Headline metrics of a subset; for more than two classes macro over classes present."""
    counts = count_outcomes(scores, labels, bins=settings.score_bins)
    m = _metrics(counts, settings)
    out: dict[str, Any] = {"n": counts.n, "accuracy": m["accuracy"]}
    if settings.num_classes == 2:
        out.update({k: m[k] for k in ("sensitivity", "specificity", "f1", "auc")})
        return out
    present = [c for i, c in enumerate(settings.classes) if counts.confusion[i].sum() > 0]
    for key in ("sensitivity", "specificity", "f1", "auc"):
        values = [_float(m[f"{c}/{key}"]) for c in present]
        values = [v for v in values if math.isfinite(v)]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def _errors(scores: np.ndarray, labels: np.ndarray, settings: Settings) -> dict[str, int]:
    """False positives / negatives (two classes) or misclassified images per true class."""
    pred = np.argmax(scores, axis=1) if len(labels) else np.zeros(0, np.int64)
    out = {"n": int(len(labels))}
    if settings.num_classes == 2:
        out["false positives"] = int(np.sum((pred == 1) & (labels == 0)))
        out["false negatives"] = int(np.sum((pred == 0) & (labels == 1)))
        return out
    for i, name in enumerate(settings.classes):
        is_class = labels == i
        out[f"{name} misclassified"] = int(np.sum(is_class & (pred != i)))
        out[f"{name} n"] = int(np.sum(is_class))
    return out


def _modalities(cache: SiteCache, settings: Settings) -> tuple[np.ndarray, str]:
    """Modality name of every image of ``cache`` and where it came from."""
    classes = settings.classes
    if all(c in MEDNIST_MODALITIES for c in classes):
        names = np.asarray([MEDNIST_MODALITIES[c] for c in classes])
        return names[np.asarray(cache.labels)], "the MedNIST class of each image"
    records = cache.meta.get("records") or []
    if len(records) != len(cache):
        return np.full(len(cache), "unknown"), "not recorded in the cache"
    return (np.asarray([str(r.get("modality") or "unknown") for r in records]),
            "the DICOM header's Modality (cache manifest)")


def _subgroups(cache: SiteCache) -> dict[str, np.ndarray]:
    """Subgroup field -> value per image, for the fields any image of the cache carries."""
    records = cache.meta.get("records") or []
    out: dict[str, np.ndarray] = {}
    if len(records) != len(cache):
        return out
    for field in _SUBGROUP_FIELDS:
        values = [r.get(field) for r in records]
        if any(v not in (None, "") for v in values):
            out[field] = np.asarray([str(v) if v not in (None, "") else "unknown"
                                     for v in values])
    return out


def perturb(images: np.ndarray, kind: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """A test-time perturbation of uint8 ``[N, H, W]`` images (severity 0: the images).

    ``kind`` is one of :data:`PERTURBATIONS`; severities 1-3 use its parameters.  Gaussian
    noise is drawn from ``numpy.random.default_rng([seed, severity])``, so the same call
    always gives the same images.
    """
    if kind not in PERTURBATIONS:
        raise ConfigError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")
    params = PERTURBATIONS[kind][0]
    if not 0 <= severity <= len(params):
        raise ConfigError(f"severity must be 0..{len(params)}, got {severity}")
    images = np.asarray(images)
    if severity == 0:
        return images
    p = params[severity - 1]
    x = images.astype(np.float32)
    if kind == "gaussian-noise":
        rng = np.random.default_rng([seed, severity])
        x = x + rng.normal(0.0, p * 255.0, size=x.shape).astype(np.float32)
    elif kind == "contrast":
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = mean + p * (x - mean)
    else:
        from scipy.ndimage import gaussian_filter

        x = gaussian_filter(x, sigma=(0.0, p, p), mode="nearest")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _cam_grid(model: torch.nn.Module, layer: str, x: torch.Tensor) -> tuple[int, int]:
    """Spatial size of ``layer``'s output (the one Grad-CAM explains) for one input."""
    module = dict(model.named_modules())[layer]
    shape: list[tuple[int, int]] = []
    hook = module.register_forward_hook(
        lambda _m, _i, out: shape.append((int(out.shape[-2]), int(out.shape[-1]))))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(x[:1])
    finally:
        hook.remove()
        model.train(was_training)
    return shape[0]


def _sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, 7])
    chosen: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.extend(int(i) for i in rng.permutation(idx)[:per_class])
    return sorted(chosen)


# -------------------------------------------------------------------------- plots


def _plot_curves(path: Path, logs: Mapping[str, MetricsLog], settings: Settings) -> Path | None:
    keys = _headline_keys(settings.num_classes)
    series = []
    for name, mlog in logs.items():
        for scope, style in (("pooled", "-o"), ("central", "--s")):
            rounds = [r for r in mlog.rounds() if scope in mlog.round_rows(r)]
            if rounds:
                series.append((name, scope, style, rounds,
                               [mlog.round_rows(r)[scope] for r in rounds]))
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    strategy_colour = {n: colours[i % len(colours)] for i, n in enumerate(logs)}
    handles = []
    for ax, (label, key) in zip(axes.ravel(), keys.items(), strict=False):
        for name, scope, style, rounds, rows in series:
            values = [_float(r.get(key)) for r in rows]
            (line,) = ax.plot(rounds, values, style, color=strategy_colour[name], markersize=4,
                              linewidth=1.5, label=f"{name}, {scope}")
            if label == "AUC":
                handles.append(line)
        ax.set_title(label if settings.num_classes == 2 or label == "accuracy"
                     else f"macro {label}", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    legend_ax = axes.ravel()[-1]
    legend_ax.axis("off")
    legend_ax.legend(handles=handles, loc="center", fontsize=9, frameon=False,
                     title="strategy, scope\n(pooled: sites' held-out splits;\n"
                     "central: the coordinator's test set)", title_fontsize=9)
    fig.suptitle("Metrics per round", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_roc_comparison(path: Path, counts: Mapping[str, OutcomeCounts],
                         metrics: Mapping[str, dict[str, Any]], title: str) -> Path:
    """Every model's ROC curve of the positive class on one axis (two classes)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for name, c in counts.items():
        fpr, tpr = roc_curve_points(c, 1)
        if np.isnan(fpr).all():
            continue
        m = metrics[name]
        ax.plot(fpr, tpr, linewidth=1.8,
                label=f"{name}: AUC {_fmt(m['auc'])} "
                f"({_fmt(m['auc-ci-low'])}-{_fmt(m['auc-ci-high'])})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8, title="AUC (95 % CI)", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_robustness(path: Path, table: list[dict[str, Any]], names: Sequence[str]) -> Path:
    plt = _pyplot()
    kinds = list(PERTURBATIONS)
    fig, axes = plt.subplots(2, len(kinds), figsize=(4.0 * len(kinds), 6.4), squeeze=False)
    for col, kind in enumerate(kinds):
        params, what = PERTURBATIONS[kind]
        for name in names:
            rows = sorted((r for r in table if r["model"] == name and r["perturbation"] == kind),
                          key=lambda r: r["severity"])
            sev = [r["severity"] for r in rows]
            for row_i, key in enumerate(("auc", "accuracy")):
                axes[row_i, col].plot(sev, [_float(r[key]) for r in rows], "-o", markersize=4,
                                      label=name)
        for row_i, key in enumerate(("AUC", "accuracy")):
            ax = axes[row_i, col]
            ax.set_xticks(range(len(params) + 1),
                          ["0"] + [f"{s}\n({p:g})" for s, p in enumerate(params, 1)])
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.set_ylabel(key)
            if row_i == 0:
                ax.set_title(f"{kind}\n({what})", fontsize=9)
            else:
                ax.set_xlabel("severity (parameter)")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Robustness on the central test set", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- HTML


_CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc;
  margin-top: 2em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
td.l { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
.grid img { max-width: 580px; }
p.note { font-size: 0.9em; color: #444; }
"""


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for value in row:
            text = value if isinstance(value, str) else _fmt(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "</table>\n"


def _img(path: Path, caption: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(path.name)}">{cap}</figure>')


@dataclass
class _Scored:
    """One model's scores on the central test set."""

    scores: np.ndarray
    counts: OutcomeCounts
    metrics: dict[str, Any]


# ------------------------------------------------------------------------ the report


def write_report(
    out_dir: Path,
    *,
    title: str,
    settings: Settings,
    models: Mapping[str, torch.nn.Module],
    central_dir: Path,
    site_dirs: Mapping[str, Path],
    histories: Mapping[str, Path],
    rows: list[dict],
    device: str | torch.device = "auto",
    heatmaps_per_class: int = 2,
    robustness_max_images: int | None = 500,
    batch_size: int = 256,
) -> Path:
    """Write ``report.html`` (self-contained), ``report.json`` and the PNGs into ``out_dir``.

    Parameters
    ----------
    out_dir:
        The experiment's output folder (created if needed).
    title:
        The report's heading (the experiment's name).
    settings:
        The run settings every model was built and trained with.
    models:
        Name -> final model (``{"fedavg": ..., "pooled": ..., "local:site-1": ...}``).
    central_dir:
        The coordinator's prepared test cache.
    site_dirs:
        Site id -> that site's prepared cache; models are scored on its held-out split.
    histories:
        Federated strategy name -> its server out-dir (holding ``metrics.json``).
    rows:
        The experiment's results rows (name, kind, seconds, auc, accuracy, ...).
    device:
        Where to score (``auto``: CUDA when available); models are moved back after.
    heatmaps_per_class:
        Central test images per class shown with their heatmaps (0: none).
    robustness_max_images:
        Score the perturbations on a seeded sample of at most this many central test
        images (None: all).
    batch_size:
        Images per forward pass.

    Returns
    -------
    Path
        The ``report.html`` path.

    Raises
    ------
    FedradError
        ``no-cache`` / ``bad-cache`` naming the central or site cache that is missing or
        unusable, ``class-mismatch`` / ``size-mismatch`` when a cache does not fit the
        settings, ``model-mismatch`` when a model does not fit them, ``bad-metrics-file``
        naming the strategy whose history cannot be read.
    ConfigError
        No models, or a model that is not a torch module.
    """
    out = Path(out_dir)
    central = _load("central test set", Path(central_dir))
    _check_cache("central test set", central, settings)
    sites: dict[str, SiteCache] = {}
    for site_id, path in site_dirs.items():
        sites[site_id] = _load(f"site {site_id!r}", Path(path))
        _check_cache(f"site {site_id!r}", sites[site_id], settings)
    _check_models(models, settings)
    logs: dict[str, MetricsLog] = {}
    for name, path in histories.items():
        try:
            logs[name] = MetricsLog.load(path)
        except FedradError as err:
            raise FedradError(err.code, f"report: the history of strategy {name!r} cannot be "
                              f"read: {err.message}") from err
    out.mkdir(parents=True, exist_ok=True)
    dev = select_device(device)
    classes = settings.classes
    binary = settings.num_classes == 2
    keys = _headline_keys(settings.num_classes)
    home = {name: next(m.parameters(), torch.empty(0)).device for name, m in models.items()}

    def score(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, settings.num_classes))
        return predict_scores(model, images, batch_size=batch_size, device=dev,
                              amp=settings.amp, channels_last=settings.channels_last)

    central_images = np.asarray(central.images)
    central_labels = np.asarray(central.labels)
    log.info("report: scoring %d model(s) on %d central test images", len(models),
             len(central_labels))
    scored: dict[str, _Scored] = {}
    for name, model in models.items():
        s = score(model, central_images)
        counts = count_outcomes(s, central_labels, bins=settings.score_bins)
        scored[name] = _Scored(s, counts, _metrics(counts, settings))

    # site hold-outs
    site_table: list[dict[str, Any]] = []
    site_errors: list[dict[str, Any]] = []
    for site_id, cache in sites.items():
        labels = np.asarray(cache.labels)
        _, val_idx = site_split(labels, settings)
        images = np.asarray(cache.images[val_idx])
        log.info("report: scoring on site %s's held-out split (%d images)", site_id,
                 len(val_idx))
        for name, model in models.items():
            s = score(model, images)
            site_table.append({"model": name, "site": site_id,
                               **_subset_metrics(s, labels[val_idx], settings)})
            site_errors.append({"model": name, "site": site_id,
                                **_errors(s, labels[val_idx], settings)})

    # modality and subgroups, on the central test set
    modality, modality_source = _modalities(central, settings)
    modality_table: list[dict[str, Any]] = []
    modality_errors: list[dict[str, Any]] = []
    for name, sc in scored.items():
        for value in sorted(set(modality.tolist())):
            keep = modality == value
            modality_table.append({"model": name, "modality": value,
                                   **_subset_metrics(sc.scores[keep], central_labels[keep],
                                                     settings)})
            modality_errors.append({"model": name, "modality": value,
                                    **_errors(sc.scores[keep], central_labels[keep], settings)})
    groups = _subgroups(central)
    subgroup_table: list[dict[str, Any]] = []
    for name, sc in scored.items():
        for field, values in groups.items():
            for value in sorted(set(values.tolist())):
                keep = values == value
                subgroup_table.append({"model": name, "field": field, "value": value,
                                       **_subset_metrics(sc.scores[keep], central_labels[keep],
                                                         settings)})

    # robustness
    rob_idx = np.arange(len(central_labels))
    if robustness_max_images is not None and len(rob_idx) > robustness_max_images:
        rng = np.random.default_rng([settings.seed, 3])
        rob_idx = np.sort(rng.choice(len(rob_idx), robustness_max_images, replace=False))
    rob_images = central_images[rob_idx]
    rob_labels = central_labels[rob_idx]
    log.info("report: robustness on %d central test images, %d perturbations x %d "
             "severities", len(rob_idx), len(PERTURBATIONS), 3)
    robustness: list[dict[str, Any]] = []
    for name, model in models.items():
        log.info("report: robustness of %s", name)
        clean: dict[str, Any] | None = None
        for kind, (params, _) in PERTURBATIONS.items():
            for severity in range(len(params) + 1):
                if severity == 0 and clean is not None:
                    m = clean
                else:
                    x = perturb(rob_images, kind, severity, seed=settings.seed)
                    counts = count_outcomes(score(model, x), rob_labels,
                                            bins=settings.score_bins)
                    m = _metrics(counts, settings)
                    if severity == 0:
                        clean = m
                robustness.append({
                    "model": name, "perturbation": kind, "severity": severity,
                    "parameter": 0.0 if severity == 0 else params[severity - 1],
                    "n": m["n"], "auc": m[keys["AUC"]], "accuracy": m["accuracy"]})

    # pictures
    pngs: dict[str, Path] = {}
    curves = _plot_curves(out / "curves.png", logs, settings)
    if binary:
        pngs["roc"] = _plot_roc_comparison(out / "roc.png",
                                           {n: s.counts for n, s in scored.items()},
                                           {n: s.metrics for n, s in scored.items()},
                                           f"{title}: central test set (n = {len(central)})")
    for name, sc in scored.items():
        stem = _file_stem(name)
        plot_roc(out / f"roc-{stem}.png", sc.counts, classes, sc.metrics,
                 title=f"{name}: central test set")
        plot_confusion(out / f"confusion-{stem}.png", sc.counts, classes,
                       title=f"{name}: central test set (n = {sc.counts.n})")
    pngs["robustness"] = _plot_robustness(out / "robustness.png", robustness, list(models))
    heat_files: dict[str, Path] = {}
    heat_note = ""
    chosen = _sample_per_class(central_labels, heatmaps_per_class, settings.seed) \
        if heatmaps_per_class > 0 else []
    method = heatmap_method(settings.model) if chosen else ""
    for name, model in models.items():
        if not chosen:
            break
        sc = scored[name]
        pred = [int(np.argmax(sc.scores[i])) for i in chosen]
        x = normalize_batch(torch.from_numpy(np.ascontiguousarray(central_images[chosen])),
                            dev)
        model.to(dev)
        if not heat_note and settings.model in CAM_LAYERS:
            layer = cam_layer(model, settings.model, settings.image_size)
            h, w = _cam_grid(model, layer, x)
            if layer != CAM_LAYERS[settings.model]:
                heat_note = (f"Grad-CAM explains {layer} ({h}x{w} map): at "
                             f"{settings.image_size} px with stem {settings.stem} the last "
                             f"block ({CAM_LAYERS[settings.model]}) is too coarse to show "
                             "where the model looked.")
            if min(h, w) < MIN_CAM_SIDE:
                heat_note = (f"Grad-CAM explains a {h}x{w} feature map ({layer} at "
                             f"{settings.image_size} px with stem {settings.stem}): these maps "
                             "carry little spatial information; a larger image-size or the "
                             "'small' stem gives a finer map.")
                log.warning("report: %s", heat_note)
        maps = compute_heatmaps(model, settings.model, x, target=pred).cpu().numpy()
        titles = [f"true {classes[central_labels[i]]}\npred {classes[p]} "
                  f"p={sc.scores[i, p]:.2f}" for i, p in zip(chosen, pred, strict=True)]
        heat_files[name] = heatmap_grid_png(
            out / f"heatmaps-{_file_stem(name)}.png", [central_images[i] for i in chosen],
            list(maps), titles, suptitle=f"{name}: {method}")
    for name, model in models.items():
        model.to(home[name])

    tables = {
        "title": title, "class_names": classes, "modality_source": modality_source,
        "central": {n: {k: s.metrics.get(k) for k in ("n", *keys.values(), "auc-ci-low",
                                                       "auc-ci-high")}
                    for n, s in scored.items()},
        "per_site": site_table, "per_modality": modality_table,
        "errors_by_site": site_errors, "errors_by_modality": modality_errors,
        "subgroups": subgroup_table, "robustness": robustness,
    }
    (out / REPORT_JSON).write_text(json.dumps(_json_safe(tables), indent=1) + "\n",
                                   encoding="utf-8")

    # the HTML
    metric_cols = ["n", "accuracy", "sensitivity", "specificity", "F1", "AUC"]
    metric_keys = ["n", "accuracy", "sensitivity", "specificity", "f1", "auc"]
    macro = "" if binary else (" Sensitivity, specificity, F1 and AUC are macro averages over "
                               "the classes present in each row.")
    parts: list[str] = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=\"note\">fedrad report, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Model {html.escape(settings.model)}, {settings.image_size} px, "
        f"{settings.num_classes} classes ({html.escape(', '.join(classes))}), "
        f"{settings.num_server_rounds} rounds x {settings.local_epochs} local epoch(s), "
        f"seed {settings.seed}. Central test set: {len(central)} images; "
        f"{len(sites)} site(s).</p>",
        "<h2 id=\"results\">Results</h2>",
    ]
    columns = ["name", "kind", "seconds", "AUC", "AUC 95 % CI", "accuracy", "sensitivity",
               "specificity", "F1"]
    parts.append(_table(columns, [[str(r.get("name", "")), str(r.get("kind", "")),
                                   _fmt(r.get("seconds"), 0), r.get("auc"),
                                   f"{_fmt(r.get('auc-ci-low'))}-{_fmt(r.get('auc-ci-high'))}",
                                   r.get("accuracy"), r.get("sensitivity"),
                                   r.get("specificity"), r.get("f1")] for r in rows]))

    parts.append("<h2 id=\"curves\">1. Metric curves per round</h2>")
    if curves is not None:
        parts.append("<p class=\"note\">Pooled: the sites' held-out splits, from the sum of "
                     "their outcome counts; central: the coordinator's test set.</p>")
        parts.append(_img(curves))
        pngs["curves"] = curves
    else:
        parts.append("<p>No federated strategy history was given.</p>")

    parts.append("<h2 id=\"roc\">2. ROC curves (central test set)</h2>")
    if binary:
        parts.append(_img(pngs["roc"], f"positive class: {classes[1]}"))
    auc_rows = []
    for name, sc in scored.items():
        m = sc.metrics
        if binary:
            auc_rows.append([name, m["n"], m["auc"],
                             f"{_fmt(m['auc-ci-low'])}-{_fmt(m['auc-ci-high'])}"])
            continue
        for k, c in enumerate(classes):
            support = int(sc.counts.confusion[k].sum())
            low, high = hanley_mcneil_interval(_float(m[f"{c}/auc"]), support,
                                               sc.counts.n - support)
            auc_rows.append([f"{name} / {c}", support, m[f"{c}/auc"],
                             f"{_fmt(low)}-{_fmt(high)}"])
        auc_rows.append([f"{name} / macro", m["n"], m["macro-auc"], ""])
    parts.append(_table(["model" if binary else "model / class (one vs rest)",
                         "n" if binary else "positives", "AUC", "95 % CI (Hanley-McNeil)"],
                        auc_rows))
    parts.append("<div class=\"grid\">" + "".join(
        _img(out / f"roc-{_file_stem(n)}.png", n) for n in scored) + "</div>")

    parts.append("<h2 id=\"confusion\">3. Confusion matrices (central test set)</h2>")
    parts.append("<div class=\"grid\">" + "".join(
        _img(out / f"confusion-{_file_stem(n)}.png", n) for n in scored) + "</div>")

    parts.append("<h2 id=\"sites\">4. Per-site held-out splits</h2>")
    split = (f"fold {settings.cv_fold} of {settings.cv_folds}" if settings.cv_folds else
             f"val-fraction {settings.val_fraction}")
    parts.append(f"<p class=\"note\">Each model on the held-out part of each site's cache "
                 f"({split}, seed {settings.seed}: the split the sites evaluate on).{macro}</p>")
    parts.append(_table(["model", "site", *metric_cols],
                        [[r["model"], r["site"], *(r[k] for k in metric_keys)]
                         for r in site_table]) if site_table else "<p>No site caches given.</p>")

    parts.append("<h2 id=\"modality\">5. Per modality (central test set)</h2>")
    parts.append(f"<p class=\"note\">Modality from {html.escape(modality_source)}.{macro}</p>")
    parts.append(_table(["model", "modality", *metric_cols],
                        [[r["model"], r["modality"], *(r[k] for k in metric_keys)]
                         for r in modality_table]))

    parts.append("<h2 id=\"errors\">6. Error analysis</h2>")
    if binary:
        parts.append(f"<p class=\"note\">Positive class: {html.escape(classes[1])}.</p>")
        err_cols = ["n", "false positives", "false negatives"]

        def err_cells(r: Mapping[str, Any]) -> list[Any]:
            return [r[k] for k in err_cols]
    else:
        parts.append("<p class=\"note\">Misclassified images of each true class, as "
                     "misclassified / images of that class.</p>")
        err_cols = ["n", *classes]

        def err_cells(r: Mapping[str, Any]) -> list[Any]:
            return [r["n"], *(f"{r[f'{c} misclassified']} / {r[f'{c} n']}"
                              if r[f"{c} n"] else "-" for c in classes)]
    parts.append("<h3>By site (held-out splits)</h3>")
    parts.append(_table(["model", "site", *err_cols],
                        [[r["model"], r["site"], *err_cells(r)] for r in site_errors])
                 if site_errors else "<p>No site caches given.</p>")
    parts.append("<h3>By modality (central test set)</h3>")
    parts.append(_table(["model", "modality", *err_cols],
                        [[r["model"], r["modality"], *err_cells(r)] for r in modality_errors]))

    parts.append("<h2 id=\"subgroups\">7. Subgroups (central test set)</h2>")
    if subgroup_table:
        parts.append(f"<p class=\"note\">Fields: {html.escape(', '.join(groups))}.{macro}</p>")
        parts.append(_table(["model", "field", "value", *metric_cols],
                            [[r["model"], r["field"], r["value"],
                              *(r[k] for k in metric_keys)] for r in subgroup_table]))
    else:
        parts.append(f"<p>{html.escape(_NO_SUBGROUPS)}</p>")

    parts.append("<h2 id=\"robustness\">8. Robustness (central test set)</h2>")
    parts.append(f"<p class=\"note\">{len(rob_idx)} central test images, perturbed "
                 f"deterministically (seed {settings.seed}) before normalisation; severity 0 "
                 "is the clean image. "
                 + "; ".join(f"{k}: {w} {', '.join(f'{p:g}' for p in ps)}"
                             for k, (ps, w) in PERTURBATIONS.items()) + ".</p>")
    parts.append(_img(pngs["robustness"]))
    parts.append(_table(["model", "perturbation", "severity", "parameter", "n", "AUC",
                         "accuracy"],
                        [[r["model"], r["perturbation"], r["severity"], f"{r['parameter']:g}",
                          r["n"], r["auc"], r["accuracy"]] for r in robustness]))

    parts.append("<h2 id=\"heatmaps\">9. Heatmaps (central test set)</h2>")
    if heat_files:
        parts.append(f"<p class=\"note\">{method}: the same {len(chosen)} images for every "
                     "model (a seeded sample per class), explaining the predicted class.</p>")
        if heat_note:
            parts.append(f"<p><strong>{html.escape(heat_note)}</strong></p>")
        parts.extend(_img(p, n) for n, p in heat_files.items())
    else:
        parts.append("<p>No heatmaps (heatmaps_per_class = 0).</p>")
    parts.append("</body></html>\n")
    report = out / REPORT_FILE
    report.write_text("\n".join(parts), encoding="utf-8")
    log.info("report: wrote %s (%.1f MB)", report, report.stat().st_size / 1e6)
    return report
