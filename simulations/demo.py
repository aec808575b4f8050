"""``fedrad demo``: a whole federated study on one machine.

1. Write a federation of hospital sites as DICOM folders: synthetic chest phantoms by
   default, or the images of a MedMNIST-format ``.npz`` spread non-IID over the sites.
2. Prepare every site's local cache exactly as a real site would (decode, LUTs,
   preprocessing), and the held-out test set the coordinator scores centrally.
3. Run the federated training through Flower's simulation engine: each simulated
   SuperNode trains on its own site's cache only; the server prints pooled metrics
   every round and writes checkpoints and metrics files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrad.client.client_app import SiteContext, make_client_app
from fedrad.client.prepare import PrepareResult, prepare_site
from fedrad.common.config import Settings, load_settings
from fedrad.common.errors import FedradError, SiteDataError
from fedrad.server.server_app import RoundReport, make_server_app

from .dicom_writer import ScannerProfile
from .engine import run_in_simulation
from .medmnist import write_medmnist_federation
from .synthetic import generate_synthetic_federation

__all__ = [
    "DemoOptions",
    "DemoResult",
    "MEDMNIST_DEFAULTS",
    "SYNTHETIC_DEFAULTS",
    "prepare_federation",
    "run_demo",
]

log = logging.getLogger(__name__)

#: Run settings of the default demo (synthetic chest phantoms, 64 px).
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "model": "resnet18",
    "image-size": 64,
    "num-server-rounds": 5,
    "local-epochs": 2,
    "batch-size": 32,
    "learning-rate": 0.001,
    "lr-decay": 0.8,
    "optimizer": "adam",
    "min-sites": 2,
}

#: Run settings of the demo on a MedMNIST-format ``.npz`` (28 px images).
MEDMNIST_DEFAULTS: dict[str, Any] = {
    "model": "resnet18",
    "image-size": 28,
    "stem": "standard",
    "num-server-rounds": 10,
    "local-epochs": 1,
    "batch-size": 64,
    "learning-rate": 0.05,
    "lr-decay": 0.85,
    "optimizer": "sgd",
    "denoise-sigma": 0.0,
    "min-sites": 2,
}


#: The coordinator's copy of a dataset's official test split keeps its original 8-bit pixels
#: (no simulated scanner noise), so central scores compare with the dataset's published ones.
ORIGINAL_PIXELS = ScannerProfile(
    name="original", manufacturer="Dataset", model_name="official test split",
    noise_std=0.0, contrast=1.0, bits_stored=8, photometric="MONOCHROME2",
    transfer_syntax="explicit-le", modality="DX", institution="Coordinator",
)


@dataclass
class DemoOptions:
    """What ``fedrad demo`` was asked to do."""

    out_dir: Path = Path("fedrad-demo")
    data_path: Path | None = None
    num_sites: int = 3
    alpha: float = 0.5
    seed: int = 0
    workers: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    overrides: Mapping[str, Any] = field(default_factory=dict)
    images_per_site: int = 240
    max_train_per_site: int | None = None


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, and its final metrics."""

    out_dir: Path
    run_dir: Path
    settings: Settings
    prepared: list[PrepareResult]
    rounds: list[RoundReport]
    seconds: float

    @property
    def final(self) -> RoundReport:
        """The last round's report."""
        return self.rounds[-1]


def _federation(opts: DemoOptions, sites_root: Path, image_size: int):
    if opts.data_path is None:
        return generate_synthetic_federation(
            sites_root, num_sites=opts.num_sites, images_per_site=opts.images_per_site,
            image_size=max(128, image_size), seed=opts.seed, workers=opts.workers,
            overwrite=True,
        )
    return write_medmnist_federation(
        opts.data_path, sites_root, num_sites=opts.num_sites, alpha=opts.alpha, seed=opts.seed,
        max_train_per_site=opts.max_train_per_site, workers=opts.workers, overwrite=True,
        test_profile=ORIGINAL_PIXELS,
    )


