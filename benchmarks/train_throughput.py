"""Training throughput: fedrad's ``train_local`` against a bare torchvision loop.

Both sides train the same architecture (torchvision's, with a 1-channel first convolution and
the standard stem), at the same input size and batch size, with SGD (momentum 0.9), in the
same process.  On CUDA both use bf16 autocast and channels-last memory; on the CPU both run
in float32.  The bare loop trains on one pre-made float batch already on the device, so it is
the ceiling: the ratio says what fedrad's data path (uint8 cache -> device -> normalise),
loss bookkeeping and per-call setup cost.  Target: ratio >= 0.9.

The two are measured alternately, ``--repeats`` times each after a warm-up; the ratio is the
median of the paired ratios (fedrad's run over the bare run next to it), so a machine that
speeds up or slows down during the run (other processes, clocks) affects both sides alike.

Usage (fedrad must be importable: ``pip install -e .`` or PYTHONPATH)::

    python benchmarks/train_throughput.py                     # auto device, defaults
    python benchmarks/train_throughput.py --device both --json runs/throughput.json
    python benchmarks/train_throughput.py --model densenet121 --image-size 128 --device cuda

Defaults: 64 px / batch 32 on the CPU (about a minute on 2 cores), 224 px / batch 256 on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from fedrad.common.errors import FedradError
from fedrad.common.models import (
    VIT_TINY_HEADS,
    VIT_TINY_HIDDEN,
    VIT_TINY_LAYERS,
    VIT_TINY_MLP,
    get_model,
    list_models,
    vit_patch_size,
)
from fedrad.common.training import select_device, train_local

NUM_CLASSES = 2
LEARNING_RATE = 0.01
POOL_BATCHES = 16  # fedrad's dataset: this many batches of random images, several epochs


def bare_model(name: str, image_size: int) -> nn.Module:
    """The same architecture straight from torchvision, with a 1-channel first convolution."""
    if name == "vit_tiny":
        patch = vit_patch_size(image_size)
        model = torchvision.models.VisionTransformer(
            image_size=image_size,
            patch_size=patch,
            num_layers=VIT_TINY_LAYERS,
            num_heads=VIT_TINY_HEADS,
            hidden_dim=VIT_TINY_HIDDEN,
            mlp_dim=VIT_TINY_MLP,
            num_classes=NUM_CLASSES,
        )
        model.conv_proj = nn.Conv2d(1, VIT_TINY_HIDDEN, kernel_size=patch, stride=patch)
        return model
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    if name.startswith("resnet"):
        model.conv1 = nn.Conv2d(1, model.conv1.out_channels, 7, 2, 3, bias=False)
    elif name.startswith("densenet"):
        model.features.conv0 = nn.Conv2d(1, model.features.conv0.out_channels, 7, 2, 3, bias=False)
    else:
        raise SystemExit(f"no bare torchvision counterpart for {name!r}")
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bare:
    """The textbook loop: one float batch on the device, autocast, SGD."""

    def __init__(self, name: str, image_size: int, batch: int, device: torch.device) -> None:
        on_cuda = device.type == "cuda"
        self.device = device
        self.amp = on_cuda
        fmt = torch.channels_last if on_cuda else torch.contiguous_format
        self.model = bare_model(name, image_size).to(device=device, memory_format=fmt).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 1, image_size, image_size, generator=gen).to(
            device=device, memory_format=fmt
        )
        self.y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)

    def run(self, steps: int) -> float:
        """Train ``steps`` batches; return images per second."""
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(
                device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp
            ):
                logits = self.model(self.x)
            loss = F.cross_entropy(logits.float(), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        sync(self.device)
        return steps * self.x.shape[0] / (time.perf_counter() - start)


class Fedrad:
    """fedrad's loop on a uint8 image pool, timed from outside (its setup included)."""

    def __init__(self, name: str, image_size: int, batch: int, device: torch.device) -> None:
        self.device = device
        self.batch = batch
        self.model = get_model(
            name, num_classes=NUM_CLASSES, image_size=image_size, stem="standard"
        )
        rng = np.random.default_rng(0)
        self.images = rng.integers(
            0, 256, size=(batch * POOL_BATCHES, image_size, image_size), dtype=np.uint8
        )
        self.labels = rng.integers(0, NUM_CLASSES, size=batch * POOL_BATCHES, dtype=np.int64)
        self.calls = 0

    def run(self, steps: int) -> float:
        """Train about ``steps`` batches (whole epochs of the pool); return images per second."""
        per_epoch = min(steps, POOL_BATCHES)
        epochs = max(1, round(steps / per_epoch))
        self.calls += 1
        start = time.perf_counter()
        result = train_local(
            self.model,
            self.images,
            self.labels,
            epochs=epochs,
            batch_size=self.batch,
            learning_rate=LEARNING_RATE,
            optimizer="sgd",
            momentum=0.9,
            device=self.device,
            amp=True,
            channels_last=True,
            seed=self.calls,
            max_batches=per_epoch,
        )
        elapsed = time.perf_counter() - start
        if not math.isfinite(result.mean_loss):
            raise SystemExit("fedrad's loss is not finite")
        return epochs * per_epoch * self.batch / elapsed


