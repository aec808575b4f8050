"""Deterministic, stratified splits of a site's cached samples."""

from __future__ import annotations

import numpy as np

from .config import Settings

__all__ = ["train_val_split", "site_split"]


def train_val_split(
    labels: np.ndarray, val_fraction: float, *, seed: int = 0, folds: int = 0, fold: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into training and validation parts, stratified by label.

    Each class keeps ``round(count * val_fraction)`` samples for validation (at least one
    when the class has two or more samples and ``val_fraction > 0``), chosen by a seeded
    permutation, so the same cache, fraction and seed always give the same split.

    With ``folds >= 2`` (k-fold cross-validation) ``val_fraction`` is not used: each
    class's seeded permutation is cut into ``folds`` near-equal parts and part ``fold``
    is the validation split, so the folds' validation splits partition the samples.

    Returns
    -------
    (train_idx, val_idx):
        Sorted int64 index arrays that together cover every sample exactly once.
    """
    labels = np.asarray(labels)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if folds == 1 or folds < 0 or (folds and not 0 <= fold < folds):
        raise ValueError(f"folds must be 0 (off) or >= 2 with 0 <= fold < folds; got "
                         f"folds={folds}, fold={fold}")
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        if folds:
            parts = np.array_split(idx, folds)
            val_parts.append(parts[fold])
            train_parts.extend(p for i, p in enumerate(parts) if i != fold)
            continue
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and n_val == 0 and len(idx) >= 2:
            n_val = 1
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    empty = np.zeros(0, dtype=np.int64)
    train = np.sort(np.concatenate(train_parts)) if train_parts else empty
    val = np.sort(np.concatenate(val_parts)) if val_parts else empty
    return train.astype(np.int64), val.astype(np.int64)


def site_split(labels: np.ndarray, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """A site's training and held-out indices under the run's settings.

    ``val-fraction`` and ``seed``, or with ``cv-folds`` fold ``cv-fold`` of the k folds.
    """
    return train_val_split(labels, settings.val_fraction, seed=settings.seed,
                           folds=settings.cv_folds, fold=settings.cv_fold)
