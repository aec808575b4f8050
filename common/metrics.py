"""Pooled clinical metrics computed from summed outcome counts, never from averages.

Every site (and the server's own held-out set) turns its predictions into
:class:`OutcomeCounts`: a confusion matrix and, per class, two score histograms (scores
of the samples that *are* the class and of those that are not).  Counts from any number
of sites add up exactly, so the server derives accuracy, sensitivity, specificity,
precision, F1 and ROC AUC for the whole population as if it had seen every prediction,
which averaging per-site metrics does not do (a small site would weigh as much as a large
one, and AUCs do not average).

Transport
---------
Flower's ``MetricRecord`` holds only ``int``, ``float``, ``list[int]`` and ``list[float]``
values, so :func:`counts_to_metrics` flattens the counts to::

    {prefix}num-classes   int         shape metadata, identical at every site
    {prefix}bins          int         shape metadata, identical at every site
    {prefix}confusion     list[int]   C*C, row-major, rows = true class
    {prefix}pos-hist      list[int]   C*bins, row-major
    {prefix}neg-hist      list[int]   C*bins, row-major

The three lists are plain non-negative counts and merging is addition, so **summing the
lists elementwise across sites is exactly** :func:`merge_counts`.  A secure-aggregation
layer can therefore sum the masked lists and hand the sum to :func:`counts_from_metrics`.
The two scalar entries describe the shape and must be carried through unchanged, not
summed (:func:`sum_count_metrics` does both and checks that they agree).

AUC from histograms
-------------------
With scores binned into ``bins`` equal bins over [0, 1], a positive and a negative that
fall in different bins are ordered exactly as their scores are (binning is monotone);
only pairs within the same bin lose their order and are counted as half a win.  The
error against the exact (Mann-Whitney) AUC is therefore at most half the fraction of
positive-negative pairs that share a bin, which :func:`auc_resolution` returns.  For
continuous scores and 1000 bins this is typically below 1e-3.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FedradError

__all__ = [
    "EVALUATE_RECEIVED",
    "EVALUATION",
    "OutcomeCounts",
    "merge_counts",
    "count_outcomes",
    "counts_to_metrics",
    "counts_from_metrics",
    "sum_count_metrics",
    "auc_from_histograms",
    "auc_resolution",
    "wilson_interval",
    "hanley_mcneil_se",
    "hanley_mcneil_interval",
    "pooled_metrics",
    "default_class_names",
    "DEFAULT_BINS",
    "Z_95",
]

logger = logging.getLogger(__name__)

#: Default number of score-histogram bins per class.
DEFAULT_BINS = 1000
#: Two-sided 95 % standard-normal quantile.
Z_95 = 1.959963984540054
#: Scores may exceed [0, 1] by this much (float rounding of a softmax) and are clipped.
_SCORE_TOLERANCE = 1e-6

_KEY_NUM_CLASSES = "num-classes"
_KEY_BINS = "bins"
_KEY_CONFUSION = "confusion"
_KEY_POS_HIST = "pos-hist"
_KEY_NEG_HIST = "neg-hist"
_LIST_KEYS = (_KEY_CONFUSION, _KEY_POS_HIST, _KEY_NEG_HIST)


def default_class_names(num_classes: int) -> list[str]:
    """Return ``["class-0", "class-1", ...]``, the names used when none are configured."""
    return [f"class-{i}" for i in range(num_classes)]


@dataclass(eq=False)
class OutcomeCounts:
    """Summable evaluation outcomes of a classifier.

    Attributes
    ----------
    num_classes:
        Number of classes ``C`` (at least 2).
    bins:
        Number of equal score bins over [0, 1].
    confusion:
        int64 ``[C, C]``; rows are the true class, columns the predicted class
        (the argmax of the scores).
    pos_hist:
        int64 ``[C, bins]``; row ``c`` is the histogram of ``score[:, c]`` over the
        samples whose true label is ``c``.
    neg_hist:
        int64 ``[C, bins]``; row ``c`` is the histogram of ``score[:, c]`` over the
        samples whose true label is not ``c``.
    """

    num_classes: int
    bins: int
    confusion: np.ndarray
    pos_hist: np.ndarray
    neg_hist: np.ndarray

    def __post_init__(self) -> None:
        for name, minimum in (("num_classes", 2), ("bins", 1)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or value < minimum
            ):
                raise FedradError(
                    "bad-counts", f"{name} must be an integer >= {minimum}, got {value!r}."
                )
        self.num_classes = int(self.num_classes)
        self.bins = int(self.bins)
        c, b = self.num_classes, self.bins
        for name, shape in (("confusion", (c, c)), ("pos_hist", (c, b)), ("neg_hist", (c, b))):
            arr = np.asarray(getattr(self, name))
            if arr.shape != shape:
                raise FedradError(
                    "bad-counts",
                    f"{name} must have shape {shape} for "
                    f"{c} classes and {b} bins, got {arr.shape}.",
                )
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                    raise FedradError("bad-counts", f"{name} must hold whole counts.")
            arr = arr.astype(np.int64, copy=True)
            if arr.size and arr.min() < 0:
                raise FedradError("bad-counts", f"{name} must not hold negative counts.")
            setattr(self, name, arr)

    @classmethod
    def zeros(cls, num_classes: int, bins: int = DEFAULT_BINS) -> OutcomeCounts:
        """Return empty counts (the neutral element of ``+``)."""
        return cls(
            num_classes,
            bins,
            np.zeros((num_classes, num_classes), np.int64),
            np.zeros((num_classes, bins), np.int64),
            np.zeros((num_classes, bins), np.int64),
        )

    @property
    def n(self) -> int:
        """Number of samples counted."""
        return int(self.confusion.sum())

    def __add__(self, other: object) -> OutcomeCounts:
        if not isinstance(other, OutcomeCounts):
            return NotImplemented
        if (other.num_classes, other.bins) != (self.num_classes, self.bins):
            raise FedradError(
                "counts-mismatch",
                f"cannot add counts of {self.num_classes} classes / {self.bins} bins to counts "
                f"of {other.num_classes} classes / {other.bins} bins: every site must use the "
                "same 'num-classes' and 'score-bins' settings.",
            )
        return OutcomeCounts(
            self.num_classes,
            self.bins,
            self.confusion + other.confusion,
            self.pos_hist + other.pos_hist,
            self.neg_hist + other.neg_hist,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutcomeCounts):
            return NotImplemented
        return (
            self.num_classes == other.num_classes
            and self.bins == other.bins
            and np.array_equal(self.confusion, other.confusion)
            and np.array_equal(self.pos_hist, other.pos_hist)
            and np.array_equal(self.neg_hist, other.neg_hist)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays


def merge_counts(counts: Iterable[OutcomeCounts]) -> OutcomeCounts:
    """Sum outcome counts from several sites.

    Raises
    ------
    FedradError
        ``"no-counts"`` when ``counts`` is empty, ``"counts-mismatch"`` when the
        number of classes or bins differ.
    """
    items = list(counts)
    if not items:
        raise FedradError(
            "no-counts",
            "no outcome counts to merge: at least one site (or the "
            "central evaluator) must report counts.",
        )
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def count_outcomes(scores: Any, labels: Any, *, bins: int = DEFAULT_BINS) -> OutcomeCounts:
    """Count the outcomes of ``N`` predictions.

    Parameters
    ----------
    scores:
        ``[N, C]`` class probabilities (softmax outputs, not logits); values may exceed
        [0, 1] by float rounding (1e-6) and are clipped.  Any array-like (numpy, CPU
        torch tensor, nested lists).
    labels:
        ``[N]`` integer true labels in ``0 .. C-1``.
    bins:
        Number of equal score bins over [0, 1].

    Returns
    -------
    OutcomeCounts
        ``N == 0`` gives all-zero counts.

    Raises
    ------
    FedradError
        ``"bad-scores"`` (wrong shape, non-finite values, values outside [0, 1]),
        ``"bad-labels"`` (wrong shape, non-integer or out-of-range labels) or
        ``"bad-counts"`` (``bins < 1``).
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise FedradError("bad-counts", f"bins must be a positive integer, got {bins!r}.")
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FedradError(
            "bad-scores", "scores must be a numeric [N, C] array of class probabilities."
        ) from e
    if s.ndim != 2 or s.shape[1] < 2:
        raise FedradError(
            "bad-scores", f"scores must have shape [N, C] with C >= 2 classes, got shape {s.shape}."
        )
    n, c = s.shape
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise FedradError(
            "bad-labels",
            f"labels must have shape [N] = [{n}] to match the scores, got shape {y.shape}.",
        )
    if n and not np.issubdtype(y.dtype, np.integer):
        try:
            yf = y.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise FedradError("bad-labels", "labels must be integer class indices.") from e
        if not np.all(np.isfinite(yf)) or not np.all(yf == np.round(yf)):
            raise FedradError("bad-labels", "labels must be integer class indices.")
        y = yf
    y = y.astype(np.int64)
    if n and (y.min() < 0 or y.max() >= c):
        raise FedradError(
            "bad-labels",
            f"labels must lie in 0..{c - 1} for {c} score columns, "
            f"got values from {int(y.min())} to {int(y.max())}.",
        )
    if not np.all(np.isfinite(s)):
        raise FedradError(
            "bad-scores",
            "scores contain NaN or infinite values: check the model output (diverged training?).",
        )
    if n and (s.min() < -_SCORE_TOLERANCE or s.max() > 1.0 + _SCORE_TOLERANCE):
        raise FedradError(
            "bad-scores",
            f"scores must be probabilities in [0, 1], got values "
            f"from {s.min():.4g} to {s.max():.4g}: apply softmax "
            "to the logits first.",
        )
    s = np.clip(s, 0.0, 1.0)

    pred = np.argmax(s, axis=1) if n else np.zeros(0, np.int64)
    confusion = np.bincount(y * c + pred, minlength=c * c).reshape(c, c).astype(np.int64)
    # Bin b holds scores in [b/bins, (b+1)/bins); 1.0 goes to the last bin.  Monotone in s.
    idx = np.minimum((s * bins).astype(np.int64), bins - 1)
    is_pos = y[:, None] == np.arange(c)[None, :]
    flat = np.arange(c)[None, :] * bins + idx
    pos_hist = np.bincount(flat[is_pos], minlength=c * bins).reshape(c, bins)
    neg_hist = np.bincount(flat[~is_pos], minlength=c * bins).reshape(c, bins)
    return OutcomeCounts(
        c, int(bins), confusion, pos_hist.astype(np.int64), neg_hist.astype(np.int64)
    )


