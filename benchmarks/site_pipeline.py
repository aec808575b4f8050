"""Site preparation speed and memory: fedrad's prepare against MONAI and bare decoding.

Writes real-size radiographs (``--size`` 2048 squared, 12 bits stored, MONOCHROME2, a
chest phantom plus scanner noise) in three encodings -- uncompressed explicit VR little
endian, RLE lossless and JPEG 2000 lossless -- ``--count`` files each, then measures, one
encoding at a time and each pipeline in its own single-threaded process (so images/s is
per core and peak RSS is the pipeline's own):

``bare``          ``pydicom.dcmread(path).pixel_array`` -- the floor no pipeline can beat;
``fedrad-decode`` ``fedrad.common.dicom.decode_dicom`` alone (LUTs, photometric, checks);
``fedrad``        ``fedrad.client.prepare.prepare_site(workers=1)`` end to end: scan, labels,
                  decode, resize to ``--image-size``, Gaussian denoise, histogram
                  equalisation, scale to [0, 1], write the cache and the manifest;
``monai``         the same steps with MONAI: ``LoadImage(reader=PydicomReader)`` +
                  ``GaussianSmooth`` (sigma scaled to the source resolution) +
                  ``HistogramNormalize`` + ``Resize`` + ``ScaleIntensity``.

Every pipeline first processes one file untimed (imports, codec set-up).  Images/s per
core is counted per CPU-second of the single-threaded process (``time.process_time``),
so a busy machine slows the wall clock but not the comparison; wall-clock rates are
printed too.  Peak RSS (``getrusage``) is shown after imports ("base") and at the end.

Targets (issue "Hospital-grade site preparation"): uncompressed >= 50 images/s per core
and >= 3x MONAI; JPEG 2000 within 1.2x of bare decoding (fedrad / bare >= 0.83).  The
summary table says for each whether this run met it.

Memory (``--memory-files``, default 10,000): ``prepare_site`` over that many files with
``--memory-workers`` worker processes, in a child process whose whole process tree
(prepare, the forkserver, the workers) is sampled from ``/proc`` every 20 ms; the peak
of the summed RSS is printed (target: under 2 GB) with the largest single process.  The
files are small (``--memory-size``, 128 squared): at 10,000 files memory is about
per-file bookkeeping (the prepared 224-pixel images kept for the cache, the manifest
records), while one file's own decoding memory is what the speed run's peak RSS shows.
Nothing is asserted: the numbers are printed.

Generated files are kept under ``--workdir`` (default ``/tmp/fedrad-site-bench``) and
reused by the next run with the same count and size; ``--fresh`` writes them again.

Usage::

    python benchmarks/site_pipeline.py                         # the full run: 200 files
                                                               # per encoding + memory
    python benchmarks/site_pipeline.py --count 20 --memory-files 0   # a quick look
    python benchmarks/site_pipeline.py --jobs 2                # two measurements at once
    python benchmarks/site_pipeline.py --profile explicit-le   # cProfile fedrad's prepare
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # per-core numbers: one thread everywhere

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ENCODINGS = ("explicit-le", "rle", "jpeg2000-lossless")
PIPELINES = ("bare", "fedrad-decode", "fedrad", "monai")
CLASS_NAMES = "normal,opacity"


# ----------------------------------------------------------------------- generation


def _write_one(task: tuple[str, str, int, int]) -> str:
    from fedrad.simulations.dicom_writer import ScannerProfile, write_dicom
    from fedrad.simulations.synthetic import make_phantom

    path, encoding, size, seed = task
    rng = np.random.default_rng(seed)
    base = 512 if size >= 512 else size
    image = make_phantom(rng, base, opacity=bool(seed % 2))
    if size != base:  # upsample a cheap phantom; the scanner noise is added at full size
        factor = -(-size // base)
        image = np.repeat(np.repeat(image, factor, 0), factor, 1)[:size, :size]
    profile = ScannerProfile(name=f"bench-{encoding}", manufacturer="Bench Imaging",
                             model_name="Bench DR", noise_std=0.01, bits_stored=12,
                             photometric="MONOCHROME2", transfer_syntax=encoding,
                             window_center=2048.0, window_width=4096.0)
    write_dicom(path, image, profile=profile, rng=rng)
    return path


def generate(workdir: Path, count: int, size: int, encodings: list[str], workers: int
             ) -> dict[str, Path]:
    """Write ``count`` files per encoding under ``workdir/<encoding>`` (reused if complete);
    ``workdir/memory`` holds the memory run's files."""
    from fedrad.simulations.dicom_writer import run_tasks, write_labels_csv

    folders = {}
    tasks = []
    for k, encoding in enumerate(encodings):
        root = workdir / encoding
        folders[encoding] = root
        done = root / "complete.json"
        if done.is_file() and json.loads(done.read_text()) == {"count": count, "size": size}:
            continue
        shutil.rmtree(root, ignore_errors=True)
        (root / "dicom").mkdir(parents=True)
        rows = [(f"img-{i:05d}.dcm", i % 2) for i in range(count)]
        write_labels_csv(root / "labels.csv", rows)
        tasks += [(str(root / "dicom" / name), encoding, size, 1000 * k + i)
                  for i, (name, _) in enumerate(rows)]
    if tasks:
        start = time.perf_counter()
        run_tasks(_write_one, tasks, workers)
        print(f"generated {len(tasks)} files in {time.perf_counter() - start:.0f} s",
              flush=True)
    for encoding in encodings:
        (folders[encoding] / "complete.json").write_text(
            json.dumps({"count": count, "size": size}))
    return folders


