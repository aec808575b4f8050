"""Differential privacy for a site's model update: clipping, Gaussian noise, RDP accounting.

Plain torch / numpy, no Flower.  The client side (:mod:`fedrad.client.privacy`) uses these
pieces on every DP round; the functions are also usable on their own.

The mechanism
-------------
A site receives the global weights ``g``, trains, and gets new weights ``w``.  Its *update*
``u = w - g`` (over the floating-point tensors: weights and float buffers such as BatchNorm's
running means and variances; integer buffers such as ``num_batches_tracked`` are passed through
untouched) is clipped to L2 norm ``C`` (``dp-clip``) over all those tensors together, and
Gaussian noise ``N(0, (sigma * C)^2)`` is added to every coordinate (``sigma`` is
``dp-noise-multiplier``).  The site releases ``g + clip(u) + noise``.

What the guarantee covers
-------------------------
The unit of privacy is the **site's whole contribution to a round** (a site-level, also called
user-level, guarantee, as in DP-FedAvg, McMahan et al. 2018), not one image: the site clips its
update, not per-example gradients.  Two neighbouring relations, both honest, differ by a factor
of two in sensitivity:

* ``add-remove`` (sensitivity ``C``, the DP-FedAvg / Opacus convention): an observer of the
  released weights cannot tell, beyond (epsilon, delta), whether the site trained on its data
  or released a zero update (contributed nothing).
* ``replace`` (sensitivity ``2 C``): the same for *any* two datasets of the site, which covers
  any change of one record, one patient or the whole cache.  The clipped updates of two
  datasets can lie ``2 C`` apart, so this costs the epsilon of noise multiplier ``sigma / 2``.

The accounted guarantee is per released update and composes over rounds and runs (the
accountant below).  It covers the weights only: sample counts, the training loss and
evaluation counts that a site sends are not privatised.  Under secure aggregation every site
adds its own full noise (local / distributed DP), so the sum the server sees carries ``n``
times the variance one site needs; each site's own ledger is therefore conservative.

Randomness: noise comes from a torch generator seeded with 64 bits from ``os.urandom``, so no
two releases share a seed that anyone could know.  The generator itself (Mersenne Twister) and
floating-point Gaussian sampling are not cryptographic primitives (see Mironov 2012 on
floating-point attacks); this is the usual engineering compromise of DP training libraries.

The accountant
--------------
Renyi DP (Mironov 2017): the Gaussian mechanism with L2 sensitivity ``s * C`` and noise
standard deviation ``sigma * C`` is ``(a, a s^2 / (2 sigma^2))``-RDP at every order ``a > 1``;
RDP adds up over rounds.  The conversion to ``(epsilon, delta)`` is, by default, the improved
bound of Balle et al. 2020 (Thm 21, "Hypothesis testing interpretations and Renyi DP"; the same
as Canonne, Kamath & Steinke 2020 and Opacus' ``get_privacy_spent``)::

    epsilon = min_a  R(a) + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1)

and optionally the standard bound of Mironov 2017 (Prop. 3)::

    epsilon = min_a  R(a) + log(1 / delta) / (a - 1)

Both minima are taken over a fixed, dense grid of orders; any order gives a valid bound, so
the grid only costs tightness (well under 1 % here).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "NEIGHBOURING_RELATIONS",
    "ORDERS",
    "ClipResult",
    "DpRelease",
    "GaussianRound",
    "RdpAccountant",
    "add_gaussian_noise",
    "clip_update",
    "epsilon_from_rdp",
    "gaussian_epsilon",
    "gaussian_rdp",
    "privatize_state",
    "secure_generator",
    "update_norm",
]

#: Sensitivity of the clipped update, in units of the clip bound C, per neighbouring relation.
NEIGHBOURING_RELATIONS: dict[str, float] = {"add-remove": 1.0, "replace": 2.0}

#: RDP orders: 1 + 10^-3 ... 1 + 10^5, geometrically spaced (about 0.4 % apart).
ORDERS: np.ndarray = 1.0 + np.geomspace(1e-3, 1e5, 4000)

_CONVERSIONS = ("balle2020", "standard")

State = Mapping[str, torch.Tensor]


# --------------------------------------------------------------------------- mechanism


def _float_keys(global_state: State, new_state: State) -> list[str]:
    if global_state.keys() != new_state.keys():
        missing = sorted(set(global_state) ^ set(new_state))
        raise ValueError(f"the two states have different tensors: {missing[:5]}")
    keys = []
    for key, value in new_state.items():
        if global_state[key].shape != value.shape:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(value.shape)} but the received weights "
                f"have {tuple(global_state[key].shape)}"
            )
        if torch.is_floating_point(value):
            keys.append(key)
    return keys


def update_norm(global_state: State, new_state: State) -> float:
    """L2 norm of ``new - global`` over all floating-point tensors together."""
    total = 0.0
    for key in _float_keys(global_state, new_state):
        diff = new_state[key].detach().double() - global_state[key].detach().double()
        total += float(torch.sum(diff * diff))
    return math.sqrt(total)


@dataclass(frozen=True)
class ClipResult:
    """A clipped state and what clipping did."""

    state: dict[str, torch.Tensor]
    norm: float  #: L2 norm of the update before clipping
    scale: float  #: factor applied to the update (1.0: not clipped)


def clip_update(global_state: State, new_state: State, clip: float) -> ClipResult:
    """Scale the update ``new - global`` so that its L2 norm is at most ``clip``.

    Floating-point tensors are clipped together (one norm over all of them); other tensors
    (integer buffers) are returned as they are in ``new_state``.  Dtypes are kept.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    norm = update_norm(global_state, new_state)
    if not math.isfinite(norm):
        raise ValueError("the update has non-finite values (training diverged); it cannot "
                         "be clipped")
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    floats = set(_float_keys(global_state, new_state))
    out: dict[str, torch.Tensor] = {}
    for key, value in new_state.items():
        if key in floats and scale < 1.0:
            base = global_state[key].detach().double()
            clipped = base + (value.detach().double() - base) * scale
            out[key] = clipped.to(value.dtype)
        else:
            out[key] = value.detach().clone()
    return ClipResult(out, norm, scale)


