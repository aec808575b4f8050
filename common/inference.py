"""Use a trained global model: predict on DICOM files, evaluate on labelled images, export.

A checkpoint written by the server (``model-latest.pt`` or ``checkpoints/round-NNN.pt``)
holds the weights and the run config; :func:`load_checkpoint_model` rebuilds the model from
that config, so the architecture, input size, stem, classes and preprocessing always match
what the federation trained.

:class:`Predictor` runs one DICOM file through exactly the chain site preparation uses
(:func:`~fedrad.common.dicom.decode_dicom` -> :func:`~fedrad.common.transforms.build_preprocess`
-> uint8 quantisation -> :func:`~fedrad.common.training.normalize_batch`), then the model
(bf16 autocast and channels-last on CUDA, as in evaluation) and a heatmap
(:mod:`fedrad.common.heatmaps`), timing each stage.  With heatmaps on, one forward pass
serves both: the *model* stage is the forward pass that also records what the heatmap needs
(the explained layer's activations and the autograd graph for Grad-CAM, the attention
weights for the transformer), the *heatmap* stage the backward pass or the rollout.  A file
that cannot be decoded gives a
:class:`Prediction` carrying its :class:`~fedrad.common.dicom.DicomError` reason code; the
other files carry on.

:func:`evaluate_images` scores a labelled set into the same pooled metrics (with confidence
intervals) the server reports; :func:`roc_curve_points`, :func:`plot_confusion` and
:func:`plot_roc` draw them.  :func:`export_onnx` writes the model as ONNX for edge devices.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .cache import to_uint8
from .config import Settings, load_settings
from .dicom import DicomError, decode_dicom
from .errors import ConfigError, FedradError
from .heatmaps import (
    GradCam,
    attention_maps,
    cam_layer,
    compute_heatmaps,
    heatmap_method,
    rollout_maps,
)
from .metrics import OutcomeCounts, count_outcomes, pooled_metrics
from .models import model_from_settings
from .training import normalize_batch, predict_scores, select_device
from .transforms import build_preprocess

__all__ = [
    "LoadedModel",
    "Prediction",
    "Predictor",
    "EvaluationResult",
    "STAGES",
    "load_checkpoint_model",
    "evaluate_images",
    "preprocess_images",
    "roc_curve_points",
    "plot_confusion",
    "plot_roc",
    "export_onnx",
    "check_onnx",
]

logger = logging.getLogger(__name__)

#: The timed stages of one prediction, in order.
STAGES: tuple[str, ...] = ("decode", "preprocess", "model", "heatmap")


@dataclass
class LoadedModel:
    """A global model rebuilt from a checkpoint, ready on its device in evaluation mode.

    Attributes
    ----------
    model:
        The network (float32 parameters; channels-last memory on CUDA when the run used it).
    settings:
        The run settings saved with the checkpoint.
    device:
        Where the model lives.
    server_round:
        The round that produced the checkpoint (None when not recorded).
    """

    model: nn.Module
    settings: Settings
    device: torch.device
    server_round: int | None = None

    @property
    def name(self) -> str:
        """The registry name of the model."""
        return self.settings.model

    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        return self.settings.classes

    @property
    def channels_last(self) -> bool:
        """Whether inputs go in channels-last memory (CUDA with ``channels-last``)."""
        return self.device.type == "cuda" and self.settings.channels_last

    @property
    def amp(self) -> bool:
        """Whether the forward pass runs under bf16 autocast (CUDA with ``amp``)."""
        return self.device.type == "cuda" and self.settings.amp


def _bad_checkpoint(message: str, path: Path, detail: str = "") -> FedradError:
    return FedradError(
        "bad-checkpoint",
        f"{message}. Give a checkpoint written by the fedrad server (model-latest.pt or "
        "checkpoints/round-NNN.pt in the run's out-dir), which holds the weights and the "
        "run config.",
        local_detail=f"{path}{': ' + detail if detail else ''}",
    )


def load_checkpoint_model(
    path: str | os.PathLike[str], *, device: str | torch.device = "auto"
) -> LoadedModel:
    """Rebuild the global model of a fedrad checkpoint on ``device``.

    Raises
    ------
    FedradError
        ``"bad-checkpoint"`` when the file is missing, unreadable, not a fedrad checkpoint
        (no ``state_dict`` and ``run_config``) or its weights do not fit its run config.
    ConfigError
        For a bad ``device`` (see :func:`~fedrad.common.training.select_device`) or a run
        config this fedrad does not accept.
    """
    path = Path(path)
    dev = select_device(device)
    if not path.is_file():
        raise _bad_checkpoint(f"The checkpoint file {path.name!r} does not exist", path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign pickles
        raise _bad_checkpoint(
            f"The checkpoint cannot be read ({type(e).__name__})", path, str(e)) from e
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict) \
            or not isinstance(raw.get("run_config"), dict):
        keys = sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise _bad_checkpoint(
            f"The file is not a fedrad checkpoint (it needs 'state_dict' and 'run_config'; "
            f"found {keys})", path)
    settings = load_settings(raw["run_config"])
    model = model_from_settings(settings, initialise=False)  # every weight is loaded next
    try:
        model.load_state_dict(raw["state_dict"], strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _bad_checkpoint(
            f"The checkpoint's weights do not fit its run config ({settings.model}, "
            f"{settings.image_size} px, {settings.num_classes} classes): {first}", path,
            str(e)) from e
    on_cuda = dev.type == "cuda"
    fmt = torch.channels_last if (on_cuda and settings.channels_last) else torch.contiguous_format
    model.to(device=dev, memory_format=fmt).eval()
    server_round = raw.get("round")
    return LoadedModel(model=model, settings=settings, device=dev,
                       server_round=int(server_round) if server_round is not None else None)


# ------------------------------------------------------------------------------ predict


@dataclass
class Prediction:
    """What :meth:`Predictor.predict_file` found for one file.

    Attributes
    ----------
    file:
        The input path (site-local).
    probabilities:
        float64 ``[C]`` softmax probabilities, None when the file failed.
    predicted:
        Index of the most probable class, None when the file failed.
    timings_ms:
        Milliseconds per stage of :data:`STAGES` that ran, and ``"total"``.
    heatmap:
        float32 ``[H, W]`` in [0, 1] at the model's input size, or None.
    image:
        The uint8 ``[H, W]`` image the model saw (after preprocessing), or None.
    error_code, error_message:
        The :class:`~fedrad.common.dicom.DicomError` reason code and its message when the
        file failed (both ``""`` otherwise).
    heatmap_png:
        Where the caller wrote the heatmap picture, if it did (``""`` otherwise).
    """

    file: str
    probabilities: np.ndarray | None = None
    predicted: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    heatmap: np.ndarray | None = None
    image: np.ndarray | None = None
    error_code: str = ""
    error_message: str = ""
    heatmap_png: str = ""

    @property
    def ok(self) -> bool:
        """Whether the file was predicted."""
        return not self.error_code


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Predictor:
    """Predict class probabilities and heatmaps for DICOM files with a loaded model.

    Parameters
    ----------
    loaded:
        From :func:`load_checkpoint_model`.
    heatmaps:
        Compute a heatmap per image (Grad-CAM or attention rollout; see
        :mod:`fedrad.common.heatmaps`).
    frame_policy, voi_policy, crop_square, max_pixels:
        Decoding and preprocessing options; keep them as the sites prepared their data
        (the defaults are site preparation's).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        heatmaps: bool = True,
        frame_policy: str = "middle",
        voi_policy: str = "auto",
        crop_square: bool = False,
        max_pixels: int = 64_000_000,
    ) -> None:
        self.loaded = loaded
        self.heatmaps = heatmaps
        self.method = heatmap_method(loaded.name) if heatmaps else ""
        self._cam = GradCam(loaded.model, cam_layer(loaded.model, loaded.name,
                                                    loaded.settings.image_size)) \
            if self.method == "gradcam" else None
        self.frame_policy = frame_policy
        self.voi_policy = voi_policy
        self.max_pixels = max_pixels
        self.preprocess = build_preprocess(loaded.settings, crop_square=crop_square)

    def load_image(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, float, float]:
        """Decode and preprocess one file: ``(uint8 [H, W], decode s, preprocess s)``.

        Raises
        ------
        DicomError
            When the file cannot be decoded (its reason code says why).
        """
        start = time.perf_counter()
        decoded = decode_dicom(path, frame_policy=self.frame_policy,
                               voi_policy=self.voi_policy, max_pixels=self.max_pixels)
        decoded_at = time.perf_counter()
        image = to_uint8(self.preprocess(decoded.pixels))
        return image, decoded_at - start, time.perf_counter() - decoded_at

    def input_batch(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``[B, H, W]`` images -> the normalised input batch on the model's device."""
        return normalize_batch(torch.from_numpy(np.ascontiguousarray(images)),
                               self.loaded.device, channels_last=self.loaded.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``[B, C]`` (float32, on the device) for an input batch."""
        lm = self.loaded
        with torch.inference_mode(), torch.autocast(
                device_type=lm.device.type, dtype=torch.bfloat16, enabled=lm.amp):
            logits = lm.model(x)
        return torch.softmax(logits.float(), dim=1)

    def heatmap(self, x: torch.Tensor, target: int | Sequence[int] | None) -> torch.Tensor:
        """Heatmaps ``[B, H, W]`` in [0, 1] for an input batch (float32, on the device)."""
        return compute_heatmaps(self.loaded.model, self.loaded.name, x, target=target)

    def predict_file(self, path: str | os.PathLike[str]) -> Prediction:
        """Decode, preprocess, predict and explain one file, timing each stage.

        Raises
        ------
        DicomError
            When the file cannot be decoded.
        """
        lm = self.loaded
        total_start = time.perf_counter()
        image, t_decode, t_pre = self.load_image(path)
        _sync(lm.device)
        start = time.perf_counter()
        x = self.input_batch(image[None])
        explain: Callable[[int], torch.Tensor] | None = None
        if self._cam is not None:
            # One forward pass for both: it records what Grad-CAM needs to go backwards.
            cam = self._cam
            with torch.enable_grad():
                logits = cam.forward(x, amp=lm.amp)
            explain = cam.maps
        elif self.heatmaps:
            with torch.autocast(device_type=lm.device.type, dtype=torch.bfloat16,
                                enabled=lm.amp):
                attentions, logits = attention_maps(lm.model, x)
            size = (int(x.shape[-2]), int(x.shape[-1]))

            def explain(_target: int) -> torch.Tensor:
                return rollout_maps(attentions, size)
        else:
            with torch.inference_mode(), torch.autocast(
                    device_type=lm.device.type, dtype=torch.bfloat16, enabled=lm.amp):
                logits = lm.model(x)
        probs = torch.softmax(logits.detach().float(), dim=1)[0]
        probs = probs.to("cpu", torch.float64).numpy()  # .to() waits for the GPU
        t_model = time.perf_counter() - start
        predicted = int(np.argmax(probs))
        heat = None
        timings = {"decode": t_decode, "preprocess": t_pre, "model": t_model}
        if explain is not None:
            start = time.perf_counter()
            heat = explain(predicted)[0].cpu().numpy()
            timings["heatmap"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - total_start
        return Prediction(file=str(path), probabilities=probs, predicted=predicted,
                          timings_ms={k: v * 1000.0 for k, v in timings.items()},
                          heatmap=heat, image=image)

    def predict_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        on_result: Callable[[Prediction], None] | None = None,
    ) -> list[Prediction]:
        """Predict every file; a file that fails is recorded with its reason, never dropped."""
        results: list[Prediction] = []
        for path in paths:
            try:
                result = self.predict_file(path)
            except DicomError as err:
                logger.info("%s: %s", path, err)  # the Prediction carries it
                result = Prediction(file=str(path), error_code=err.code,
                                    error_message=err.message)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results


# ----------------------------------------------------------------------------- evaluate


@dataclass
class EvaluationResult:
    """Scores, outcome counts and pooled metrics of a model on a labelled set."""

    scores: np.ndarray
    labels: np.ndarray
    counts: OutcomeCounts
    metrics: dict[str, Any]
    class_names: list[str]


def preprocess_images(images: np.ndarray, settings: Settings) -> np.ndarray:
    """Run 2-D images (uint8 or [0, 1] float) through the site chain to uint8 ``[N, S, S]``.

    For labelled arrays that are not a prepared cache (e.g. a MedMNIST ``.npz`` split):
    the same resize, denoise, equalise and scale a site applies after decoding.
    """
    arr = np.asarray(images)
    if arr.ndim != 3:
        raise ConfigError(f"images must be an [N, H, W] array; got shape {arr.shape}")
    pipeline = build_preprocess(settings)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    size = int(settings.image_size)
    out = np.empty((arr.shape[0], size, size), np.uint8)
    for i, img in enumerate(arr):
        out[i] = to_uint8(pipeline(img.astype(np.float32) / scale))
    return out


def evaluate_images(
    loaded: LoadedModel, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 64,
    positive_class: int | str = 1,
) -> EvaluationResult:
    """Score uint8 ``[N, S, S]`` images (a prepared cache's) and compute pooled metrics.

    The metrics are :func:`~fedrad.common.metrics.pooled_metrics` of the outcome counts
    with the run's ``score-bins``: the numbers the server reports for a central set.

    Raises
    ------
    FedradError
        ``"size-mismatch"`` when the images are not the model's input size,
        ``"bad-labels"`` for labels outside the model's classes.
    """
    s = loaded.settings
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (s.image_size, s.image_size):
        raise FedradError(
            "size-mismatch",
            f"the images are {tuple(images.shape[1:])} but the model takes "
            f"{s.image_size}x{s.image_size}; prepare the data with the checkpoint's "
            f"image-size={s.image_size}",
        )
    labels = np.asarray(labels).astype(np.int64)
    scores = predict_scores(loaded.model, images, batch_size=batch_size, device=loaded.device,
                            amp=s.amp, channels_last=s.channels_last)
    loaded.model.eval()
    counts = count_outcomes(scores, labels, bins=s.score_bins)
    metrics = pooled_metrics(counts, loaded.classes,
                             positive_class=positive_class if s.num_classes == 2 else 1)
    return EvaluationResult(scores=scores, labels=labels, counts=counts, metrics=metrics,
                            class_names=loaded.classes)


def roc_curve_points(counts: OutcomeCounts, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC curve of class ``cls`` from the pooled score histograms.

    Thresholds sit at the bin edges, from above 1 down to 0, so the curve goes from (0, 0)
    to (1, 1); its trapezoidal area equals :func:`~fedrad.common.metrics.auc_from_histograms`.

    Returns
    -------
    (fpr, tpr)
        float64 arrays of ``bins + 1`` points; NaN when the class has no positives or no
        negatives.
    """
    pos = counts.pos_hist[cls][::-1].astype(np.float64)
    neg = counts.neg_hist[cls][::-1].astype(np.float64)
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        nan = np.full(counts.bins + 1, math.nan)
        return nan, nan
    tpr = np.concatenate([[0.0], np.cumsum(pos) / p])
    fpr = np.concatenate([[0.0], np.cumsum(neg) / n])
    return fpr, tpr


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    return plt


def plot_confusion(path: str | os.PathLike[str], counts: OutcomeCounts,
                   class_names: Sequence[str], *, title: str = "") -> Path:
    """Write the confusion matrix (counts and row percentages) as a PNG."""
    plt = _pyplot()
    conf = counts.confusion
    c = counts.num_classes
    rows = conf.sum(axis=1, keepdims=True)
    share = np.divide(conf, rows, out=np.zeros(conf.shape, np.float64), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.4 * c + 2.6, 1.2 * c + 2.0))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, f"{conf[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                    fontsize=9, color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(c), class_names, rotation=30, ha="right")
    ax.set_yticks(range(c), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix (n = {counts.n})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_roc(path: str | os.PathLike[str], counts: OutcomeCounts, class_names: Sequence[str],
             metrics: dict[str, Any], *, positive_class: int = 1, title: str = "") -> Path:
    """Write the ROC curve(s) as a PNG: the positive class for two classes, else one per class.

    The legend gives each curve's AUC (with its 95 % interval for two classes).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    classes = [positive_class] if counts.num_classes == 2 else range(counts.num_classes)
    for k in classes:
        fpr, tpr = roc_curve_points(counts, k)
        if np.isnan(fpr).all():
            continue
        name = class_names[k]
        if counts.num_classes == 2:
            label = (f"{name}: AUC {metrics['auc']:.3f} "
                     f"({metrics['auc-ci-low']:.3f}-{metrics['auc-ci-high']:.3f})")
        else:
            label = f"{name}: AUC {metrics[f'{name}/auc']:.3f}"
        ax.plot(fpr, tpr, linewidth=1.8, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title or f"ROC (n = {counts.n})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- ONNX


def _require_onnx(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise FedradError(
                "missing-dependency",
                f"ONNX export needs {name}: pip install 'fedrad[onnx]' (onnx, onnxruntime, "
                "onnxscript)",
            ) from e


def export_onnx(
    loaded: LoadedModel, path: str | os.PathLike[str], *, opset: int = 18
) -> Path:
    """Write the model as ONNX with a dynamic batch axis; returns the path.

    The graph takes ``image``: float32 ``[batch, 1, S, S]`` normalised as in training
    (``(x / 255 - 0.5) / 0.25`` of the preprocessed uint8 image) and returns ``logits``
    ``[batch, C]``.  The model name, input size, classes and preprocessing settings are
    stored in the file's metadata so an edge runtime can prepare its input the same way.
    Exported with torch's ``torch.export``-based exporter (needs onnxscript), in float32 on
    the CPU.
    """
    _require_onnx("onnx", "onnxscript")
    import copy

    import onnx

    s = loaded.settings
    model = copy.deepcopy(loaded.model).to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros(2, 1, s.image_size, s.image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(
            model, (example,), input_names=["image"], output_names=["logits"],
            dynamo=True, opset_version=opset, dynamic_shapes=({0: batch},), verbose=False,
        )
    except Exception as e:  # the exporter raises many types; report which model failed
        raise FedradError("export-failed",
                          f"torch.onnx.export failed for {s.model}: {type(e).__name__}: {e}"
                          ) from e
    program.save(str(path))
    proto = onnx.load(str(path))
    meta = {
        "fedrad:model": s.model,
        "fedrad:image-size": str(s.image_size),
        "fedrad:classes": json.dumps(s.classes),
        "fedrad:preprocess": json.dumps({
            "denoise-sigma": s.denoise_sigma, "equalize": s.equalize,
            "normalize": "(uint8 / 255 - 0.5) / 0.25"}),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def check_onnx(
    loaded: LoadedModel, path: str | os.PathLike[str], *, batch: int = 3, seed: int = 0
) -> float:
    """Run the ONNX file in ONNX Runtime (CPU) and PyTorch on the same random batch.

    Returns the largest absolute difference of the logits.
    """
    _require_onnx("onnxruntime")
    import onnxruntime as ort

    s = loaded.settings
    x = torch.randn(batch, 1, s.image_size, s.image_size,
                    generator=torch.Generator().manual_seed(seed))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    model = loaded.model
    with torch.inference_mode():
        want = model(x.to(loaded.device)).float().cpu().numpy()
    return float(np.abs(got - want).max())
