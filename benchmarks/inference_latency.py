"""Per-image latency of ``fedrad predict`` against the model's bare forward pass.

For each model and device, a checkpoint is written and loaded exactly as ``fedrad predict``
loads one, and real DICOM files (synthetic chest phantoms written by
``fedrad.simulations.dicom_writer``, 12-bit, ``--dicom-size`` pixels a side) go through the
whole per-image pipeline: decode (pydicom, LUTs) -> preprocess (the site chain: resize,
denoise, equalise, scale) -> model (softmax probabilities; bf16 autocast and channels-last on
CUDA) -> heatmap (Grad-CAM for the CNNs, attention rollout for the ViT).  The baseline is the
same model's bare forward pass at batch 1 on a normalised input already on the device, under
the same autocast, in the same process.

Both are measured in turn, ``--repeats`` rounds each after a warm-up, so a machine that slows
down during the run slows both.  Printed per model and device: the median milliseconds of
each stage and of the whole image, the bare forward's median, and the ratios
``total / bare`` (what a prediction with its explanation costs over the network alone) and
``model / bare`` (the per-image setup cost of the model stage: upload, normalise, softmax,
copy back).

Usage (fedrad importable: ``pip install -e .``)::

    python benchmarks/inference_latency.py                          # CPU, and CUDA if present
    python benchmarks/inference_latency.py --device cpu --models resnet18 --repeats 5
    python benchmarks/inference_latency.py --dicom-size 2048 --out runs/latency.json
    python benchmarks/inference_latency.py --device cpu --threads 1   # a busy shared CPU

Reference points: the paper reports 45-70 ms per image; a bare ResNet-18 forward at batch 1
takes ~2 ms on an H200.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedrad.common.config import load_settings
from fedrad.common.errors import FedradError
from fedrad.common.inference import STAGES, Predictor, load_checkpoint_model
from fedrad.common.models import list_models, model_from_settings
from fedrad.common.training import select_device
from fedrad.server.checkpoint import save_checkpoint
from fedrad.simulations.dicom_writer import DEFAULT_PROFILES, write_dicom
from fedrad.simulations.synthetic import make_phantom


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_files(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    """``count`` phantoms (half with an opacity) as 12-bit uncompressed DICOM."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        image = make_phantom(rng, size, opacity=bool(i % 2))
        files.append(write_dicom(folder / f"img{i:03d}.dcm", image,
                                 profile=DEFAULT_PROFILES[0], rng=rng))
    return files


def bare_forward_ms(loaded, calls: int) -> list[float]:
    """Milliseconds of ``calls`` bare forward passes at batch 1 (input already on device)."""
    device = loaded.device
    s = loaded.settings
    x = torch.randn(1, 1, s.image_size, s.image_size, device=device)
    if loaded.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(calls):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=loaded.amp):
                loaded.model(x)
            sync(device)
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure(name: str, device: torch.device, files: list[Path], args: argparse.Namespace,
            workdir: Path) -> dict:
    settings = load_settings({"model": name, "image-size": args.image_size, "num-classes": 2})
    torch.manual_seed(0)
    model = model_from_settings(settings)
    save_checkpoint(workdir / name, 1, model.state_dict(), settings.to_run_config())
    loaded = load_checkpoint_model(workdir / name / "model-latest.pt", device=device)
    predictor = Predictor(loaded, heatmaps=not args.no_heatmaps)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for _ in range(2):  # warm-up: kernel selection, allocator, caches
        predictor.predict_file(files[0])
        bare_forward_ms(loaded, 3)
    stages: dict[str, list[float]] = {k: [] for k in (*STAGES, "total")}
    bare: list[float] = []
    for _ in range(args.repeats):
        bare.extend(bare_forward_ms(loaded, len(files)))
        for path in files:
            result = predictor.predict_file(path)
            for key, value in result.timings_ms.items():
                stages[key].append(value)
    med = {k: statistics.median(v) for k, v in stages.items() if v}
    bare_med = statistics.median(bare)
    return {
        "model": name,
        "device": str(device),
        "image_size": args.image_size,
        "dicom_size": args.dicom_size,
        "images": len(stages["total"]),
        "median_ms": med,
        "bare_forward_ms": bare_med,
        "total_over_bare": med["total"] / bare_med,
        "model_over_bare": med["model"] / bare_med,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="all",
                        help="all (CPU, and CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--models", default="resnet18,densenet121,vit_tiny",
                        help=f"comma-separated, from: {', '.join(list_models())}")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (px)")
    parser.add_argument("--dicom-size", type=int, default=512,
                        help="side of the DICOM images written (e.g. 512 or 2048)")
    parser.add_argument("--files", type=int, default=4, help="DICOM files per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over the files")
    parser.add_argument("--no-heatmaps", action="store_true", help="leave the heatmap out")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice); on a "
                        "shared machine 1 avoids threads spinning against other processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.files < 1 or args.repeats < 1:
        parser.error("--files and --repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in list_models()]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(list_models())}")
    try:
        if args.device == "all":
            devices = [torch.device("cpu")]
            if torch.cuda.is_available():
                devices.append(torch.device("cuda"))
        else:
            devices = [select_device(args.device)]
    except FedradError as err:
        parser.error(str(err))

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{torch.get_num_threads()} CPU threads, GPU: {gpu}")
    print(f"{args.files} DICOM files of {args.dicom_size}x{args.dicom_size} (12-bit, "
          f"uncompressed) -> {args.image_size} px; {args.repeats} rounds; median ms per image")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedrad-latency-") as tmp:
        workdir = Path(tmp)
        files = write_files(workdir / "dicom", args.files, args.dicom_size, args.seed)
        for device in devices:
            for name in models:
                rows.append(measure(name, device, files, args, workdir))
                r = rows[-1]
                print(f"  measured {name} on {device}: total {r['median_ms']['total']:.1f} ms",
                      file=sys.stderr)

    stage_cols = [s for s in (*STAGES, "total") if s in rows[0]["median_ms"]]
    header = (f"{'model':<12} {'device':<7}" + "".join(f"{s:>11}" for s in stage_cols)
              + f"{'bare fwd':>10}{'total/bare':>12}{'model/bare':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<12} {r['device']:<7}"
              + "".join(f"{r['median_ms'][s]:>11.2f}" for s in stage_cols)
              + f"{r['bare_forward_ms']:>10.2f}{r['total_over_bare']:>11.1f}x"
              f"{r['model_over_bare']:>11.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "torch": torch.__version__, "gpu": gpu, "cpu_threads": torch.get_num_threads(),
            "args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
        }, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