#: Training-config key: the site scores the model it receives before training on it.
EVALUATE_RECEIVED = "evaluate-received"
#: The metric record of a training reply that holds those evaluation counts.
EVALUATION = "evaluation"


def counts_to_metrics(counts: OutcomeCounts, prefix: str = "") -> dict[str, int | list[int]]:
    """Flatten ``counts`` into values a Flower ``MetricRecord`` accepts.

    Keys are ``prefix`` + ``num-classes``, ``bins``, ``confusion``, ``pos-hist``,
    ``neg-hist`` (the prefix is prepended as is, e.g. ``"val-"``).  The lists are the
    row-major flattening of the arrays; summing them elementwise across sites equals
    :func:`merge_counts` (see the module docstring).
    """
    return {
        prefix + _KEY_NUM_CLASSES: int(counts.num_classes),
        prefix + _KEY_BINS: int(counts.bins),
        prefix + _KEY_CONFUSION: [int(v) for v in counts.confusion.ravel()],
        prefix + _KEY_POS_HIST: [int(v) for v in counts.pos_hist.ravel()],
        prefix + _KEY_NEG_HIST: [int(v) for v in counts.neg_hist.ravel()],
    }


def _scalar_int(mapping: Mapping[str, Any], key: str, minimum: int) -> int:
    if key not in mapping:
        raise FedradError(
            "bad-metrics",
            f"metric '{key}' is missing: the reply does not hold "
            "outcome counts (was it written by counts_to_metrics?).",
        )
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FedradError(
            "bad-metrics", f"metric '{key}' must be an integer, got {type(value).__name__}."
        )
    if not math.isfinite(float(value)) or float(value) != int(value) or int(value) < minimum:
        raise FedradError(
            "bad-metrics", f"metric '{key}' must be an integer >= {minimum}, got {value!r}."
        )
    return int(value)


