"""Sites' train / held-out splits: fixed fraction, and k-fold cross-validation."""

from __future__ import annotations

import numpy as np
import pytest

from fedrad.common.config import load_settings
from fedrad.common.errors import ConfigError
from fedrad.common.splits import site_split, train_val_split

LABELS = np.random.default_rng(0).integers(0, 3, 101)


def test_fraction_split_is_stratified_and_covers_every_sample() -> None:
    train, val = train_val_split(LABELS, 0.2, seed=1)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(LABELS)))
    for cls in range(3):
        assert abs((LABELS[val] == cls).sum() - 0.2 * (LABELS == cls).sum()) <= 1
    again = train_val_split(LABELS, 0.2, seed=1)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(train_val_split(LABELS, 0.2, seed=2)[1], val)


def test_k_folds_partition_the_samples_and_are_stratified() -> None:
    k = 5
    vals = [train_val_split(LABELS, 0.2, seed=3, folds=k, fold=f) for f in range(k)]
    held_out = np.concatenate([v for _, v in vals])
    assert np.array_equal(np.sort(held_out), np.arange(len(LABELS)))  # each sample once
    for train, val in vals:
        assert not set(train) & set(val)
        assert len(train) + len(val) == len(LABELS)
        for cls in range(3):
            assert abs((LABELS[val] == cls).sum() - (LABELS == cls).sum() / k) <= 1


def test_site_split_follows_the_settings() -> None:
    settings = load_settings({"cv-folds": 4, "cv-fold": 2, "seed": 5})
    got = site_split(LABELS, settings)
    expected = train_val_split(LABELS, 0.2, seed=5, folds=4, fold=2)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    plain = site_split(LABELS, load_settings({"val-fraction": 0.3, "seed": 5}))
    assert len(plain[1]) == pytest.approx(0.3 * len(LABELS), abs=2)


@pytest.mark.parametrize("config", [{"cv-folds": 1}, {"cv-folds": 3, "cv-fold": 3}])
def test_bad_fold_settings_are_refused(config) -> None:
    with pytest.raises(ConfigError, match="'cv-folds' must be 0 \\(off\\) or at least 2"):
        load_settings(config)
    with pytest.raises(ValueError, match="folds must be 0"):
        train_val_split(LABELS, 0.2, folds=config["cv-folds"], fold=config.get("cv-fold", 0))
