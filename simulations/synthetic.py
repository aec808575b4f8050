"""A synthetic multi-site chest radiograph federation, written as DICOM site folders.

:func:`make_phantom` draws a chest-radiograph-like phantom (body outline, two lungs,
mediastinum and heart shadow, spine, ribs, lung markings) with random anatomy and exposure.
With ``opacity=True`` it adds a soft-edged, patchy airspace opacity inside one lung, with a
random size and a low-to-moderate contrast: a fair share of opacities are subtle, so the task is
learnable but not trivially separable.

:func:`generate_synthetic_federation` writes several sites (each with its own scanner profile,
size and prevalence) and a central held-out test set::

    out_dir/site-1/dicom/img-00000.dcm ...   out_dir/site-1/labels.csv
    out_dir/site-2/...
    out_dir/test/...
    out_dir/federation.json

It is the default demo data when no real dataset is given.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.common.errors import ConfigError

from .dicom_writer import (
    DEFAULT_PROFILES,
    MIN_JPEG2000_SIZE,
    Federation,
    ScannerProfile,
    SiteFolder,
    check_dicom_readable,
    prepare_output_dir,
    resolve_workers,
    run_tasks,
    write_dicom,
    write_labels_csv,
)

__all__ = [
    "CLASS_NAMES",
    "make_phantom",
    "site_plan",
    "generate_synthetic_federation",
]

logger = logging.getLogger(__name__)

#: Label names of the synthetic task, in label order.
CLASS_NAMES: list[str] = ["normal", "opacity"]

# Opacity settings, calibrated so that a small CNN trained with FedAvg on the default
# federation (3 x ~240 images at 64 px, 1 local epoch per round) reaches a central-test AUC of
# about 0.85-0.9 after 6-10 rounds, and about 0.95 when trained centrally to convergence: a
# share of the opacities stays hard to see.  Weaker settings (e.g. contrast 0.05 + 0.2 * Beta)
# left FedAvg near chance after 10 rounds.
# Peak contrast: base + span * Beta(1.3, 2.2), i.e. skewed towards the subtle end.
_OPACITY_CONTRAST = (0.12, 0.30)
# How patchy (textured) an opacity is, 0..1.
_PATCHINESS = 0.3
# Amplitude range of the lung markings texture.
_MARKINGS = (0.012, 0.025)
# Opacity radius range, in units of half the image side.
_OPACITY_RADIUS = (0.15, 0.35)

# Seed-stream tags that keep the random streams of labels, sites and test images apart.
_LABEL_STREAM = 1
_IMAGE_STREAM = 2
_TEST_SITE = 10_000


@functools.lru_cache(maxsize=64)
def _bump_basis(size: int, length: float) -> np.ndarray:
    """``(size, m)`` matrix of Gaussian bumps of width ``length`` px spaced ``length`` apart."""
    m = int(np.ceil(size / length)) + 4
    centres = (np.arange(m, dtype=np.float64) - 2.0) * length
    pixels = np.arange(size, dtype=np.float64)[:, None]
    return np.exp(-0.5 * ((pixels - centres[None, :]) / length) ** 2).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with correlation length ~``scale`` * size.

    A separable sum of Gaussian bumps with random weights (two small matrix products), much
    cheaper than FFT filtering at these sizes.  ``np.einsum`` (not ``@``) keeps these tiny
    products out of the multi-threaded BLAS, which is very slow on busy or oversubscribed
    machines (e.g. inside a process pool).
    """
    # Lengths are rounded to a quarter pixel so that the basis cache is reused.
    length = max(round(scale * size * 4.0) / 4.0, 0.5)
    basis = _bump_basis(size, length)
    weights = rng.standard_normal((basis.shape[1], basis.shape[1]), dtype=np.float32)
    field = np.einsum("ij,kj->ik", np.einsum("ij,jk->ik", basis, weights), basis)
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