# ----------------------------------------------------------------------- measuring


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _tree_rss_mb(root_pid: int) -> tuple[float, float]:
    """(summed RSS, largest RSS) in MB of ``root_pid`` and all its descendants now."""
    parents: dict[int, int] = {}
    rss: dict[int, float] = {}
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * page_mb
    tree = {root_pid}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    sizes = [rss.get(pid, 0.0) for pid in tree]
    return sum(sizes), max(sizes)


def memory_run(folder: Path, image_size: int, workers: int) -> dict[str, Any]:
    """Prepare ``folder`` in a child process; sample its process tree's RSS until it ends."""
    out = Path(tempfile.mkdtemp(prefix="fedrad-bench-memory-"))
    cmd = [sys.executable, __file__, "--_memory", str(folder), str(out),
           "--image-size", str(image_size), "--memory-workers", str(workers)]
    peak_total = peak_single = 0.0
    start = time.perf_counter()
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            while proc.poll() is None:
                total, single = _tree_rss_mb(proc.pid)
                peak_total, peak_single = max(peak_total, total), max(peak_single, single)
                time.sleep(0.02)
            stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory run failed:\n{stderr[-3000:]}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(peak_tree_mb=peak_total, peak_process_mb=peak_single,
                  wall_seconds=time.perf_counter() - start, workers=workers)
    return result


def _memory_child(folder: Path, out: Path, image_size: int, workers: int) -> dict[str, Any]:
    from fedrad.client.prepare import prepare_site
    from fedrad.common.config import load_settings

    warnings.simplefilter("ignore")
    settings = load_settings({"image-size": image_size, "class-names": CLASS_NAMES})
    result = prepare_site(folder / "dicom", folder / "labels.csv", out / "cache", settings,
                          site_id="bench-memory", workers=workers)
    return {"files": result.accepted + result.rejected, "accepted": result.accepted,
            "rss_main_mb": _rss_mb()}


def _monai_chain(size: int, image_size: int, sigma: float) -> Any:
    import torch
    from monai.data import PydicomReader
    from monai.transforms import (
        Compose,
        GaussianSmooth,
        HistogramNormalize,
        LoadImage,
        Resize,
        ScaleIntensity,
    )

    torch.set_num_threads(1)
    return Compose([
        LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True),
        GaussianSmooth(sigma=sigma * size / image_size),
        HistogramNormalize(num_bins=256),
        Resize((image_size, image_size)),
        ScaleIntensity(),
    ])


