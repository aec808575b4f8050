"""How a pooled dataset is spread over simulated hospital sites.

Three schemes, each returning one sorted index array per site that together hold every
sample exactly once:

* ``iid``: a seeded shuffle cut into equal shares;
* ``label-skew``: per class, Dirichlet(``alpha``) proportions over the sites (small
  ``alpha`` gives sites dominated by a few classes), see :func:`partition_non_iid`;
* ``quantity-skew``: site sizes drawn from Dirichlet(``alpha``), samples assigned IID, so
  sites differ in size but not in label mix (small ``alpha``: a few large sites).

Impossible requests (more sites than samples, ``alpha <= 0``, a minimum per site that the
data cannot give) raise :class:`~fedrad.common.errors.ConfigError` naming the setting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedrad.common.errors import ConfigError

from .medmnist import partition_non_iid

__all__ = ["SCHEMES", "partition_indices"]

#: Accepted partition schemes.
SCHEMES: tuple[str, ...] = ("iid", "label-skew", "quantity-skew")


def _labels_1d(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(f"labels must have shape (N,) or (N, 1), got {y.shape}")
    return y


def _check_common(n: int, num_sites: int, min_per_site: int) -> None:
    if not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ConfigError(f"sites={num_sites!r} must be a positive integer")
    if num_sites > n:
        raise ConfigError(f"cannot split {n} samples over {num_sites} sites: use at most {n} sites")
    if min_per_site < 0 or min_per_site * num_sites > n:
        raise ConfigError(
            f"min-per-site={min_per_site} is impossible with {n} samples over {num_sites} "
            f"sites; use at most {n // num_sites}"
        )


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(
            f"alpha={alpha!r} must be > 0 (small, e.g. 0.1: strong skew; large, e.g. 100: "
            "nearly even)"
        )


def _quantity_skew(n: int, num_sites: int, alpha: float, min_per_site: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    spare = n - min_per_site * num_sites
    props = rng.dirichlet(np.full(num_sites, float(alpha)))
    if not np.all(np.isfinite(props)):  # extreme alpha underflow: one site takes the rest
        props = np.eye(num_sites)[rng.integers(num_sites)]
    extra = np.floor(props * spare).astype(int)
    # hand the rounding remainder to the sites with the largest fractional parts
    remainder = spare - int(extra.sum())
    order = np.argsort(-(props * spare - extra), kind="stable")
    extra[order[:remainder]] += 1
    sizes = extra + min_per_site
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def partition_indices(
    labels: np.ndarray | Sequence[int],
    num_sites: int,
    *,
    scheme: str = "label-skew",
    alpha: float = 0.5,
    seed: int = 0,
    min_per_site: int | None = None,
) -> list[np.ndarray]:
    """Split sample indices over ``num_sites`` sites with the given scheme.

    Parameters
    ----------
    labels:
        Class index per sample, shape ``(N,)`` or ``(N, 1)``.
    num_sites:
        Number of sites, 1 to N.
    scheme:
        ``iid``, ``label-skew`` or ``quantity-skew`` (see the module docstring).
    alpha:
        Dirichlet concentration for the skewed schemes, > 0 (ignored by ``iid``).
    seed:
        Random seed: the same arguments give the same split.
    min_per_site:
        Fewest samples per site (default ``min(10, N // num_sites)``).

    Returns
    -------
    list of numpy.ndarray
        One sorted ``int64`` index array per site.

    Raises
    ------
    ConfigError
        For an unknown scheme or an impossible request.
    """
    if scheme not in SCHEMES:
        raise ConfigError(
            f"partition scheme {scheme!r} is unknown; use one of {', '.join(SCHEMES)}"
        )
    y = _labels_1d(labels)
    n = len(y)
    if min_per_site is None:
        min_per_site = min(10, n // max(int(num_sites), 1)) if num_sites else 0
    _check_common(n, num_sites, min_per_site)
    if scheme == "label-skew":
        _check_alpha(alpha)
        return partition_non_iid(y, num_sites, alpha=alpha, seed=seed, min_per_site=min_per_site)
    rng = np.random.default_rng([seed, 7])
    if scheme == "iid":
        perm = rng.permutation(n)
        return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_sites)]
    _check_alpha(alpha)
    return [p.astype(np.int64) for p in _quantity_skew(n, num_sites, alpha, min_per_site, rng)]