def prepare_federation(
    federation: Any,
    caches_root: Path,
    base: Settings,
    *,
    workers: int | None = 1,
    say: Callable[[str], None] = log.info,
) -> tuple[list[PrepareResult], dict[int, SiteContext], str]:
    """Prepare every site's cache (and the coordinator's test cache) as real sites would.

    A site whose images are all unusable is left out, with its reason, while at least
    ``min-sites`` sites remain.  Returns the preparation results, the simulated sites by
    partition id, and the central test cache folder (empty when the federation has none).

    Raises
    ------
    SiteDataError
        Fewer than ``min-sites`` sites have usable images.
    """
    prepared: list[PrepareResult] = []
    sites: dict[int, SiteContext] = {}
    for site in federation.sites:
        try:
            result = prepare_site(site.dicom_dir, site.labels_csv, caches_root / site.site_id,
                                  base, site_id=site.site_id, workers=workers)
        except SiteDataError as err:
            say(f"  {site.site_id}: left out of the federation: {err}")
            continue
        prepared.append(result)
        sites[len(sites)] = SiteContext(site_id=site.site_id, data_dir=result.cache_dir)
        say(f"  {site.site_id}: {result.accepted} images cached, {result.rejected} quarantined "
            f"({result.seconds:.1f} s)")
    if len(sites) < base.min_sites:
        raise SiteDataError(
            "too-few-sites",
            f"only {len(sites)} of {len(federation.sites)} sites have usable images, fewer "
            f"than min-sites={base.min_sites}; see the reasons above",
        )
    if len(sites) < len(federation.sites):
        say(f"Continuing with the {len(sites)} sites that have usable images "
            f"(min-sites={base.min_sites}).")
    central_dir = ""
    if federation.test is not None:
        test = prepare_site(federation.test.dicom_dir, federation.test.labels_csv,
                            caches_root / "central-test", base, site_id="central-test",
                            workers=workers)
        prepared.append(test)
        central_dir = str(test.cache_dir)
        say(f"  central test set: {test.accepted} images cached")
    return prepared, sites, central_dir


def run_demo(
    opts: DemoOptions,
    *,
    say: Callable[[str], None] = log.info,
    on_round: Callable[[RoundReport], None] | None = None,
) -> DemoResult:
    """Write the sites, prepare their caches and run the federated training.

    Raises
    ------
    FedradError
        For a bad dataset path or layout, a bad setting, or a federation that cannot
        run (e.g. fewer sites than ``min-sites``); always before training starts.
    """
    started = time.perf_counter()
    if opts.num_sites < 1:
        raise FedradError("bad-config", f"--sites must be at least 1, got {opts.num_sites}")
    defaults = SYNTHETIC_DEFAULTS if opts.data_path is None else MEDMNIST_DEFAULTS
    base = load_settings({**defaults, **opts.overrides, "seed": opts.seed})
    if base.min_sites > opts.num_sites:
        base = base.replace(min_sites=opts.num_sites)
    out_dir = Path(opts.out_dir).absolute()
    sites_root = out_dir / "sites"
    source = "synthetic chest phantoms" if opts.data_path is None else str(opts.data_path)
    say(f"Writing {opts.num_sites} sites of DICOM files from {source} into {sites_root}")
    federation = _federation(opts, sites_root, base.image_size)
    say(federation.description)
    if len(federation.class_names) != base.num_classes or not base.class_names:
        base = base.replace(num_classes=len(federation.class_names),
                            class_names=",".join(federation.class_names))

    prepared, sites, central_dir = prepare_federation(
        federation, out_dir / "caches", base, workers=opts.workers, say=say)

    run_dir = out_dir / "run"
    settings = base.replace(out_dir=str(run_dir), central_eval_dir=central_dir)
    (out_dir / "settings.json").write_text(json.dumps(settings.to_run_config(), indent=2))
    say(f"Federated training: {settings.model}, {settings.num_server_rounds} rounds x "
        f"{settings.local_epochs} local epoch(s), {len(sites)} sites, "
        f"{settings.image_size} px")

    reports: list[RoundReport] = []

    def _on_round(report: RoundReport) -> None:
        reports.append(report)
        if on_round is not None:
            on_round(report)

    run_in_simulation(
        server_app=make_server_app(settings, on_round=_on_round),
        client_app=make_client_app(sites, threads=1),
        num_sites=len(sites),
    )
    if len(reports) < settings.num_server_rounds:
        raise FedradError(
            "run-failed",
            f"the federated run completed {len(reports)} of {settings.num_server_rounds} "
            "rounds; see the log above for the sites' errors",
        )
    return DemoResult(out_dir=out_dir, run_dir=run_dir, settings=settings, prepared=prepared,
                      rounds=reports, seconds=time.perf_counter() - started)