def subset(folder: Path, count: int) -> Path:
    """A folder holding the first ``count`` files of ``folder`` (hard links) and their labels."""
    target = folder.with_name(f"{folder.name}-first{count}")
    if (target / "complete.json").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    (target / "dicom").mkdir(parents=True)
    lines = (folder / "labels.csv").read_text().splitlines()
    (target / "labels.csv").write_text("\n".join(lines[:count + 1]) + "\n")
    for line in lines[1:count + 1]:
        name = line.split(",")[0]
        os.link(folder / "dicom" / name, target / "dicom" / name)
    (target / "complete.json").write_text(json.dumps({"count": count, "of": str(folder)}))
    return target


def measure(pipeline: str, folder: Path, image_size: int, profile_out: str | None,
            limit: int | None = None) -> dict[str, Any]:
    """Run one pipeline over one encoding's folder in this process; return its numbers."""
    import pydicom

    from fedrad.client.prepare import prepare_site
    from fedrad.common.config import load_settings
    from fedrad.common.dicom import decode_dicom
    from fedrad.common.transforms import build_preprocess

    warnings.simplefilter("ignore")
    files = sorted((folder / "dicom").glob("*.dcm"))[:limit]
    settings = load_settings({"image-size": image_size, "class-names": CLASS_NAMES})
    size = int(pydicom.dcmread(files[0], stop_before_pixels=True).Rows)

    if pipeline == "bare":
        def run_all() -> int:
            for f in files:
                pydicom.dcmread(f).pixel_array  # noqa: B018 - decoding is the work
            return len(files)
        warm = lambda: pydicom.dcmread(files[0]).pixel_array  # noqa: E731
    elif pipeline == "fedrad-decode":
        def run_all() -> int:
            for f in files:
                decode_dicom(f)
            return len(files)
        warm = lambda: decode_dicom(files[0])  # noqa: E731
    elif pipeline == "fedrad":
        out = Path(tempfile.mkdtemp(prefix="fedrad-bench-cache-"))

        def run_all() -> int:
            result = prepare_site(folder / "dicom", folder / "labels.csv", out / "cache",
                                  settings, site_id="bench", workers=1)
            if result.accepted != len(files):
                raise RuntimeError(f"prepare accepted {result.accepted} of {len(files)} "
                                   f"files: {result.reasons}")
            return result.accepted
        warm = lambda: build_preprocess(settings)(decode_dicom(files[0]).pixels)  # noqa: E731
    elif pipeline == "monai":
        chain = _monai_chain(size, image_size, float(settings.denoise_sigma))

        def run_all() -> int:
            for f in files:
                np.asarray(chain(str(f)))
            return len(files)
        warm = lambda: chain(str(files[0]))  # noqa: E731
    else:
        raise ValueError(f"unknown pipeline {pipeline!r}; use one of {PIPELINES}")

    warm()
    rss_before = _rss_mb()
    profiler = cProfile.Profile() if profile_out else None
    start, cpu_start = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.enable()
    n = run_all()
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    if pipeline == "fedrad":
        shutil.rmtree(out, ignore_errors=True)
    if profiler is not None and profile_out:
        profiler.dump_stats(profile_out)
    return {"pipeline": pipeline, "images": n, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "rss_before_mb": rss_before, "rss_peak_mb": _rss_mb()}