def secure_generator() -> torch.Generator:
    """A CPU torch generator seeded with 64 bits from the operating system's CSPRNG."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


def add_gaussian_noise(
    state: State, std: float, *, generator: torch.Generator | None = None,
    nonnegative: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Add ``N(0, std^2)`` to every coordinate of every floating-point tensor.

    Noise is drawn on the CPU (float32, float64 for float64 tensors) from ``generator`` (default:
    :func:`secure_generator`).  Tensors whose name ends with one of ``nonnegative`` (e.g.
    BatchNorm's ``running_var``) are clamped at zero afterwards: post-processing, which
    leaves the guarantee intact.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
    generator = generator or secure_generator()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not torch.is_floating_point(value) or std == 0:
            out[key] = value.detach().clone()
            continue
        work = torch.float64 if value.dtype == torch.float64 else torch.float32
        noise = torch.randn(value.shape, generator=generator, dtype=work)
        noisy = value.detach().to("cpu", work) + noise * std
        if any(key.endswith(suffix) for suffix in nonnegative):
            noisy = noisy.clamp_min(0.0)
        out[key] = noisy.to(value.dtype)
    return out


@dataclass(frozen=True)
class DpRelease:
    """A privatised state and the facts about its release."""

    state: dict[str, torch.Tensor]
    norm: float  #: update norm before clipping
    clipped: bool
    noise_std: float  #: per-coordinate noise standard deviation (sigma * C)


def privatize_state(
    global_state: State, new_state: State, *, clip: float, noise_multiplier: float,
    generator: torch.Generator | None = None, nonnegative: Sequence[str] = ("running_var",),
) -> DpRelease:
    """Clip ``new - global`` to ``clip`` and add ``N(0, (noise_multiplier * clip)^2)`` noise."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise multiplier must be a finite number >= 0, got "
                         f"{noise_multiplier!r}")
    clipped = clip_update(global_state, new_state, clip)
    std = noise_multiplier * clip
    noisy = add_gaussian_noise(clipped.state, std, generator=generator, nonnegative=nonnegative)
    return DpRelease(noisy, clipped.norm, clipped.scale < 1.0, std)


# --------------------------------------------------------------------------- accountant