def _soft_ellipse(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float, edge: float
) -> np.ndarray:
    """Soft mask (1 inside, 0 outside) of an ellipse; ``edge`` is the blur width."""
    du = (u - cu) / au
    dv = (v - cv) / av
    r = np.sqrt(du * du + dv * dv)
    return _sigmoid((1.0 - r) / edge)


def make_phantom(rng: np.random.Generator, size: int, *, opacity: bool) -> np.ndarray:
    """Draw one synthetic frontal chest radiograph.

    Parameters
    ----------
    rng:
        Random generator; the same state gives the same image.
    size:
        Output side in pixels (square image), at least 16.
    opacity:
        Add a patchy airspace opacity inside one lung (the positive class).

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(size, size)`` in ``[0, 1]``, display convention
        (air dark, bone bright).
    """
    if size < 16:
        raise ConfigError(f"phantom size {size} is too small; use at least 16 pixels")
    # Pixel grid in normalised coordinates: u to the image right, v downwards, both in [-1, 1].
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    v0 = axis[:, None]
    u0 = axis[None, :]
    edge_px = 2.0 / size  # one pixel in normalised units

    # Patient positioning: small rotation, shift and magnification.
    theta = np.deg2rad(rng.uniform(-4.0, 4.0))
    scale = rng.uniform(0.9, 1.06)
    du, dv = rng.uniform(-0.05, 0.05, size=2)
    c, s = np.float32(np.cos(theta) / scale), np.float32(np.sin(theta) / scale)
    u = c * (u0 - np.float32(du)) + s * (v0 - np.float32(dv))
    v = -s * (u0 - np.float32(du)) + c * (v0 - np.float32(dv))
    abs_u = np.abs(u)

    # Body habitus and exposure.
    body_w = rng.uniform(0.8, 0.95)
    tissue = rng.uniform(0.42, 0.55)
    air = rng.uniform(0.02, 0.08)
    gain = rng.uniform(0.9, 1.1)
    body = _soft_ellipse(u, v, 0.0, 0.35, body_w, 1.3, edge=0.03 + edge_px)
    img = air + (tissue - air) * body

    # Lungs: two tall ellipses; the right lung (image left) is a little larger.
    lung_w = rng.uniform(0.25, 0.31)
    lung_h = rng.uniform(0.5, 0.6)
    lung_top = rng.uniform(-0.78, -0.66)
    sep = rng.uniform(0.36, 0.42) * body_w / 0.88
    lung_cv = lung_top + lung_h
    lung_edge = 0.05 + edge_px
    right_cv, left_cv = lung_cv + rng.uniform(-0.03, 0.03, size=2)
    lungs = [
        _soft_ellipse(u, v, -sep, right_cv, lung_w * 1.05, lung_h, edge=lung_edge),
        _soft_ellipse(u, v, sep, left_cv, lung_w * 0.95, lung_h * 0.97, edge=lung_edge),
    ]
    lung_field = np.maximum(lungs[0], lungs[1])
    # Lung markings: smooth texture; the bases are darker than the apices.
    markings = _smooth_noise(rng, size, scale=rng.uniform(0.025, 0.05))
    lung_depth = rng.uniform(0.22, 0.32)
    base_gradient = 1.0 + 0.25 * np.clip(v - lung_top, 0.0, 1.5)
    img -= lung_field * (lung_depth * base_gradient - rng.uniform(*_MARKINGS) * markings)

    # Mediastinum and spine, then the heart shadow over the lower left lung.
    med_w = rng.uniform(0.1, 0.15)
    mediastinum = _sigmoid((med_w - abs_u) / 0.03) * _sigmoid((v - lung_top + 0.1) / 0.05)
    img += (
        rng.uniform(0.1, 0.16) * mediastinum
        + rng.uniform(0.03, 0.06) * _sigmoid((0.05 - abs_u) / 0.015)
    ) * body
    heart_cu = rng.uniform(0.1, 0.18)
    heart_cv = lung_cv + lung_h * rng.uniform(0.35, 0.5)
    heart_au, heart_av = rng.uniform(0.26, 0.36), rng.uniform(0.24, 0.32)
    heart = _soft_ellipse(u, v, heart_cu, heart_cv, heart_au, heart_av, edge=0.08 + edge_px)
    img += rng.uniform(0.1, 0.16) * heart

    # Posterior ribs: evenly spaced arcs, computed in one pass from the distance to the
    # nearest arc in "rib coordinates".
    n_ribs = 9
    spacing = lung_h * 1.9 / n_ribs
    curve = rng.uniform(0.7, 1.0)
    rib_coord = (v - lung_top + 0.02 - curve * (abs_u - 0.3) ** 2) / spacing
    nearest = np.clip(np.rint(rib_coord), 0, n_ribs - 1)
    dist = (rib_coord - nearest) * (spacing / rng.uniform(0.016, 0.026))
    ribs = np.exp(-dist * dist)
    ribs *= _sigmoid((abs_u - 0.1) / 0.03) * _sigmoid((0.85 * body_w - abs_u) / 0.05)
    img += rng.uniform(0.03, 0.06) * ribs * body

    if opacity:
        img += _opacity(rng, size, u, v, lungs, sep, lung_cv, lung_w, lung_h)

    # Exposure variation: global gain around the air level.
    img = (img - air) * gain + air
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _opacity(
    rng: np.random.Generator,
    size: int,
    u: np.ndarray,
    v: np.ndarray,
    lungs: list[np.ndarray],
    sep: float,
    lung_cv: float,
    lung_w: float,
    lung_h: float,
) -> np.ndarray:
    """A soft-edged, patchy airspace opacity inside one lung (additive brightening)."""
    side_idx = int(rng.integers(0, 2))
    lung_cu = -sep if side_idx == 0 else sep
    # Centre: uniform over the inner 75 % of the lung ellipse.
    r = 0.75 * np.sqrt(rng.uniform())
    phi = rng.uniform(0.0, 2.0 * np.pi)
    cu = lung_cu + r * lung_w * np.cos(phi)
    cv = lung_cv + r * lung_h * np.sin(phi)
    radius = rng.uniform(*_OPACITY_RADIUS)
    aspect = rng.uniform(0.6, 1.5)
    angle = rng.uniform(0.0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    du, dv = u - cu, v - cv
    a = (ca * du + sa * dv) / (radius * aspect)
    b = (-sa * du + ca * dv) / (radius / aspect)
    d2 = a * a + b * b
    blob = np.exp(-0.5 * d2 * np.sqrt(d2))  # soft edge, flatter top than a Gaussian
    texture = _smooth_noise(rng, size, scale=rng.uniform(0.02, 0.04))
    patch = np.clip(1.0 - _PATCHINESS + _PATCHINESS * texture, 0.0, 1.0)
    contrast = _OPACITY_CONTRAST[0] + _OPACITY_CONTRAST[1] * rng.beta(1.3, 2.2)
    return contrast * blob * patch * lungs[side_idx]


def site_plan(
    num_sites: int,
    images_per_site: int | Sequence[int],
    prevalence: float | Sequence[float],
) -> tuple[list[int], list[float]]:
    """Per-site sizes and prevalences.

    An integer ``images_per_site`` gives sites of different sizes around that mean (from 0.75x
    to 1.25x); a float ``prevalence`` gives prevalences spread by +-0.1 around it (largest site,
    lowest prevalence).  Sequences are used as given.

    Returns
    -------
    (sizes, prevalences)
    """
    if num_sites < 1:
        raise ConfigError(f"num_sites={num_sites!r} must be >= 1")
    if isinstance(images_per_site, (int, np.integer)):
        if images_per_site < 2:
            raise ConfigError(f"images_per_site={images_per_site!r} must be >= 2")
        factors = np.linspace(0.75, 1.25, num_sites) if num_sites > 1 else np.ones(1)
        sizes = [max(2, int(round(images_per_site * f))) for f in factors]
    else:
        sizes = [int(n) for n in images_per_site]
        if len(sizes) != num_sites or min(sizes) < 2:
            raise ConfigError(
                f"images_per_site has {len(sizes)} entries {sizes}; give {num_sites} "
                "counts of at least 2 (or one integer)"
            )
    if isinstance(prevalence, (float, int, np.floating, np.integer)):
        if not 0.0 < float(prevalence) < 1.0:
            raise ConfigError(f"prevalence={prevalence!r} must be strictly between 0 and 1")
        spread = np.linspace(0.1, -0.1, num_sites) if num_sites > 1 else np.zeros(1)
        prevs = [float(np.clip(prevalence + d, 0.05, 0.95)) for d in spread]
    else:
        prevs = [float(p) for p in prevalence]
        if len(prevs) != num_sites or not all(0.0 < p < 1.0 for p in prevs):
            raise ConfigError(
                f"prevalence has entries {prevs}; give {num_sites} values strictly between "
                "0 and 1 (or one float)"
            )
    return sizes, prevs


def _labels(n: int, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(n * prevalence) positives (at least one of each class), shuffled."""
    pos = min(max(int(round(n * prevalence)), 1), n - 1)
    labels = np.zeros(n, dtype=np.int64)
    labels[:pos] = 1
    rng.shuffle(labels)
    return labels


def _write_one(task: tuple[Any, ...]) -> str:
    """Worker: draw one phantom and write it (top level so process pools can pickle it)."""
    path, label, size, seed_key, profile, patient_name, patient_id, number = task
    rng = np.random.default_rng(seed_key)
    image = make_phantom(rng, size, opacity=bool(label))
    write_dicom(
        path,
        image,
        profile=profile,
        rng=rng,
        patient_name=patient_name,
        patient_id=patient_id,
        instance_number=number,
    )
    return str(path)


def _write_folder(
    root: Path,
    site_id: str,
    tag: str,
    labels: np.ndarray,
    profiles: Sequence[ScannerProfile],
    size: int,
    seed: int,
    site_index: int,
    workers: int,
) -> SiteFolder:
    dicom_dir = root / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    rows = []
    for i, label in enumerate(labels.tolist()):
        name = f"img-{i:05d}.dcm"
        profile = profiles[i % len(profiles)]
        tasks.append(
            (
                dicom_dir / name,
                label,
                size,
                [seed, _IMAGE_STREAM, site_index, i],
                profile,
                f"SYNTH^{tag}{i + 1:04d}",
                f"{tag}-{i + 1:06d}",
                i + 1,
            )
        )
        rows.append((name, label))
    run_tasks(_write_one, tasks, workers)
    labels_csv = root / "labels.csv"
    write_labels_csv(labels_csv, rows)
    check_dicom_readable(dicom_dir / rows[0][0])
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).tolist()
    return SiteFolder(
        site_id=site_id,
        root=root,
        dicom_dir=dicom_dir,
        labels_csv=labels_csv,
        num_images=len(rows),
        class_counts=counts,
        profile=",".join(dict.fromkeys(p.name for p in profiles)),
    )


def generate_synthetic_federation(
    out_dir: str | os.PathLike[str],
    *,
    num_sites: int = 3,
    images_per_site: int | Sequence[int] = 240,
    test_images: int = 300,
    image_size: int = 128,
    prevalence: float | Sequence[float] = 0.4,
    seed: int = 0,
    profiles: Sequence[ScannerProfile] = DEFAULT_PROFILES,
    test_profile: ScannerProfile | None = None,
    workers: int | None = 1,
    overwrite: bool = False,
) -> Federation:
    """Write a synthetic chest-radiograph federation of DICOM site folders.

    Parameters
    ----------
    out_dir:
        Output folder; receives ``site-1`` ... ``site-N``, ``test`` and ``federation.json``.
    num_sites:
        Number of sites.
    images_per_site:
        Mean site size (sites then range from 0.75x to 1.25x of it) or one count per site.
    test_images:
        Size of the central held-out test set (0: none).
    image_size:
        Side of the square images in pixels.
    prevalence:
        Mean fraction of ``opacity`` images (sites spread +-0.1 around it; the test set uses
        it as is) or one value per site.
    seed:
        Random seed; the same arguments give the same images, labels and files whatever
        ``workers`` is.
    profiles:
        Scanner profiles, cycled over the sites.
    test_profile:
        Profile for the test set; ``None`` mixes the site profiles image by image, like a
        central archive fed by all sites.
    workers:
        Worker processes (1: none; 0 or ``None``: one per CPU).
    overwrite:
        Replace site/test folders left by an earlier run instead of refusing.

    Returns
    -------
    Federation
        The sites, the test folder and ``class_names == ["normal", "opacity"]``; also saved
        as ``out_dir/federation.json``.
    """
    if not profiles:
        raise ConfigError("profiles is empty; give at least one ScannerProfile")
    if image_size < 16:
        raise ConfigError(f"image_size={image_size!r} must be at least 16")
    small_j2k = [
        p.name
        for p in [*profiles, *([test_profile] if test_profile else [])]
        if p.transfer_syntax.startswith("jpeg2000")
    ]
    if small_j2k and image_size < MIN_JPEG2000_SIZE:
        raise ConfigError(
            f"image_size={image_size} is too small for the JPEG 2000 profile(s) "
            f"{', '.join(small_j2k)}: the installed encoder needs at least {MIN_JPEG2000_SIZE} "
            "pixels a side"
        )
    if test_images < 0 or test_images == 1:
        raise ConfigError(f"test_images={test_images!r} must be 0 or at least 2")
    sizes, prevs = site_plan(num_sites, images_per_site, prevalence)
    n_workers = resolve_workers(workers)
    out = Path(out_dir)
    site_ids = [f"site-{k + 1}" for k in range(num_sites)]
    prepare_output_dir(out, [*site_ids, "test"], overwrite=overwrite)

    start = time.perf_counter()
    sites = []
    for k, (site_id, n, p) in enumerate(zip(site_ids, sizes, prevs, strict=True)):
        labels = _labels(n, p, np.random.default_rng([seed, _LABEL_STREAM, k]))
        profile = profiles[k % len(profiles)]
        sites.append(
            _write_folder(
                out / site_id,
                site_id,
                f"S{k + 1}",
                labels,
                [profile],
                image_size,
                seed,
                k,
                n_workers,
            )
        )
        logger.info(
            "%s: %d images (%s), profile %s", site_id, n, sites[-1].class_counts, profile.name
        )
    test = None
    if test_images:
        base_prev = prevalence if isinstance(prevalence, (float, int)) else float(np.mean(prevs))
        labels = _labels(
            test_images, float(base_prev), np.random.default_rng([seed, _LABEL_STREAM, _TEST_SITE])
        )
        test_profiles = [test_profile] if test_profile is not None else list(profiles)
        test = _write_folder(
            out / "test",
            "test",
            "T",
            labels,
            test_profiles,
            image_size,
            seed,
            _TEST_SITE,
            n_workers,
        )
    elapsed = time.perf_counter() - start
    description = (
        f"synthetic chest-phantom federation: {num_sites} sites "
        f"({'/'.join(map(str, sizes))} images, opacity prevalence "
        f"{'/'.join(f'{p:.2f}' for p in prevs)}), test set {test_images} images, "
        f"{image_size}x{image_size} px, seed {seed}"
    )
    federation = Federation(
        sites=sites,
        test=test,
        class_names=list(CLASS_NAMES),
        description=description,
        root=out,
        extra={"generator": "synthetic", "seed": seed, "image_size": image_size},
    )
    federation.save(out)
    logger.info("wrote %s in %.1f s (%d workers)", description, elapsed, n_workers)
    return federation