def _measure_in_child(pipeline: str, folder: Path, image_size: int,
                      profile_out: str | None = None, limit: int | None = None
                      ) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_measure", pipeline, str(folder),
           "--image-size", str(image_size)]
    if limit is not None:
        cmd += ["--_limit", str(limit)]
    if profile_out:
        cmd += ["--_profile-out", profile_out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{pipeline} on {folder.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rate(r: dict[str, Any]) -> float:
    """Images per CPU-second of the single-threaded process: images/s per core."""
    return r["images"] / max(r["cpu_seconds"], 1e-9)


def _print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    print()
    print("images/s/core = images per CPU-second of the (single-threaded) process, so other "
          "load on the machine does not count; wall = images per wall-clock second.")
    print(f"{'encoding':<18} {'pipeline':<14} {'images':>6} {'images/s/core':>13} "
          f"{'ms/image':>9} {'wall img/s':>10} {'RSS base MB':>11} {'RSS peak MB':>11}")
    for encoding, by_pipe in results.items():
        for name, r in by_pipe.items():
            rate = _rate(r)
            print(f"{encoding:<18} {name:<14} {r['images']:>6} {rate:>13.1f} "
                  f"{1000 / rate:>9.1f} "
                  f"{r['images'] / r['seconds']:>10.1f} "
                  f"{r['rss_before_mb']:>11.0f} {r['rss_peak_mb']:>11.0f}")
    print()
    print(f"{'encoding':<18} {'fedrad/monai':>12} {'fedrad/bare':>11}   targets")
    for encoding, by_pipe in results.items():
        rate = {k: _rate(v) for k, v in by_pipe.items()}
        nan = float("nan")
        vs_monai = rate["fedrad"] / rate["monai"] if {"fedrad", "monai"} <= set(rate) else nan
        vs_bare = rate["fedrad"] / rate["bare"] if {"fedrad", "bare"} <= set(rate) else nan
        if "fedrad" not in rate:
            target = "-"
        elif encoding == "explicit-le":
            target = (f">= 50 img/s/core: {'met' if rate['fedrad'] >= 50 else 'MISSED'}; "
                      f">= 3x MONAI: {'met' if vs_monai >= 3 else 'MISSED'}")
        elif encoding.startswith("jpeg2000"):
            target = f"within 1.2x of bare (>= 0.83): {'met' if vs_bare >= 1 / 1.2 else 'MISSED'}"
        else:
            target = "-"
        print(f"{encoding:<18} {vs_monai:>12.2f} {vs_bare:>11.2f}   {target}")


def _print_memory(m: dict[str, Any], size: int, image_size: int) -> None:
    print()
    print(f"memory: fedrad site prepare over {m['files']:,} files ({size}x{size} 12-bit, "
          f"uncompressed -> {image_size} px) with {m['workers']} worker process(es), "
          f"{m['wall_seconds']:.0f} s wall")
    print("  small images on purpose: for 10,000 files memory is per-file bookkeeping "
          "(prepared images kept for the cache, manifest records); one large file's "
          "decoding memory is the speed run's RSS peak above")
    target = "met" if m["peak_tree_mb"] < 2048 else "MISSED"
    print(f"  peak RSS, prepare + forkserver + workers summed (sampled every 20 ms): "
          f"{m['peak_tree_mb']:.0f} MB   target < 2 GB: {target}")
    print(f"  largest single process sampled {m['peak_process_mb']:.0f} MB; the prepare "
          f"process's own peak (getrusage) {m['rss_main_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200,
                        help="files per encoding (default 200, the issue's full size)")
    parser.add_argument("--size", type=int, default=2048, help="source image side (2048)")
    parser.add_argument("--image-size", type=int, default=224, help="prepared size (224)")
    parser.add_argument("--encodings", default=",".join(ENCODINGS),
                        help=f"comma-separated subset of {','.join(ENCODINGS)}")
    parser.add_argument("--pipelines", default=",".join(PIPELINES),
                        help=f"comma-separated subset of {','.join(PIPELINES)} ('none': "
                        "only the memory run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedrad-site-bench"),
                        help="where the generated files are kept and reused between runs "
                        "(default /tmp/fedrad-site-bench)")
    parser.add_argument("--fresh", action="store_true",
                        help="write the files again even when complete ones are there")
    parser.add_argument("--slow-count", type=int, default=None,
                        help="files for the slow measurements -- every JPEG 2000 pipeline "
                        "and MONAI on any encoding -- when the machine cannot afford "
                        "--count of them (default: --count)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="measurements run at once, each single-threaded (default 1)")
    parser.add_argument("--memory-files", type=int, default=10_000,
                        help="files of the memory run (default 10000; 0 skips it)")
    parser.add_argument("--memory-size", type=int, default=128,
                        help="side of the memory run's images (default 128)")
    parser.add_argument("--memory-workers", type=int, default=2,
                        help="worker processes of the memory run (default 2)")
    parser.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing the files (default: all cores)")
    parser.add_argument("--profile", metavar="ENCODING", default=None,
                        help="also run fedrad's prepare under cProfile on this encoding")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--_measure", nargs=2, metavar=("PIPELINE", "FOLDER"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--_profile-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_limit", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_memory", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure:
        pipeline, folder = args._measure
        print(json.dumps(measure(pipeline, Path(folder), args.image_size, args._profile_out,
                                 args._limit)))
        return 0
    if args._memory:
        folder, out = args._memory
        print(json.dumps(_memory_child(Path(folder), Path(out), args.image_size,
                                       args.memory_workers)))
        return 0

    encodings = [e for e in args.encodings.split(",") if e]
    pipelines = [p for p in args.pipelines.split(",") if p and p != "none"]
    bad = [e for e in encodings if e not in ENCODINGS] + [p for p in pipelines
                                                          if p not in PIPELINES]
    if bad:
        parser.error(f"unknown encoding/pipeline {bad}; see --help")
    workdir = args.workdir
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"site pipeline benchmark: {args.count} x {len(encodings)} files of "
          f"{args.size}x{args.size}, 12 bits stored -> {args.image_size} px; "
          f"python {platform.python_version()}, {os.cpu_count()} cores, one thread per "
          f"pipeline, {args.jobs} measurement(s) at a time; files in {workdir}", flush=True)
    folders = generate(workdir, args.count, args.size, encodings, args.gen_workers)
    slow = args.slow_count if args.slow_count and args.slow_count < args.count else None
    if slow:
        print(f"  slow measurements (every JPEG 2000 pipeline, MONAI on every encoding) on "
              f"the first {slow} files only", flush=True)
        folders = {e: subset(f, slow) if e.startswith("jpeg2000") else f
                   for e, f in folders.items()}
    results: dict[str, dict[str, dict[str, Any]]] = {e: {} for e in encodings}
    runs = [(e, p) for e in encodings for p in pipelines]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {run: pool.submit(_measure_in_child, run[1], folders[run[0]],
                                    args.image_size, None,
                                    slow if run[1] == "monai" else None) for run in runs}
        for (encoding, pipeline), future in futures.items():
            r = future.result()
            results[encoding][pipeline] = r
            print(f"  {encoding:<18} {pipeline:<14} {_rate(r):7.1f} images/s/core",
                  flush=True)
    if runs:
        _print_table(results)
    memory = None
    if args.memory_files > 0:
        folder = generate(workdir / "memory", args.memory_files, args.memory_size,
                          ["explicit-le"], args.gen_workers)["explicit-le"]
        memory = memory_run(folder, args.image_size, args.memory_workers)
        _print_memory(memory, args.memory_size, args.image_size)
    if args.profile:
        stats_path = str(workdir / "prepare.prof")
        _measure_in_child("fedrad", folders[args.profile], args.image_size, stats_path)
        buf = io.StringIO()
        pstats.Stats(stats_path, stream=buf).sort_stats("tottime").print_stats(15)
        print(f"\ncProfile of fedrad's prepare on {args.profile} (top 15 by own time):")
        print("\n".join(buf.getvalue().splitlines()[6:]))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "memory": memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