def measure(
    name: str, device: torch.device, image_size: int, batch: int, seconds: float, repeats: int
) -> dict:
    bare = Bare(name, image_size, batch, device)
    ours = Fedrad(name, image_size, batch, device)
    # Warm-up: cuDNN autotuning, allocator growth, first-touch of pages.
    bare.run(3)
    ours.run(3)
    rate = bare.run(max(2, int(3 * 256 / batch)) if device.type == "cuda" else 2)
    steps = max(2, int(seconds * rate / batch))
    bare_rates: list[float] = []
    ours_rates: list[float] = []
    for r in range(repeats):
        # Alternate which goes first, so drifts (clocks, other load) hit both alike.
        order = (bare, ours) if r % 2 == 0 else (ours, bare)
        for side in order:
            value = side.run(steps)
            (bare_rates if side is bare else ours_rates).append(value)
    bare_med = statistics.median(bare_rates)
    ours_med = statistics.median(ours_rates)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
        )
    return {
        "device": device.type,
        "device_name": device_name,
        "model": name,
        "image_size": image_size,
        "batch_size": batch,
        "steps_per_measurement": steps,
        "bare_images_per_second": bare_med,
        "fedrad_images_per_second": ours_med,
        "ratio": statistics.median(o / b for o, b in zip(ours_rates, bare_rates, strict=True)),
        "bare_runs": bare_rates,
        "fedrad_runs": ours_rates,
        "amp_bf16": device.type == "cuda",
        "channels_last": device.type == "cuda",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def print_table(rows: list[dict]) -> None:
    header = ("device", "model", "image", "batch", "bare img/s", "fedrad img/s", "ratio")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["device"],
                row["model"],
                str(row["image_size"]),
                str(row["batch_size"]),
                f"{row['bare_images_per_second']:.1f}",
                f"{row['fedrad_images_per_second']:.1f}",
                f"{row['ratio']:.3f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            f"{row['device']}: {row['device_name']}; runs bare "
            f"{[round(v, 1) for v in row['bare_runs']]}, fedrad "
            f"{[round(v, 1) for v in row['fedrad_runs']]}"
        )
    print(
        "ratio: median of paired runs, fedrad's train_local over a bare torchvision loop on "
        "pre-made device tensors; target >= 0.9"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=list_models())
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size in pixels (default: 64 on the CPU, 224 on CUDA)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size (default: 32 on the CPU, 256 on CUDA)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="length of one measurement (default: 3 on the CPU, 5 on CUDA)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="measurements of each loop, alternating (default 5)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "both"))
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's own)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        if args.device == "both":
            devices = [select_device("cpu"), select_device("cuda")]
        else:
            devices = [select_device(args.device)]
    except FedradError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = []
    for device in devices:
        on_cuda = device.type == "cuda"
        image_size = args.image_size or (224 if on_cuda else 64)
        batch = args.batch_size or (256 if on_cuda else 32)
        seconds = args.seconds or (5.0 if on_cuda else 3.0)
        print(
            f"measuring {args.model} on {device.type}: {image_size} px, batch {batch}, "
            f"{args.repeats} x {seconds:g} s per loop ...",
            flush=True,
        )
        rows.append(measure(args.model, device, image_size, batch, seconds, args.repeats))
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
