"""Deterministic, stratified splits of a site's cached samples."""

from __future__ import annotations

import numpy as np

__all__ = ["train_val_split"]


def train_val_split(
    labels: np.ndarray, val_fraction: float, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into training and validation parts, stratified by label.

    Each class keeps ``round(count * val_fraction)`` samples for validation (at least one
    when the class has two or more samples and ``val_fraction > 0``), chosen by a seeded
    permutation, so the same cache, fraction and seed always give the same split.

    Returns
    -------
    (train_idx, val_idx):
        Sorted int64 index arrays that together cover every sample exactly once.
    """
    labels = np.asarray(labels)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and n_val == 0 and len(idx) >= 2:
            n_val = 1
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    empty = np.zeros(0, dtype=np.int64)
    train = np.sort(np.concatenate(train_parts)) if train_parts else empty
    val = np.sort(np.concatenate(val_parts)) if val_parts else empty
    return train.astype(np.int64), val.astype(np.int64)
