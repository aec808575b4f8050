"""How the server turns the sites' training results into the next global model.

Plain Python on numpy arrays (no Flower types), one :class:`Aggregator` per run, chosen
by the ``strategy`` setting:

``fedavg``
    The mean of the sites' models weighted by their training-sample counts; with
    ``server-step`` below 1 the next model is ``w + server-step * (mean - w)``, part of
    the way from the current model ``w`` to the mean (fedprox and fedbn too).
``fedprox``
    The same mean; the sites add the proximal term ``(mu / 2) * ||w - w_global||^2`` to
    their loss (``proximal-mu``, see :func:`fedrad.common.training.train_local`).
``fedbn``
    The same mean; each site keeps its own normalisation layers (BatchNorm / LayerNorm
    weights and running statistics) between rounds and trains and evaluates with them.
    The global model's normalisation layers are the sites' mean, used for central
    evaluation.
``fedadam``, ``fedyogi``, ``fedadagrad``
    Adaptive federated optimisation (Reddi et al., ICLR 2021): the weighted mean update
    ``delta = mean - w`` is a pseudo-gradient for a server optimiser with step size
    ``server-learning-rate``, first-moment decay ``server-beta1``, second-moment decay
    ``server-beta2`` and adaptivity ``server-tau``.  Adam's moments are bias-corrected
    by the number of server steps taken.  The moments are part of every checkpoint, so a
    resumed run continues with them.
``median``, ``trimmed-mean``, ``krum``
    Robust aggregation, unweighted as in their papers: the coordinate-wise median (Yin et
    al., 2018), the coordinate-wise mean after cutting ``trim-fraction`` of the sites from
    each end, or Krum (Blanchard et al., 2017): the one site model whose summed squared
    distance to its ``n - f - 2`` nearest others is smallest (``f`` =
    ``krum-byzantine``).  They need each site's own model, so they refuse to run under
    secure aggregation (see :func:`fedrad.common.config.load_settings`).

Under secure aggregation the server only learns the weighted mean, so only
:meth:`Aggregator.server_step` runs there; in plain mode :meth:`Aggregator.aggregate`
does both.  The mean strategies need no site's model once it is added: a plain round folds
each reply into a :class:`RunningMean` as it arrives (:meth:`Aggregator.running_mean`) and
finishes with :meth:`Aggregator.finish`, so the server holds one float64 sum, not every
site's model; the robust strategies need all the models at once.  Integer tensors
(BatchNorm's ``num_batches_tracked``) always take the rounded weighted mean.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedrad.common.config import ROBUST_STRATEGIES, Settings
from fedrad.common.errors import ConfigError

__all__ = ["Aggregator", "RunningMean", "SERVER_OPTIMIZERS", "weighted_mean"]

log = logging.getLogger(__name__)

Weights = Mapping[str, np.ndarray]
#: Strategies that run a server optimiser on the mean update.
SERVER_OPTIMIZERS = frozenset({"fedadam", "fedyogi", "fedadagrad"})


def _is_float(value: np.ndarray) -> bool:
    return np.asarray(value).dtype.kind == "f"


def _cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    like = np.asarray(like)
    if like.dtype.kind in "iub":
        value = np.rint(value)
    return np.array(value, dtype=like.dtype, order="C")  # keeps 0-d tensors 0-d


def weighted_mean(sites: Sequence[tuple[Weights, float]], key: str) -> np.ndarray:
    """``sum(n_i * x_i) / sum(n_i)`` of tensor ``key`` over ``(weights, n_i)`` pairs, float64."""
    total = float(sum(n for _, n in sites))
    if not total > 0:
        raise ValueError("the sites' sample counts sum to zero")
    acc = np.zeros(np.shape(sites[0][0][key]), dtype=np.float64)
    for weights, n in sites:
        acc += np.asarray(weights[key], dtype=np.float64) * (float(n) / total)
    return acc


#: values per step of :meth:`RunningMean.add` (its float64 scratch, 512 KiB, stays in cache)
ADD_CHUNK = 1 << 16


class RunningMean:
    """``sum(n_i * x_i) / sum(n_i)`` of every tensor, site models added one at a time.

    The sum is kept in float64 (one copy of the model); :meth:`mean` divides it in place.
    ``reuse``: float64 arrays (a previous round's :meth:`mean`) to keep the sum in, where
    their shapes fit, instead of fresh memory that the system must fault in and zero.
    """

    def __init__(self, reuse: Mapping[str, np.ndarray] | None = None) -> None:
        self._acc: dict[str, np.ndarray] | None = None
        self._reuse = dict(reuse or {})
        self._scratch = np.empty(ADD_CHUNK, dtype=np.float64)
        self.total = 0.0
        self.sites = 0

    def add(self, weights: Weights, n: float) -> None:
        """Add one site's model ``weights`` with its sample count ``n``.

        ``n * x`` is formed a cache-sized chunk at a time: a whole-tensor float64
        temporary would be written to and read back from memory (ResNet-18: 90 MB per
        site, 2.4 times as long on a 2-core server).
        """
        n = float(n)
        if self._acc is None:
            self._acc = {}
            for k, v in weights.items():
                # an array even for 0-d tensors, so the in-place updates below reach them
                buf = self._reuse.pop(k, None)
                if buf is None or buf.shape != np.shape(v) or buf.dtype != np.float64:
                    buf = np.empty(np.shape(v), dtype=np.float64)
                self._acc[k] = np.multiply(v, n, out=buf, dtype=np.float64)
            self._reuse.clear()
        else:
            for k, acc in self._acc.items():
                self._add_scaled(acc, np.asarray(weights[k]), n)
        self.total += n
        self.sites += 1

    def _add_scaled(self, acc: np.ndarray, value: np.ndarray, n: float) -> None:
        """``acc += n * value`` in float64, in place."""
        if acc.size <= ADD_CHUNK or acc.ndim == 0 or value.shape != acc.shape:
            # small tensors at once; a shape mismatch raises numpy's broadcasting error
            np.add(acc, np.multiply(value, n, dtype=np.float64), out=acc)
            return
        flat_acc, flat = acc.reshape(-1), value.reshape(-1)  # views: both are C-contiguous
        for start in range(0, flat_acc.size, ADD_CHUNK):
            end = min(start + ADD_CHUNK, flat_acc.size)
            part = self._scratch[:end - start]
            np.multiply(flat[start:end], n, out=part, dtype=np.float64)
            np.add(flat_acc[start:end], part, out=flat_acc[start:end])

    def mean_into(self, out: Mapping[str, np.ndarray], like: Weights) -> dict[str, np.ndarray]:
        """Write the weighted mean into ``out`` in ``like``'s dtypes; return the used-up sum.

        The same values as ``_cast_like(mean()[k], like[k])``: each float64 sum divided in
        float64, then rounded to the tensor's dtype (integer tensors to the nearest whole
        number) as it is written.  The float64 arrays returned hold nothing of use (they
        can be given to the next :class:`RunningMean` as ``reuse``).
        """
        acc = self._take_sum()
        for k, value in acc.items():
            if _is_float(like[k]):
                np.divide(value, self.total, out=out[k], casting="same_kind")
            else:  # integer counters: rounded as _cast_like rounds them
                np.divide(value, self.total, out=value)
                np.copyto(out[k], _cast_like(value, like[k]))
        return acc

    def _take_sum(self) -> dict[str, np.ndarray]:
        if self._acc is None:
            raise ValueError("no site models to aggregate")
        if not self.total > 0:
            raise ValueError("the sites' sample counts sum to zero")
        acc, self._acc = self._acc, None
        return acc

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean of the models added (the running sum is used up)."""
        acc = self._take_sum()
        for value in acc.values():
            np.divide(value, self.total, out=value)
        return acc