def _count_list(mapping: Mapping[str, Any], key: str, length: int) -> np.ndarray:
    if key not in mapping:
        raise FedradError(
            "bad-metrics",
            f"metric '{key}' is missing: the reply does not hold "
            "outcome counts (was it written by counts_to_metrics?).",
        )
    value = mapping[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise FedradError(
            "bad-metrics", f"metric '{key}' must be a list of counts, got {type(value).__name__}."
        )
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FedradError("bad-metrics", f"metric '{key}' must be a list of numbers.") from e
    if arr.ndim != 1 or arr.shape[0] != length:
        raise FedradError(
            "bad-metrics",
            f"metric '{key}' must hold {length} counts, got "
            f"{arr.size}: do all sites use the same 'num-classes' "
            "and 'score-bins' settings?",
        )
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise FedradError("bad-metrics", f"metric '{key}' must hold whole counts.")
    if arr.size and arr.min() < 0:
        raise FedradError(
            "bad-metrics",
            f"metric '{key}' holds negative counts: was a masked "
            "(secure-aggregation) sum left unmasked?",
        )
    return arr.astype(np.int64)


def counts_from_metrics(mapping: Mapping[str, Any], prefix: str = "") -> OutcomeCounts:
    """Rebuild :class:`OutcomeCounts` from :func:`counts_to_metrics` output (or a sum of it).

    Checks lengths, non-negativity and that the histograms agree with the confusion
    matrix (row ``c`` of ``pos-hist`` counts the samples of class ``c``).

    Raises
    ------
    FedradError
        ``"bad-metrics"`` naming the offending key.
    """
    c = _scalar_int(mapping, prefix + _KEY_NUM_CLASSES, 2)
    b = _scalar_int(mapping, prefix + _KEY_BINS, 1)
    confusion = _count_list(mapping, prefix + _KEY_CONFUSION, c * c).reshape(c, c)
    pos_hist = _count_list(mapping, prefix + _KEY_POS_HIST, c * b).reshape(c, b)
    neg_hist = _count_list(mapping, prefix + _KEY_NEG_HIST, c * b).reshape(c, b)
    per_class = confusion.sum(axis=1)
    total = int(confusion.sum())
    if not np.array_equal(pos_hist.sum(axis=1), per_class):
        raise FedradError(
            "bad-metrics",
            f"metric '{prefix + _KEY_POS_HIST}' does not match "
            f"'{prefix + _KEY_CONFUSION}': each class's histogram "
            "must count that class's samples.",
        )
    if not np.array_equal(neg_hist.sum(axis=1), total - per_class):
        raise FedradError(
            "bad-metrics",
            f"metric '{prefix + _KEY_NEG_HIST}' does not match "
            f"'{prefix + _KEY_CONFUSION}': each class's histogram "
            "must count the other classes' samples.",
        )
    return OutcomeCounts(c, b, confusion, pos_hist, neg_hist)


def sum_count_metrics(mappings: Iterable[Mapping[str, Any]], prefix: str = "") -> dict[str, Any]:
    """Sum several :func:`counts_to_metrics` mappings the way secure aggregation would.

    The count lists are added elementwise; ``num-classes`` and ``bins`` must agree and are
    carried through.  ``counts_from_metrics(sum_count_metrics(ms))`` equals
    ``merge_counts(counts_from_metrics(m) for m in ms)``.

    Raises
    ------
    FedradError
        ``"no-counts"`` when empty, ``"bad-metrics"`` naming a key on any mismatch.
    """
    items = list(mappings)
    if not items:
        raise FedradError("no-counts", "no outcome counts to sum.")
    shape: dict[str, int] = {}
    for key in (_KEY_NUM_CLASSES, _KEY_BINS):
        values = {_scalar_int(m, prefix + key, 1) for m in items}
        if len(values) != 1:
            raise FedradError(
                "bad-metrics",
                f"metric '{prefix + key}' differs between replies "
                f"({sorted(values)}): every site must use the same "
                "settings.",
            )
        shape[key] = values.pop()
    c, b = shape[_KEY_NUM_CLASSES], shape[_KEY_BINS]
    lengths = {_KEY_CONFUSION: c * c, _KEY_POS_HIST: c * b, _KEY_NEG_HIST: c * b}
    out: dict[str, Any] = {prefix + _KEY_NUM_CLASSES: c, prefix + _KEY_BINS: b}
    for key in _LIST_KEYS:
        total = np.zeros(lengths[key], np.int64)
        for m in items:
            total += _count_list(m, prefix + key, lengths[key])
        out[prefix + key] = [int(v) for v in total]
    return out


def _hist_pair(pos_hist: Any, neg_hist: Any) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    if pos.ndim != 1 or pos.shape != neg.shape:
        raise FedradError(
            "bad-counts",
            f"pos_hist and neg_hist must be 1-D histograms of the "
            f"same length, got shapes {pos.shape} and {neg.shape}.",
        )
    if (pos.size and pos.min() < 0) or (neg.size and neg.min() < 0):
        raise FedradError("bad-counts", "histograms must not hold negative counts.")
    return pos, neg


def auc_from_histograms(pos_hist: Any, neg_hist: Any) -> float:
    """ROC AUC (Mann-Whitney statistic) from binned scores.

    ``P(score_pos > score_neg) + 0.5 * P(both in the same bin)``, where bins are ordered
    by score.  Its distance to the exact AUC is at most :func:`auc_resolution`.

    Returns NaN when there are no positives or no negatives.
    """
    pos, neg = _hist_pair(pos_hist, neg_hist)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    wins = float(np.dot(pos, neg_below)) + 0.5 * float(np.dot(pos, neg))
    return wins / (float(n_pos) * float(n_neg))


def auc_resolution(pos_hist: Any, neg_hist: Any) -> float:
    """Upper bound on ``|auc_from_histograms - exact AUC|``.

    Pairs in different bins are ordered exactly; each pair within one bin is counted as
    0.5 although its exact contribution lies in [0, 1].  The bound is therefore half the
    fraction of positive-negative pairs that share a bin.  NaN when one side is empty.
    """
    pos, neg = _hist_pair(pos_hist, neg_hist)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return 0.5 * float(np.dot(pos, neg)) / (float(n_pos) * float(n_neg))


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (no continuity correction).

    Returns ``(nan, nan)`` when ``total`` is 0.
    """
    if total < 0 or successes < 0 or successes > total:
        raise FedradError(
            "bad-counts", f"need 0 <= successes <= total, got {successes} of {total}."
        )
    if total == 0:
        return math.nan, math.nan
    n = float(total)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    # The bounds are exactly 0 (no successes) and 1 (all successes); avoid rounding residue.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley & McNeil, Radiology 1982). NaN when undefined."""
    if not math.isfinite(auc) or n_pos <= 0 or n_neg <= 0:
        return math.nan
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1.0 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (
        float(n_pos) * float(n_neg)
    )
    return math.sqrt(max(var, 0.0))


def hanley_mcneil_interval(
    auc: float, n_pos: int, n_neg: int, z: float = Z_95
) -> tuple[float, float]:
    """Normal-approximation interval ``auc +- z * SE`` clipped to [0, 1]."""
    se = hanley_mcneil_se(auc, n_pos, n_neg)
    if not math.isfinite(se):
        return math.nan, math.nan
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def _proportion(out: dict[str, Any], name: str, successes: int, total: int) -> None:
    out[name] = _ratio(successes, total)
    out[f"{name}-ci-low"], out[f"{name}-ci-high"] = wilson_interval(successes, total)


def _f1(tp: int, fp: int, fn: int) -> float:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def _resolve_positive(positive_class: int | str, names: list[str]) -> int:
    if isinstance(positive_class, str):
        if positive_class not in names:
            raise FedradError(
                "bad-class",
                f"positive class '{positive_class}' is not one of the class names {names}.",
            )
        return names.index(positive_class)
    if isinstance(positive_class, bool) or not 0 <= int(positive_class) < len(names):
        raise FedradError(
            "bad-class",
            f"positive_class must be a class index in "
            f"0..{len(names) - 1} or a class name, "
            f"got {positive_class!r}.",
        )
    return int(positive_class)


def pooled_metrics(
    counts: OutcomeCounts, class_names: Sequence[str] | None = None, positive_class: int | str = 1
) -> dict[str, Any]:
    """Clinical metrics of (pooled) outcome counts, with 95 % confidence intervals.

    Binary (2 classes), relative to ``positive_class`` (index or name):
    ``n``, ``tp``, ``fp``, ``tn``, ``fn``, ``accuracy``, ``sensitivity``, ``specificity``,
    ``precision`` (PPV), ``npv``, ``f1``, ``auc``, and ``<metric>-ci-low`` /
    ``<metric>-ci-high`` for accuracy, sensitivity, specificity, precision and npv
    (Wilson score) and auc (Hanley-McNeil).

    Multi-class: ``n``, ``accuracy`` (+ Wilson CI); per class (one-vs-rest), keyed
    ``<class-name>/<metric>``: ``support``, ``sensitivity``, ``specificity``,
    ``precision``, ``f1``, ``auc``; and ``macro-sensitivity``, ``macro-specificity``,
    ``macro-precision``, ``macro-f1``, ``macro-auc``: unweighted means over the classes
    where the metric is defined (NaN if none is).

    Undefined values (0/0, AUC without positives or negatives) are NaN.  AUC is computed
    from score histograms; see :func:`auc_resolution` for its accuracy.
    """
    c = counts.num_classes
    names = list(class_names) if class_names is not None else default_class_names(c)
    if len(names) != c:
        raise FedradError("bad-class", f"got {len(names)} class names for {c} classes.")
    if len(set(names)) != c:
        raise FedradError("bad-class", f"class names must be distinct, got {names}.")
    conf = counts.confusion
    n = counts.n
    correct = int(np.trace(conf))
    out: dict[str, Any] = {"n": n}
    _proportion(out, "accuracy", correct, n)

    if c == 2:
        p = _resolve_positive(positive_class, names)
        q = 1 - p
        tp, fn = int(conf[p, p]), int(conf[p, q])
        fp, tn = int(conf[q, p]), int(conf[q, q])
        _proportion(out, "sensitivity", tp, tp + fn)
        _proportion(out, "specificity", tn, tn + fp)
        _proportion(out, "precision", tp, tp + fp)
        _proportion(out, "npv", tn, tn + fn)
        out["f1"] = _f1(tp, fp, fn)
        auc = auc_from_histograms(counts.pos_hist[p], counts.neg_hist[p])
        out["auc"] = auc
        out["auc-ci-low"], out["auc-ci-high"] = hanley_mcneil_interval(auc, tp + fn, tn + fp)
        out.update(tp=tp, fp=fp, tn=tn, fn=fn)
        return out

    per_metric: dict[str, list[float]] = {
        k: [] for k in ("sensitivity", "specificity", "precision", "f1", "auc")
    }
    for k, name in enumerate(names):
        tp = int(conf[k, k])
        fn = int(conf[k].sum()) - tp
        fp = int(conf[:, k].sum()) - tp
        tn = n - tp - fn - fp
        values = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "f1": _f1(tp, fp, fn),
            "auc": auc_from_histograms(counts.pos_hist[k], counts.neg_hist[k]),
        }
        out[f"{name}/support"] = tp + fn
        for metric, value in values.items():
            out[f"{name}/{metric}"] = value
            per_metric[metric].append(value)
    for metric, values in per_metric.items():
        out[f"macro-{metric}"] = _nanmean(values)
    return out
