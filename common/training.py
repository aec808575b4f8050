"""The local training loop and prediction, in plain torch (no Flower).

A site's prepared cache holds ``images``: uint8 ``[N, H, W]`` (preprocessed to [0, 1], then
scaled by 255) and ``labels``: int64 ``[N]``.  The loop keeps the images as uint8, draws
batches by a seeded random permutation, moves each uint8 batch to the device and normalises
it there (:func:`normalize_batch`), so no DataLoader or worker process is needed and the
host-to-device traffic is a quarter of float32's.

On CUDA the whole uint8 set is uploaded once when it fits easily in free GPU memory;
otherwise batches are gathered on the host into pinned staging buffers (two, used in turn)
and copied asynchronously.  The loop never waits on the GPU inside an epoch except to check
the loss every :data:`CHECK_EVERY` batches.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, FedradError, SiteDataError

__all__ = [
    "TrainResult",
    "cpu_budget",
    "select_device",
    "normalize_batch",
    "train_local",
    "logit_adjustment",
    "predict_scores",
    "OPTIMIZERS",
    "PIXEL_MEAN",
    "PIXEL_STD",
]

logger = logging.getLogger(__name__)

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
#: Training-time augmentations (the ``augment`` setting; see :func:`random_affine`).
AUGMENTATIONS: tuple[str, ...] = ("none", "affine")
#: :func:`random_affine`'s ranges: rotation (degrees), zoom factors, shift (fraction of size).
AFFINE_ROTATION_DEG = 10.0
AFFINE_ZOOM = (0.85, 1.15)
AFFINE_SHIFT = 0.08
PIXEL_MEAN = 0.5  # of the [0, 1] preprocessed pixel values
PIXEL_STD = 0.25
CHECK_EVERY = 50  # CUDA: batches between loss checks (each one waits for the GPU)
DEVICE_RESIDENT_FRACTION = 0.25  # CUDA: upload the uint8 set when under this share of free memory


def _cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs granted by this process's cgroup (``docker run --cpus``), or None if unlimited.

    cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), else v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
    """
    from pathlib import Path

    base = Path(root)
    try:
        quota, _, period = (base / "cpu.max").read_text().strip().partition(" ")
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = float((base / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = float((base / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cpu_budget(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota.

    torch sizes its thread pool by the machine's cores; a site container limited to
    ``--cpus 4`` on a 64-core host would otherwise run 64 threads on 4 cores' worth of
    time, several times slower than 4 threads.
    """
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_local` did.

    Attributes
    ----------
    num_examples:
        Training samples in the site's dataset (a count of samples, not samples x epochs):
        the weight of this site's update in federated averaging.
    epochs:
        Passes over the data begun (with ``steps``, the last may be partial).
    mean_loss:
        Sample-weighted mean cross-entropy over every batch of the call (without the
        proximal term).
    seconds:
        Wall-clock time of the training loop (the GPU's work included).
    images_per_second:
        Images processed (all epochs) per second.
    """

    num_examples: int
    epochs: int
    mean_loss: float
    seconds: float
    images_per_second: float


def select_device(prefer: str | torch.device = "auto") -> torch.device:
    """Return the device to train on.

    Parameters
    ----------
    prefer:
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ConfigError
        For an unknown value, or CUDA asked for on a machine without a usable CUDA GPU.
    """
    text = str(prefer).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' was asked for but torch sees no CUDA GPU (check the driver, "
                "the container's GPU access and that torch is a CUDA build); use device "
                "'auto' or 'cpu' to train on the CPU"
            )
        try:
            device = torch.device(text)
        except RuntimeError as e:
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {prefer!r}") from e
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {text!r} does not exist: torch sees {torch.cuda.device_count()} "
                "CUDA GPU(s), numbered from 0"
            )
        return device
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {prefer!r}")


def normalize_batch(
    batch: torch.Tensor, device: torch.device, *, channels_last: bool = False
) -> torch.Tensor:
    """Move a uint8 ``[B, H, W]`` batch to ``device`` and normalise it there.

    Returns float32 ``[B, 1, H, W]`` with ``x = (batch / 255 - 0.5) / 0.25``, in channels-last
    memory format when ``channels_last`` (the caller decides; it only pays off on CUDA).
    The copy is non-blocking, so a pinned ``batch`` overlaps with work already queued.
    """
    x = batch.to(device, non_blocking=True)
    if x.ndim == 3:
        # With one channel both layouts hold the same bytes, but only the strides tell
        # cuDNN which one it is: [B, H, W, 1] seen as [B, 1, H, W] has channels-last strides.
        x = x.unsqueeze(-1).permute(0, 3, 1, 2) if channels_last else x.unsqueeze(1)
    x = x.float().mul_(1.0 / (255.0 * PIXEL_STD)).sub_(PIXEL_MEAN / PIXEL_STD)
    if channels_last and x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _as_uint8_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        tensor = images.detach().cpu()
    else:
        array = np.asarray(images)
        if array.dtype != np.uint8:
            raise SiteDataError(
                "bad-dataset",
                f"images must be uint8 (preprocessed to [0, 1], then x255); got {array.dtype}. "
                "Prepare the site again to rebuild its cache",
            )
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        with warnings.catch_warnings():
            # A read-only memmap is fine: the loop only ever reads it.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            tensor = torch.from_numpy(array)
    if tensor.dtype != torch.uint8:
        raise SiteDataError(
            "bad-dataset", f"images must be uint8; got {tensor.dtype}. Prepare the site again"
        )
    if tensor.ndim == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim != 3:
        raise SiteDataError(
            "bad-dataset", f"images must have shape [N, H, W]; got {tuple(tensor.shape)}"
        )
    return tensor


def _as_labels(labels: np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    tensor = (
        labels.detach().cpu()
        if isinstance(labels, torch.Tensor)
        else torch.from_numpy(np.asarray(labels))
    )
    if tensor.ndim != 1 or tensor.shape[0] != n:
        raise SiteDataError(
            "bad-dataset",
            f"labels must have shape [{n}] (one per image); got {tuple(tensor.shape)}",
        )
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise SiteDataError("bad-dataset", f"labels must be integers; got {tensor.dtype}")
    return tensor.to(torch.int64)


class _BatchSource:
    """Yields normalised device batches of a uint8 image set in a given order."""

    def __init__(
        self, images: torch.Tensor, device: torch.device, batch_size: int, channels_last: bool
    ) -> None:
        self.device = device
        self.channels_last = channels_last
        self.images = images
        self.staging: list[torch.Tensor] = []
        self.copied: list[torch.cuda.Event | None] = []
        self.resident = False
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.numel() <= DEVICE_RESIDENT_FRACTION * free:
                self.images = images.to(device)
                self.resident = True
            else:
                shape = (batch_size, *images.shape[1:])
                self.staging = [
                    torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)
                ]
                self.copied = [None, None]
                self.copy_stream = torch.cuda.Stream(device)
        self.turn = 0

    def batch(self, index_cpu: torch.Tensor, index_dev: torch.Tensor) -> torch.Tensor:
        if self.resident:
            raw = self.images.index_select(0, index_dev)
        elif self.staging:
            slot = self.turn % 2
            self.turn += 1
            event = self.copied[slot]
            if event is not None:
                event.synchronize()  # the copy that last read this buffer has finished
            buf = self.staging[slot][: index_cpu.shape[0]]
            torch.index_select(self.images, 0, index_cpu, out=buf)
            # Copy on a side stream so the transfer overlaps the previous batch's compute.
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.copy_stream):
                raw = buf.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.copied[slot] = event
            compute.wait_stream(self.copy_stream)
            raw.record_stream(compute)  # allocated on the side stream, used on this one
        else:
            raw = self.images.index_select(0, index_cpu)
        return normalize_batch(raw, self.device, channels_last=self.channels_last)


def random_affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of a normalised ``[B, 1, H, W]`` batch under its own random affine map.

    Rotation up to :data:`AFFINE_ROTATION_DEG` either way, zoom in :data:`AFFINE_ZOOM`
    (> 1 enlarges the anatomy), shift up to :data:`AFFINE_SHIFT` of the image size along
    each axis; bilinear, with black (pixel value 0) where the map leaves the image.  No
    flips: a mirrored chest radiograph is not a radiograph of anyone (laterality matters).
    The draws come from ``generator`` (a CPU generator), so a seed gives the same batch on
    the CPU and on a GPU.
    """
    import torch.nn.functional as F

    b = x.shape[0]
    r = torch.rand((b, 4), generator=generator, dtype=torch.float64)
    angle = (2 * r[:, 0] - 1) * math.radians(AFFINE_ROTATION_DEG)
    zoom = AFFINE_ZOOM[0] + r[:, 1] * (AFFINE_ZOOM[1] - AFFINE_ZOOM[0])
    shift = (2 * r[:, 2:] - 1) * (2 * AFFINE_SHIFT)  # grid coordinates span 2 per side
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape),
                         align_corners=False)
    black = -PIXEL_MEAN / PIXEL_STD  # a 0 pixel after normalize_batch
    out = F.grid_sample(x - black, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False).add_(black)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def logit_adjustment(labels: torch.Tensor, num_classes: int, strength: float) -> torch.Tensor:
    """``strength * log(prior)``: the per-class offset :func:`train_local` adds to the logits.

    ``prior`` is the add-one smoothed class frequency of ``labels``
    (``(count + 1) / (n + num_classes)``), float32 ``[num_classes]``.
    """
    counts = torch.bincount(labels.to("cpu", torch.int64), minlength=num_classes).double()
    prior = (counts + 1) / (counts.sum() + num_classes)
    return (strength * prior.log()).float()


def _make_optimizer(
    model: nn.Module, optimizer: str, learning_rate: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
        )
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def _add_proximal_gradient(
    params: list[nn.Parameter], start: list[torch.Tensor], mu: float
) -> None:
    """grad += mu * (w - w_start): the gradient of FedProx's (mu / 2) * ||w - w_start||^2."""
    pairs = [(p, w) for p, w in zip(params, start, strict=True) if p.grad is not None]
    if pairs:
        diffs = torch._foreach_sub([p.detach() for p, _ in pairs], [w for _, w in pairs])
        torch._foreach_add_([p.grad for p, _ in pairs], diffs, alpha=mu)


def _diverged(learning_rate: float) -> FedradError:
    return FedradError(
        "diverged",
        f"Training diverged: the loss became NaN or infinite at learning-rate {learning_rate:g}. "
        "Use a lower learning-rate (e.g. 10x lower) or the 'adam' optimizer with 1e-3",
    )


def train_local(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    optimizer: str,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    device: torch.device | str,
    amp: bool = True,
    channels_last: bool = True,
    seed: int = 0,
    proximal_mu: float = 0.0,
    augment: str = "none",
    logit_adjust: float = 0.0,
    steps: int | None = None,
    max_batches: int | None = None,
) -> TrainResult:
    """Train ``model`` in place on a site's cached images with cross-entropy.

    Parameters
    ----------
    model:
        The model to train; it is moved to ``device`` and left there, in training mode and
        the default (contiguous) memory format, its parameters float32.
    images, labels:
        uint8 ``[N, H, W]`` (numpy array, memmap or tensor) and integer ``[N]`` class indices.
    epochs, batch_size, learning_rate:
        Local epochs, batch size and optimiser learning rate.  The last batch of an epoch
        may be smaller; a last batch of one sample is left out (BatchNorm needs two).
    optimizer:
        ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``.
    momentum, weight_decay:
        SGD momentum; weight decay (decoupled for AdamW).
    device:
        Where to train (see :func:`select_device`).
    amp, channels_last:
        CUDA only: bf16 autocast, and channels-last memory format.  Ignored on the CPU,
        which trains in float32 with contiguous tensors.
    seed:
        Seeds the batch order (one permutation per epoch); the same seed, weights and data
        give the same result on the CPU.
    proximal_mu:
        FedProx: when > 0, adds the gradient of ``(mu / 2) * ||w - w_start||^2`` (w_start:
        the weights at the call's start, i.e. the global model) to every step.
    augment:
        ``"none"``, or ``"affine"``: every training batch passes through
        :func:`random_affine` (draws seeded by ``seed``, separate from the batch order).
    logit_adjust:
        When > 0, the loss is taken on ``logits + logit_adjust * log(prior)``, ``prior``
        being the class frequencies of ``labels`` (add-one smoothed, so a class the site
        lacks gets a small share, not minus infinity).  The model then learns what tells
        the classes apart rather than this site's class mix (Menon et al., 2021, "Long-tail
        learning via logit adjustment"; FedLC, Zhang et al., 2022, for label skew across
        sites); predictions use the plain logits.  The frequencies never leave the site.
    steps:
        When given, exactly this many batches in place of ``epochs`` epochs: passes over
        the data, each in a fresh order, until ``steps`` batches are done (the last pass
        may stop part-way).  Federated averaging wants every site to take the same number
        of steps: with epochs, a site holding half the images takes half the steps and
        its update, weighted by its images as well, pulls the average towards its own
        class mix twice over.
    max_batches:
        At most this many batches per epoch (smoke tests, benchmarks); None for all.

    Returns
    -------
    TrainResult

    Raises
    ------
    FedradError
        ``"empty-dataset"`` for zero samples, ``"bad-dataset"`` for wrong dtypes, shapes or
        labels outside the model's classes, ``"diverged"`` when the loss is not finite.
    ConfigError
        For a bad optimiser name, epochs, batch size, learning rate or ``proximal_mu``.
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    for key, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ConfigError(f"steps must be an integer >= 1 or None, got {steps!r}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1 or None, got {max_batches!r}")
    if not learning_rate > 0 or not math.isfinite(learning_rate):
        raise ConfigError(f"learning_rate must be a positive number, got {learning_rate!r}")
    if proximal_mu < 0:
        raise ConfigError(f"proximal_mu must be >= 0, got {proximal_mu!r}")
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}")
    if not logit_adjust >= 0 or not math.isfinite(logit_adjust):
        raise ConfigError(f"logit_adjust must be a number >= 0, got {logit_adjust!r}")

    image_tensor = _as_uint8_tensor(images)
    n = int(image_tensor.shape[0])
    if n == 0:
        raise SiteDataError(
            "empty-dataset",
            "The site has no training samples; prepare its data (fedrad site "
            "prepare) and check its quarantine log",
        )
    label_tensor = _as_labels(labels, n)

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    use_amp = bool(amp) and on_cuda
    memory_format = torch.channels_last if (channels_last and on_cuda) else torch.contiguous_format
    if on_cuda:
        torch.backends.cudnn.benchmark = True

    model.to(device=device, memory_format=memory_format)
    model.train()
    low, high = int(label_tensor.min()), int(label_tensor.max())
    if low < 0:
        raise SiteDataError("bad-dataset", f"labels must be >= 0 (class indices); found {low}")

    opt = _make_optimizer(model, optimizer, learning_rate, momentum, weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    start_weights = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    loss_fn = nn.CrossEntropyLoss()

    source = _BatchSource(
        image_tensor, device, batch_size, channels_last=bool(channels_last and on_cuda)
    )
    labels_dev = label_tensor.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    aug_generator = torch.Generator().manual_seed(int(seed) + 7919)

    batches_per_epoch = math.ceil(n / batch_size)
    if n > 1 and n % batch_size == 1:
        batches_per_epoch -= 1  # a lone last sample breaks BatchNorm in training mode
    if max_batches is not None:
        batches_per_epoch = min(batches_per_epoch, max_batches)
    if steps is None:
        passes = [batches_per_epoch] * epochs
    else:  # whole passes, then the part of one that makes up the count
        passes = [batches_per_epoch] * (steps // batches_per_epoch)
        passes += [steps % batches_per_epoch] if steps % batches_per_epoch else []

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    offset: torch.Tensor | None = None  # logit adjustment, once the class count is known
    seen = 0
    try:
        if on_cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for batches in passes:
            order = torch.randperm(n, generator=generator)
            order_dev = order.to(device)
            for b in range(batches):
                lo, hi = b * batch_size, min((b + 1) * batch_size, n)
                x = source.batch(order[lo:hi], order_dev[lo:hi])
                if augment == "affine":
                    x = random_affine(x, aug_generator)
                y = labels_dev.index_select(0, order_dev[lo:hi])
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(x)
                if seen == 0 and high >= logits.shape[1]:
                    raise SiteDataError(
                        "bad-dataset",
                        f"a label is {high} but the model has {logits.shape[1]} classes "
                        "(labels run from 0 to num-classes - 1); set num-classes to match "
                        "the site's labels",
                    )
                scored = logits.float()
                if logit_adjust > 0:
                    if offset is None:
                        offset = logit_adjustment(label_tensor, logits.shape[1],
                                                  logit_adjust).to(device)
                    scored = scored + offset
                loss = loss_fn(scored, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if proximal_mu > 0:
                    _add_proximal_gradient(params, start_weights, proximal_mu)
                opt.step()
                count = hi - lo
                loss_sum += loss.detach().double() * count
                seen += count
                if not on_cuda or (b + 1) % CHECK_EVERY == 0:
                    if not math.isfinite(loss_sum.item()):
                        raise _diverged(learning_rate)
            if not math.isfinite(loss_sum.item()):
                raise _diverged(learning_rate)
        if on_cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        # State dicts leave in the default layout, also after an error; the gradients
        # (one more copy of the model) are dropped before the reply is built.
        model.zero_grad(set_to_none=True)
        model.to(memory_format=torch.contiguous_format)
    mean_loss = loss_sum.item() / max(seen, 1)
    result = TrainResult(
        num_examples=n,
        epochs=len(passes),
        mean_loss=mean_loss,
        seconds=seconds,
        images_per_second=seen / seconds if seconds > 0 else float("inf"),
    )
    logger.info(
        "trained %d epoch(s) on %d samples: loss %.4f, %.1f images/s on %s",
        len(passes),
        n,
        mean_loss,
        result.images_per_second,
        device,
    )
    return result


def predict_scores(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str,
    amp: bool = True,
    channels_last: bool = True,
) -> np.ndarray:
    """Class probabilities for every image, in order.

    Parameters
    ----------
    model:
        The model (moved to ``device``; its training/eval mode is restored afterwards).
    images:
        uint8 ``[N, H, W]``, normalised as in training (:func:`normalize_batch`).
    batch_size, device, amp, channels_last:
        As in :func:`train_local` (amp and channels_last apply on CUDA only).

    Returns
    -------
    numpy.ndarray
        float64 ``[N, C]`` softmax probabilities (rows sum to 1); ``[0, C]`` for no images.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    image_tensor = _as_uint8_tensor(images)
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    use_amp = bool(amp) and on_cuda
    use_cl = bool(channels_last) and on_cuda
    was_training = model.training
    model.to(
        device=device, memory_format=torch.channels_last if use_cl else torch.contiguous_format
    )
    model.eval()
    n = int(image_tensor.shape[0])
    outputs: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            if n == 0:  # one blank image tells the number of classes
                blank = torch.zeros((1, *image_tensor.shape[1:]), dtype=torch.uint8)
                x = normalize_batch(blank, device, channels_last=use_cl)
                return np.zeros((0, int(model(x).shape[1])), dtype=np.float64)
            source = _BatchSource(image_tensor, device, batch_size, channels_last=use_cl)
            for lo in range(0, n, batch_size):
                index = torch.arange(lo, min(lo + batch_size, n))
                x = source.batch(index, index.to(device) if source.resident else index)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model(x)
                outputs.append(torch.softmax(logits.float(), dim=1))
            scores = torch.cat(outputs).to("cpu", torch.float64)
    finally:
        model.train(was_training)
        if use_cl:
            model.to(memory_format=torch.contiguous_format)
    return scores.numpy()
