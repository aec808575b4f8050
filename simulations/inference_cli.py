"""``fedrad predict``, ``fedrad evaluate`` and ``fedrad export``: use a trained global model.

They live in ``simulations`` because evaluation reads MedMNIST ``.npz`` files as well as
prepared caches; the work itself is done by :mod:`fedrad.common.inference`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedrad.common.cache import load_cache
from fedrad.common.errors import FedradError

from .medmnist import load_medmnist

if TYPE_CHECKING:
    from fedrad.common.inference import LoadedModel, Prediction

__all__ = ["predict", "evaluate", "export", "collect_files", "write_predictions_csv"]

console = Console()
log = logging.getLogger(__name__)


def _inference():
    """fedrad.common.inference, imported (with torch) only when a command runs."""
    from fedrad.common import inference

    return inference


def _heatmaps():
    from fedrad.common import heatmaps

    return heatmaps

CheckpointArg = Annotated[Path, typer.Argument(
    help="A checkpoint written by the fedrad server (model-latest.pt or "
    "checkpoints/round-NNN.pt): weights and run config.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]


def _fail(err: FedradError) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(err))}")
    if err.local_detail:
        console.print(f"  ({escape(err.local_detail)})", highlight=False)
    return typer.Exit(code=2)


def collect_files(inputs: list[Path]) -> list[Path]:
    """Files given, and every file under folders given (sorted; hidden files skipped).

    A path that does not exist is kept, so that it is reported as ``missing-file``.
    """
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file()
                                and not any(part.startswith(".") for part in
                                            p.relative_to(item).parts)))
        else:
            files.append(item)
    return files


def write_predictions_csv(path: Path, results: list[Prediction], class_names: list[str]
                          ) -> Path:
    """One row per file: probabilities, predicted class, per-stage latency, heatmap, error."""
    columns = (["file", "status"] + [f"p_{c}" for c in class_names] + ["predicted"]
               + [f"{s}_ms" for s in (*_inference().STAGES, "total")] + ["heatmap", "error"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in results:
            row: dict[str, Any] = {"file": r.file, "status": "ok" if r.ok else r.error_code,
                                   "error": r.error_message}
            if r.ok and r.probabilities is not None and r.predicted is not None:
                row.update({f"p_{c}": f"{p:.6f}" for c, p in zip(class_names, r.probabilities,
                                                                  strict=True)})
                row["predicted"] = class_names[r.predicted]
                row.update({f"{k}_ms": f"{v:.2f}" for k, v in r.timings_ms.items()})
                row["heatmap"] = r.heatmap_png
            writer.writerow(row)
    return path


def _latency_table(results: list[Prediction], device: str) -> Table:
    table = Table(title=f"per-image latency on {device} (ms, median of {len(results)})")
    for column in ("stage", "median", "min", "max"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in (*_inference().STAGES, "total"):
        values = [r.timings_ms[stage] for r in results if stage in r.timings_ms]
        if values:
            table.add_row(stage, f"{np.median(values):.1f}", f"{min(values):.1f}",
                          f"{max(values):.1f}")
    return table


def predict(
    checkpoint: CheckpointArg,
    dicom: Annotated[list[Path], typer.Argument(
        help="DICOM files, or folders whose files are all predicted.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: predictions.csv and "
                                      "heatmaps/*.png.")] = Path("predictions"),
    device: DeviceOpt = "auto",
    heatmaps: Annotated[bool, typer.Option(
        "--heatmaps/--no-heatmaps", help="Write a heatmap PNG per image (Grad-CAM for the "
        "CNNs, attention rollout for the transformer).")] = True,
    crop_square: Annotated[bool, typer.Option(
        "--crop-square", help="Centre-crop non-square images, as 'site prepare "
        "--crop-square' does; use it when the sites prepared their data so.")] = False,
) -> None:
    """Predict class probabilities, with a heatmap and per-image latency, for DICOM files.

    Writes OUT/predictions.csv (one row per file; a file that cannot be decoded gets a row
    with its reason code) and OUT/heatmaps/NNNN-<file>.png.  Exits 0 when every file was
    predicted, 1 when some could not be, 2 for a bad checkpoint or option.
    """
    try:
        loaded = _inference().load_checkpoint_model(checkpoint, device=device)
        predictor = _inference().Predictor(loaded, heatmaps=heatmaps, crop_square=crop_square)
    except FedradError as err:
        raise _fail(err) from None
    files = collect_files(dicom)
    if not files:
        console.print("[red]error:[/red] no files to predict: the folders given are empty")
        raise typer.Exit(code=2)
    out.mkdir(parents=True, exist_ok=True)
    heat_dir = out / "heatmaps"
    classes = loaded.classes
    console.print(f"{loaded.name} ({loaded.settings.image_size} px, round "
                  f"{loaded.server_round}) on {loaded.device}: {len(files)} file(s)",
                  highlight=False)
    # The first image pays for one-time setup (kernel selection, allocator): run one warm-up
    # prediction on the first decodable file, untimed, so latencies are per image.
    warmed = False
    results: list[Prediction] = []
    for index, path in enumerate(files):
        result = predictor.predict_files([path])[0]
        if result.ok and not warmed:
            warmed = True
            result = predictor.predict_files([path])[0]
        if result.ok and heatmaps and result.heatmap is not None and result.image is not None:
            name = f"{index:04d}-{path.stem}.png"
            _heatmaps().overlay_png(heat_dir / name, result.image, result.heatmap)
            result.heatmap_png = f"heatmaps/{name}"
        results.append(result)
        if result.ok and result.probabilities is not None and result.predicted is not None:
            console.print(f"  {escape(path.name)}: {classes[result.predicted]} "
                          f"(p={result.probabilities[result.predicted]:.3f}, "
                          f"{result.timings_ms['total']:.0f} ms)", highlight=False)
        else:
            console.print(f"  [yellow]{escape(path.name)}: {result.error_code}[/yellow] "
                          f"{escape(result.error_message)}", highlight=False)
    csv_path = write_predictions_csv(out / "predictions.csv", results, classes)
    ok = [r for r in results if r.ok]
    if ok:
        console.print(_latency_table(ok, str(loaded.device)))
    failed = len(results) - len(ok)
    console.print(f"{len(ok)} predicted, {failed} failed; wrote {csv_path}", highlight=False)
    if failed:
        raise typer.Exit(code=1)


def _subset(images: np.ndarray, labels: np.ndarray, what: str, max_images: int | None
            ) -> tuple[np.ndarray, np.ndarray, str]:
    if max_images is None or max_images >= len(labels):
        return images, labels, what
    keep = np.sort(np.random.default_rng(0).choice(len(labels), max_images, replace=False))
    return images[keep], labels[keep], f"{what}, random sample of {max_images} of {len(labels)}"


def _load_labelled(data: Path, loaded: LoadedModel, split: str, max_images: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, str]:
    if data.is_dir():
        cache = load_cache(data)
        if cache.num_classes != loaded.settings.num_classes:
            raise FedradError(
                "class-mismatch",
                f"the cache has {cache.num_classes} classes, the model "
                f"{loaded.settings.num_classes}; evaluate on data labelled like the "
                "federation's")
        return _subset(np.asarray(cache.images), np.asarray(cache.labels), "prepared cache",
                       max_images)
    if data.suffix.lower() == ".npz":
        dataset = load_medmnist(data)
        if dataset.num_classes != loaded.settings.num_classes:
            raise FedradError(
                "class-mismatch",
                f"{data.name} has {dataset.num_classes} classes, the model "
                f"{loaded.settings.num_classes}; evaluate on data labelled like the "
                "federation's")
        images, labels, what = _subset(*dataset.split(split), f"{data.name} ({split} split, "
                                       "preprocessed as the sites do)", max_images)
        return _inference().preprocess_images(images, loaded.settings), np.asarray(labels), what
    raise FedradError(
        "bad-data", f"--data must be a prepared cache folder (fedrad site prepare) or a "
        f"MedMNIST-format .npz file; got {data.name!r}", local_detail=str(data))


def _sample(labels: np.ndarray, scores: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` indices, spread over the classes, most confident first within each."""
    if count <= 0:
        return []
    classes = np.unique(labels)
    per = max(1, math.ceil(count / len(classes)))
    chosen: list[int] = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        order = idx[np.argsort(-scores[idx, c], kind="stable")]
        chosen.extend(int(i) for i in order[:per])
    return sorted(chosen[:count])


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return _json_safe(float(value))
    return value