def gaussian_rdp(noise_multiplier: float, orders: np.ndarray = ORDERS, *,
                 sensitivity: float = 1.0) -> np.ndarray:
    """RDP of one Gaussian release: ``a * sensitivity^2 / (2 * noise_multiplier^2)``.

    ``sensitivity`` is in units of the clip bound (1 for add-remove, 2 for replace);
    ``noise_multiplier`` 0 (no noise) gives infinite RDP.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise multiplier must be a finite number >= 0, got "
                         f"{noise_multiplier!r}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity must be a finite number > 0, got {sensitivity!r}")
    orders = np.asarray(orders, dtype=np.float64)
    if noise_multiplier == 0:
        return np.full_like(orders, np.inf)
    return orders * sensitivity**2 / (2.0 * noise_multiplier**2)


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS, *,
                     conversion: str = "balle2020") -> tuple[float, float]:
    """Smallest epsilon, over ``orders``, of the ``(epsilon, delta)`` bound implied by ``rdp``.

    Returns ``(epsilon, order)``; ``epsilon`` is ``inf`` when every order is infinite.
    ``conversion`` is ``"balle2020"`` (Balle et al. 2020, Thm 21) or ``"standard"``
    (Mironov 2017, Prop. 3).
    """
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if conversion not in _CONVERSIONS:
        raise ValueError(f"conversion must be one of {', '.join(_CONVERSIONS)}, "
                         f"got {conversion!r}")
    orders = np.asarray(orders, dtype=np.float64)
    rdp = np.asarray(rdp, dtype=np.float64)
    if rdp.shape != orders.shape:
        raise ValueError(f"rdp has shape {rdp.shape} but orders has {orders.shape}")
    if np.any(orders <= 1):
        raise ValueError("RDP orders must all be > 1")
    with np.errstate(invalid="ignore"):
        if conversion == "standard":
            eps = rdp + math.log(1.0 / delta) / (orders - 1.0)
        else:
            eps = (rdp + np.log1p(-1.0 / orders)
                   - (math.log(delta) + np.log(orders)) / (orders - 1.0))
    if not np.isfinite(eps).any():
        return math.inf, math.nan
    best = int(np.nanargmin(np.where(np.isfinite(eps), eps, np.nan)))
    return max(float(eps[best]), 0.0), float(orders[best])


@dataclass(frozen=True)
class GaussianRound:
    """One Gaussian release: its noise multiplier and sensitivity (in units of the clip)."""

    noise_multiplier: float
    sensitivity: float = 1.0

    def rdp(self, orders: np.ndarray = ORDERS) -> np.ndarray:
        return gaussian_rdp(self.noise_multiplier, orders, sensitivity=self.sensitivity)


@dataclass
class RdpAccountant:
    """Composes Gaussian releases by adding their RDP curves.

    >>> acc = RdpAccountant()
    >>> acc.add(GaussianRound(noise_multiplier=1.0))
    >>> round(acc.epsilon(1e-5), 2)
    4.73
    """

    orders: np.ndarray = field(default_factory=lambda: ORDERS.copy())
    rounds: list[GaussianRound] = field(default_factory=list)

    def add(self, release: GaussianRound) -> None:
        self.rounds.append(release)

    def extend(self, releases: Iterable[GaussianRound]) -> None:
        self.rounds.extend(releases)

    def rdp(self) -> np.ndarray:
        total = np.zeros_like(self.orders)
        for release in self.rounds:
            total = total + release.rdp(self.orders)
        return total

    def epsilon(self, delta: float, *, conversion: str = "balle2020") -> float:
        """Epsilon of everything added so far at ``delta`` (0.0 when nothing was added)."""
        if not self.rounds:
            return 0.0
        return epsilon_from_rdp(self.rdp(), delta, self.orders, conversion=conversion)[0]


def gaussian_epsilon(noise_multipliers: Sequence[float], delta: float, *,
                     sensitivity: float = 1.0, conversion: str = "balle2020") -> float:
    """Epsilon of composing Gaussian releases with the given noise multipliers."""
    accountant = RdpAccountant()
    accountant.extend(GaussianRound(s, sensitivity) for s in noise_multipliers)
    return accountant.epsilon(delta, conversion=conversion)