def _trimmed_mean(stack: np.ndarray, fraction: float) -> np.ndarray:
    cut = int(fraction * stack.shape[0])
    if cut == 0:
        return stack.mean(axis=0)
    ordered = np.sort(stack, axis=0)
    return ordered[cut:stack.shape[0] - cut].mean(axis=0)


class Aggregator:
    """One run's aggregation rule and server-optimiser state (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.name = settings.strategy
        self.settings = settings
        self.steps = 0  # server-optimiser steps taken
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        #: Krum: the index (in the given order) of the site model chosen last
        self.last_selected: int | None = None
        self._spare: dict[str, np.ndarray] | None = None  # the last mean's float64 arrays
        #: the next model is the sites' mean itself
        self._plain_mean = (self.name not in SERVER_OPTIMIZERS
                            and settings.server_step == 1.0)

    # ------------------------------------------------------------- plain rounds
    def aggregate(self, current: Weights, sites: Sequence[tuple[Weights, float]]
                  ) -> dict[str, np.ndarray]:
        """The next global model from ``current`` and the sites' ``(model, samples)``.

        ``current`` is the global model the sites trained from; each site model has its
        keys, shapes and dtypes (the server checks replies before they get here).
        """
        if not sites:
            raise ValueError("no site models to aggregate")
        if self.name in ROBUST_STRATEGIES:
            return self._robust(current, sites)
        running = self.running_mean()
        for weights, n in sites:
            running.add(weights, n)
        return self.finish(current, running)

    @property
    def streams(self) -> bool:
        """True when site models can be folded in one at a time (the mean strategies)."""
        return self.name not in ROBUST_STRATEGIES

    def running_mean(self) -> RunningMean:
        """An empty running weighted mean for :meth:`finish` (mean strategies only)."""
        if not self.streams:
            raise ValueError(f"{self.name} needs every site model at once, not a running mean")
        spare, self._spare = self._spare, None
        return RunningMean(reuse=spare)

    def finish(self, current: Weights, running: RunningMean,
               into: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The next global model from ``current`` and the sites' :class:`RunningMean`.

        The mean's float64 arrays are kept for the next round's running sum (the next
        model is a copy in the model's own dtypes).  ``into``: writable arrays of
        ``current``'s shapes and dtypes (e.g. :func:`~fedrad.common.arrays.record_to_fill`'s)
        that receive the next model and are returned; for the plain mean strategies the
        sum is divided and cast straight into them, one pass with no float64 mean and
        no copy.  The values are the same either way.
        """
        if into is not None and self._plain_mean:
            acc = running.mean_into(into, current)
            self._spare = acc
            return dict(into)
        mean = running.mean()
        new = self.server_step(current, mean)
        self._spare = mean
        if into is None:
            return new
        for k, value in new.items():
            np.copyto(into[k], value)
        return dict(into)

    def _robust(self, current: Weights, sites: Sequence[tuple[Weights, float]]
                ) -> dict[str, np.ndarray]:
        s = self.settings
        out: dict[str, np.ndarray] = {}
        if self.name == "krum":
            chosen = self._krum_choice(current, [w for w, _ in sites])
            self.last_selected = chosen
            for k, ref in current.items():
                value = sites[chosen][0][k] if _is_float(ref) else weighted_mean(sites, k)
                out[k] = _cast_like(np.asarray(value, dtype=np.float64), ref)
            return out
        for k, ref in current.items():
            if not _is_float(ref):
                out[k] = _cast_like(weighted_mean(sites, k), ref)
                continue
            stack = np.stack([np.asarray(w[k], dtype=np.float64) for w, _ in sites])
            value = (np.median(stack, axis=0) if self.name == "median"
                     else _trimmed_mean(stack, s.trim_fraction))
            out[k] = _cast_like(value, ref)
        return out

    def _krum_choice(self, current: Weights, models: Sequence[Weights]) -> int:
        n = len(models)
        f = self.settings.krum_byzantine
        neighbours = n - f - 2
        if neighbours < 1:
            log.warning("krum: %d sites answered; tolerating krum-byzantine=%d faulty sites "
                        "needs at least %d; scoring each site by its nearest other site", n, f,
                        2 * f + 3)
            neighbours = 1
        if n == 1:
            return 0
        keys = [k for k, ref in current.items() if _is_float(ref)]
        dist = np.zeros((n, n), dtype=np.float64)
        for k in keys:
            flat = np.stack([np.asarray(m[k], dtype=np.float64).ravel() for m in models])
            sq = np.einsum("ij,ij->i", flat, flat)
            dist += sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T
        np.fill_diagonal(dist, np.inf)
        dist = np.maximum(dist, 0.0)
        scores = np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)
        return int(np.argmin(scores))

    # ------------------------------------------------------- server optimiser
    def server_step(self, current: Weights, mean: Weights) -> dict[str, np.ndarray]:
        """Apply the server optimiser to the sites' weighted ``mean`` model.

        For fedavg, fedprox and fedbn the mean is the next model (with ``server-step``
        below 1, ``current + server-step * (mean - current)``; integer tensors take the
        mean).  For fedadam, fedyogi and fedadagrad, ``delta = mean - current`` updates
        the moments and the model moves by ``server-learning-rate * m / (sqrt(v) +
        server-tau)``.
        """
        if self._plain_mean:
            return {k: _cast_like(np.asarray(mean[k], dtype=np.float64), ref)
                    for k, ref in current.items()}
        if self.name not in SERVER_OPTIMIZERS:  # a damped step towards the mean
            step = self.settings.server_step
            out = {}
            for k, ref in current.items():
                m = np.asarray(mean[k], dtype=np.float64)
                if _is_float(ref):
                    x = np.asarray(ref, dtype=np.float64)
                    m = x + step * (m - x)
                out[k] = _cast_like(m, ref)
            return out
        s = self.settings
        b1, b2, eta, tau = s.server_beta1, s.server_beta2, s.server_learning_rate, s.server_tau
        self.steps += 1
        if self.name == "fedadam":
            eta = eta * np.sqrt(1.0 - b2 ** self.steps) / (1.0 - b1 ** self.steps)
        out: dict[str, np.ndarray] = {}
        for k, ref in current.items():
            x = np.asarray(ref)
            if not _is_float(x):
                out[k] = _cast_like(np.asarray(mean[k], dtype=np.float64), x)
                continue
            delta = np.asarray(mean[k], dtype=np.float32) - x.astype(np.float32)
            m = self.m.get(k)
            m = (1.0 - b1) * delta if m is None else b1 * m + (1.0 - b1) * delta
            v = self.v.get(k)
            sq = delta * delta
            if self.name == "fedadagrad":
                v = sq if v is None else v + sq
            elif self.name == "fedadam":
                v = (1.0 - b2) * sq if v is None else b2 * v + (1.0 - b2) * sq
            else:  # fedyogi
                v = np.zeros_like(sq) if v is None else v
                v = v - (1.0 - b2) * sq * np.sign(v - sq)
            self.m[k], self.v[k] = m.astype(np.float32), v.astype(np.float32)
            out[k] = _cast_like(x.astype(np.float64) + eta * m / (np.sqrt(v) + tau), x)
        return out

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the aggregator (torch-saveable)."""
        return {
            "strategy": self.name,
            "steps": self.steps,
            "m": {k: torch.from_numpy(v) for k, v in self.m.items()},
            "v": {k: torch.from_numpy(v) for k, v in self.v.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a resumed run)."""
        if state.get("strategy") != self.name:
            raise ConfigError(
                f"resume: the checkpoint was made with strategy={state.get('strategy')!r}, "
                f"this run has strategy={self.name!r}; use the same strategy, or a fresh "
                "out-dir")
        self.steps = int(state.get("steps", 0))
        self.m = {k: v.numpy().astype(np.float32) for k, v in state.get("m", {}).items()}
        self.v = {k: v.numpy().astype(np.float32) for k, v in state.get("v", {}).items()}