def evaluate(
    checkpoint: CheckpointArg,
    data: Annotated[Path, typer.Option(
        "--data", help="A prepared cache folder (fedrad site prepare) or a MedMNIST-format "
        ".npz file.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("evaluation"),
    device: DeviceOpt = "auto",
    split: Annotated[str, typer.Option(
        "--split", help="Split of an .npz file: train, val or test.")] = "test",
    positive_class: Annotated[str, typer.Option(
        "--positive-class", help="Positive class (name or index) of a two-class model.")]
    = "1",
    heatmaps: Annotated[int, typer.Option(
        "--heatmaps", min=0, help="Images shown with their heatmaps in heatmaps.png.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    max_images: Annotated[int | None, typer.Option(
        "--max-images", min=1, help="Score a random sample (seed 0) of at most this many "
        "images, for a quick look at a large set; metrics.json records it.")] = None,
) -> None:
    """Score a checkpoint on a labelled set: pooled metrics with 95 % intervals and plots.

    Writes OUT/metrics.json, OUT/confusion.png, OUT/roc.png and OUT/heatmaps.png.
    """
    try:
        loaded = _inference().load_checkpoint_model(checkpoint, device=device)
        images, labels, what = _load_labelled(data, loaded, split, max_images)
        positive: int | str = int(positive_class) if positive_class.isdigit() else \
            positive_class
        result = _inference().evaluate_images(loaded, images, labels, batch_size=batch_size,
                                 positive_class=positive)
    except FedradError as err:
        raise _fail(err) from None
    out.mkdir(parents=True, exist_ok=True)
    names = result.class_names
    m = result.metrics
    pos_index = (names.index(positive) if isinstance(positive, str) else positive) \
        if len(names) == 2 else 1
    title = f"{loaded.name}, round {loaded.server_round}, {what}"
    _inference().plot_confusion(out / "confusion.png", result.counts, names, title=title)
    _inference().plot_roc(out / "roc.png", result.counts, names, m, positive_class=pos_index,
             title=title)
    chosen = _sample(result.labels, result.scores, heatmaps)
    if chosen:
        predictor = _inference().Predictor(loaded)
        x = predictor.input_batch(images[chosen])
        maps = predictor.heatmap(x, [int(np.argmax(result.scores[i])) for i in chosen])
        maps_np = maps.cpu().numpy()
        titles = [f"true {names[result.labels[i]]}\npred {names[int(np.argmax(result.scores[i]))]}"
                  f" p={result.scores[i].max():.2f}" for i in chosen]
        _heatmaps().heatmap_grid_png(out / "heatmaps.png", [images[i] for i in chosen],
                                     list(maps_np), titles, suptitle=title)
    report = {
        "checkpoint": str(checkpoint),
        "round": loaded.server_round,
        "model": loaded.name,
        "image_size": loaded.settings.image_size,
        "data": what,
        "class_names": names,
        "metrics": {k: _json_safe(v) for k, v in m.items()},
        "confusion": result.counts.confusion.tolist(),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = Table(title=f"{loaded.name} on {what}: n = {m['n']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95 % CI", justify="right")
    for key in ("accuracy", "sensitivity", "specificity", "precision", "npv", "f1", "auc",
                "macro-sensitivity", "macro-specificity", "macro-f1", "macro-auc"):
        if key in m:
            low, high = m.get(f"{key}-ci-low"), m.get(f"{key}-ci-high")
            ci = f"{low:.3f}-{high:.3f}" if low is not None and high is not None else ""
            table.add_row(key, f"{m[key]:.3f}", ci)
    console.print(table)
    console.print(f"wrote {out / 'metrics.json'}, confusion.png, roc.png"
                  + (", heatmaps.png" if chosen else ""), highlight=False)


def export(
    checkpoint: CheckpointArg,
    out: Annotated[Path, typer.Option("--out", help="The .onnx file to write.")]
    = Path("model.onnx"),
    opset: Annotated[int, typer.Option("--opset", min=13, help="ONNX opset version.")] = 18,
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help="Compare ONNX Runtime's logits with PyTorch's.")] = True,
) -> None:
    """Export a checkpoint's model to ONNX (dynamic batch axis) for edge devices."""
    try:
        loaded = _inference().load_checkpoint_model(checkpoint, device="cpu")
        path = _inference().export_onnx(loaded, out, opset=opset)
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): input 'image' "
                      f"[batch, 1, {loaded.settings.image_size}, {loaded.settings.image_size}]"
                      f", output 'logits' [batch, {loaded.settings.num_classes}]",
                      highlight=False)
        if check:
            diff = _inference().check_onnx(loaded, path)
            verdict = "ok" if diff <= 1e-3 else "[red]MISMATCH[/red]"
            console.print(f"ONNX Runtime vs PyTorch: max |logit difference| = {diff:.2e} "
                          f"{verdict}")
            if diff > 1e-3:
                raise typer.Exit(code=1)
    except FedradError as err:
        raise _fail(err) from None
