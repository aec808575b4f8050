"""Pooled clinical metrics from summed counts, checked against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrad.common.errors import FedradError
from fedrad.common.metrics import (
    OutcomeCounts,
    auc_from_histograms,
    auc_resolution,
    count_outcomes,
    counts_from_metrics,
    counts_to_metrics,
    hanley_mcneil_interval,
    hanley_mcneil_se,
    merge_counts,
    pooled_metrics,
    sum_count_metrics,
    wilson_interval,
)

sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn (test extra) is not installed")

EXACT = 1e-12


def _predictions(seed: int, n: int, priors: list[float], signal: float = 1.5):
    """Random softmax scores that carry some signal about imbalanced labels."""
    rng = np.random.default_rng(seed)
    c = len(priors)
    y = rng.choice(c, size=n, p=priors)
    logits = rng.normal(size=(n, c)) + signal * np.eye(c)[y]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), y


def _assert_same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == pytest.approx(b[key], abs=EXACT, rel=0), key


# --------------------------------------------------------------------------- counting


def test_count_outcomes_small_example() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 0, 1])
    c = count_outcomes(scores, labels, bins=10)
    assert c.n == 5
    np.testing.assert_array_equal(c.confusion, [[1, 1], [1, 2]])
    # class 1 scores of positives: 0.8, 0.4, 1.0 -> bins 8, 4, 9 (1.0 goes to the last bin)
    np.testing.assert_array_equal(np.nonzero(c.pos_hist[1])[0], [4, 8, 9])
    np.testing.assert_array_equal(np.nonzero(c.neg_hist[1])[0], [1, 7])
    assert c.pos_hist.sum(axis=1).tolist() == [2, 3]
    assert c.neg_hist.sum(axis=1).tolist() == [3, 2]
    assert c.confusion.dtype == np.int64 and c.pos_hist.dtype == np.int64


def test_count_outcomes_empty_gives_zero_counts() -> None:
    c = count_outcomes(np.zeros((0, 3)), np.zeros(0, int), bins=5)
    assert c == OutcomeCounts.zeros(3, 5)
    m = pooled_metrics(c)
    assert m["n"] == 0 and math.isnan(m["accuracy"]) and math.isnan(m["macro-auc"])


# --------------------------------------------------------------------------- vs sklearn


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_binary_matches_sklearn(seed: int) -> None:
    scores, y = _predictions(seed, 700 + 97 * seed, [0.8, 0.2])
    yhat = scores.argmax(axis=1)
    counts = count_outcomes(scores, y, bins=1000)
    m = pooled_metrics(counts)

    assert m["n"] == len(y)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, yhat), abs=EXACT)
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y, yhat, pos_label=1), abs=EXACT)
    assert m["specificity"] == pytest.approx(sk.recall_score(y, yhat, pos_label=0), abs=EXACT)
    assert m["precision"] == pytest.approx(sk.precision_score(y, yhat, pos_label=1), abs=EXACT)
    assert m["npv"] == pytest.approx(sk.precision_score(y, yhat, pos_label=0), abs=EXACT)
    assert m["f1"] == pytest.approx(sk.f1_score(y, yhat, pos_label=1), abs=EXACT)
    tn, fp, fn, tp = sk.confusion_matrix(y, yhat).ravel()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)

    exact_auc = sk.roc_auc_score(y, scores[:, 1])
    bound = auc_resolution(counts.pos_hist[1], counts.neg_hist[1])
    assert abs(m["auc"] - exact_auc) <= bound + EXACT
    assert abs(m["auc"] - exact_auc) < 1e-3
    assert bound < 1e-3

    for name in ("accuracy", "sensitivity", "specificity", "precision", "npv", "auc"):
        assert m[f"{name}-ci-low"] <= m[name] <= m[f"{name}-ci-high"], name
        assert m[f"{name}-ci-high"] - m[f"{name}-ci-low"] > 0.0, name


def test_binary_positive_class_by_index_and_name() -> None:
    scores, y = _predictions(7, 500, [0.3, 0.7])
    yhat = scores.argmax(axis=1)
    counts = count_outcomes(scores, y)
    by_index = pooled_metrics(counts, ["normal", "effusion"], positive_class=0)
    by_name = pooled_metrics(counts, ["normal", "effusion"], positive_class="normal")
    _assert_same_metrics(by_index, by_name)
    assert by_index["sensitivity"] == pytest.approx(
        sk.recall_score(y, yhat, pos_label=0), abs=EXACT
    )
    assert by_index["specificity"] == pytest.approx(
        sk.recall_score(y, yhat, pos_label=1), abs=EXACT
    )
    exact_auc = sk.roc_auc_score(y == 0, scores[:, 0])
    assert (
        abs(by_index["auc"] - exact_auc)
        <= auc_resolution(counts.pos_hist[0], counts.neg_hist[0]) + EXACT
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_multiclass_matches_sklearn(seed: int) -> None:
    names = ["normal", "nodule", "effusion", "pneumothorax"]
    scores, y = _predictions(seed, 900 + 50 * seed, [0.5, 0.25, 0.15, 0.1])
    yhat = scores.argmax(axis=1)
    assert set(yhat) == set(y) == {0, 1, 2, 3}
    counts = count_outcomes(scores, y, bins=1000)
    m = pooled_metrics(counts, names)

    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, yhat), abs=EXACT)
    assert m["accuracy-ci-low"] < m["accuracy"] < m["accuracy-ci-high"]
    recall = sk.recall_score(y, yhat, average=None)
    precision = sk.precision_score(y, yhat, average=None)
    f1 = sk.f1_score(y, yhat, average=None)
    for k, name in enumerate(names):
        assert m[f"{name}/support"] == int((y == k).sum())
        assert m[f"{name}/sensitivity"] == pytest.approx(recall[k], abs=EXACT)
        assert m[f"{name}/precision"] == pytest.approx(precision[k], abs=EXACT)
        assert m[f"{name}/f1"] == pytest.approx(f1[k], abs=EXACT)
        spec = sk.recall_score(y != k, yhat != k)  # recall of the negative (rest) class
        assert m[f"{name}/specificity"] == pytest.approx(spec, abs=EXACT)
        exact_auc = sk.roc_auc_score(y == k, scores[:, k])
        bound = auc_resolution(counts.pos_hist[k], counts.neg_hist[k])
        assert abs(m[f"{name}/auc"] - exact_auc) <= bound + EXACT
        assert abs(m[f"{name}/auc"] - exact_auc) < 1e-3

    assert m["macro-sensitivity"] == pytest.approx(
        sk.recall_score(y, yhat, average="macro"), abs=EXACT
    )
    assert m["macro-f1"] == pytest.approx(sk.f1_score(y, yhat, average="macro"), abs=EXACT)
    assert m["macro-precision"] == pytest.approx(
        sk.precision_score(y, yhat, average="macro"), abs=EXACT
    )
    macro_auc = sk.roc_auc_score(y, scores, multi_class="ovr", average="macro")
    assert abs(m["macro-auc"] - macro_auc) < 1e-3
    assert "sensitivity" not in m and "tp" not in m


# --------------------------------------------------------------------------- AUC from bins


def test_auc_from_histograms_hand_computed() -> None:
    # pos in bins 1, 2; neg in bins 0, 1: wins 1 + 0.5 (tie in bin 1) + 2 = 3.5 of 4 pairs
    assert auc_from_histograms([0, 1, 1], [1, 1, 0]) == pytest.approx(0.875, abs=EXACT)
    assert auc_resolution([0, 1, 1], [1, 1, 0]) == pytest.approx(0.125, abs=EXACT)
    assert auc_from_histograms([0, 0, 3], [2, 0, 0]) == 1.0
    assert auc_resolution([0, 0, 3], [2, 0, 0]) == 0.0
    assert auc_from_histograms([3, 0, 0], [0, 0, 2]) == 0.0
    assert math.isnan(auc_from_histograms([0, 0, 0], [1, 2, 3]))
    assert math.isnan(auc_resolution([1, 2, 3], [0, 0, 0]))


@pytest.mark.parametrize("bins", [5, 20, 100])
def test_auc_error_within_resolution_with_coarse_bins_and_ties(bins: int) -> None:
    rng = np.random.default_rng(bins)
    y = rng.integers(0, 2, size=400)
    s = np.clip(np.round(rng.normal(0.4 + 0.2 * y, 0.2), 2), 0, 1)  # many exact ties
    counts = count_outcomes(np.stack([1 - s, s], axis=1), y, bins=bins)
    approx = auc_from_histograms(counts.pos_hist[1], counts.neg_hist[1])
    bound = auc_resolution(counts.pos_hist[1], counts.neg_hist[1])
    exact = sk.roc_auc_score(y, s)
    assert bound > 0.0
    assert abs(approx - exact) <= bound + EXACT


def test_auc_resolution_shrinks_with_more_bins() -> None:
    scores, y = _predictions(3, 600, [0.6, 0.4])
    res = [
        auc_resolution(c.pos_hist[1], c.neg_hist[1])
        for c in (count_outcomes(scores, y, bins=b) for b in (10, 100, 1000))
    ]
    assert res[0] > res[1] > res[2]


# --------------------------------------------------------------------------- pooling


def _split_sites(scores: np.ndarray, y: np.ndarray, sizes: list[int]):
    edges = np.cumsum([0, *sizes])
    return [(scores[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]


@pytest.mark.parametrize("priors", [[0.85, 0.15], [0.4, 0.3, 0.2, 0.1]])
def test_merged_site_counts_equal_pooled_count(priors: list[float]) -> None:
    scores, y = _predictions(11, 1000, priors)
    sites = _split_sites(scores, y, [120, 580, 300])
    site_counts = [count_outcomes(s, lab) for s, lab in sites]
    pooled = count_outcomes(scores, y)

    assert merge_counts(site_counts) == pooled
    assert site_counts[0] + site_counts[1] + site_counts[2] == pooled
    assert merge_counts(site_counts).n == 1000
    _assert_same_metrics(pooled_metrics(merge_counts(site_counts)), pooled_metrics(pooled))


def test_pooled_metrics_differ_from_average_of_site_metrics() -> None:
    def site(n_pos: int, hits: int, n_neg: int) -> OutcomeCounts:
        s = np.r_[np.full(hits, 0.9), np.full(n_pos - hits, 0.2), np.full(n_neg, 0.1)]
        y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
        return count_outcomes(np.stack([1 - s, s], axis=1), y)

    small = site(n_pos=10, hits=9, n_neg=10)  # sensitivity 0.9
    large = site(n_pos=90, hits=45, n_neg=90)  # sensitivity 0.5
    per_site = [pooled_metrics(small)["sensitivity"], pooled_metrics(large)["sensitivity"]]
    assert per_site == pytest.approx([0.9, 0.5], abs=EXACT)
    pooled = pooled_metrics(small + large)
    assert pooled["sensitivity"] == pytest.approx(54 / 100, abs=EXACT)
    assert abs(pooled["sensitivity"] - np.mean(per_site)) > 0.15


def test_merge_counts_rejects_mismatched_shapes() -> None:
    with pytest.raises(FedradError) as e:
        merge_counts([OutcomeCounts.zeros(2, 10), OutcomeCounts.zeros(2, 20)])
    assert e.value.code == "counts-mismatch"
    with pytest.raises(FedradError, match="classes"):
        OutcomeCounts.zeros(2, 10) + OutcomeCounts.zeros(3, 10)
    with pytest.raises(FedradError) as e:
        merge_counts([])
    assert e.value.code == "no-counts"


# --------------------------------------------------------------------------- transport


def test_flat_transport_round_trip_and_flower_record() -> None:
    scores, y = _predictions(5, 300, [0.5, 0.3, 0.2])
    counts = count_outcomes(scores, y, bins=50)
    flat = counts_to_metrics(counts, prefix="val-")
    assert set(flat) == {
        "val-num-classes",
        "val-bins",
        "val-confusion",
        "val-pos-hist",
        "val-neg-hist",
    }
    assert flat["val-num-classes"] == 3 and flat["val-bins"] == 50
    assert len(flat["val-confusion"]) == 9 and len(flat["val-pos-hist"]) == 150
    for value in flat.values():
        assert type(value) is int or all(type(v) is int for v in value)
    assert counts_from_metrics(flat, prefix="val-") == counts

    flwr_app = pytest.importorskip("flwr.app")
    record = flwr_app.MetricRecord(flat)  # Flower accepts the values as they are
    assert counts_from_metrics(dict(record), prefix="val-") == counts


def test_elementwise_sum_of_flat_lists_equals_merge() -> None:
    scores, y = _predictions(9, 900, [0.7, 0.3])
    site_counts = [
        count_outcomes(s, lab, bins=200) for s, lab in _split_sites(scores, y, [200, 450, 250])
    ]
    flats = [counts_to_metrics(c) for c in site_counts]

    # What a secure-aggregation layer does: add the lists, keep the shape entries.
    summed = {
        key: (
            flats[0][key]
            if key in ("num-classes", "bins")
            else np.sum([f[key] for f in flats], axis=0).tolist()
        )
        for key in flats[0]
    }
    assert counts_from_metrics(summed) == merge_counts(site_counts)
    assert counts_from_metrics(sum_count_metrics(flats)) == merge_counts(site_counts)
    assert sum_count_metrics(flats) == counts_to_metrics(merge_counts(site_counts))


def test_sum_count_metrics_rejects_mixed_settings() -> None:
    a = counts_to_metrics(OutcomeCounts.zeros(2, 10))
    b = counts_to_metrics(OutcomeCounts.zeros(2, 20))
    with pytest.raises(FedradError, match="'bins'") as e:
        sum_count_metrics([a, b])
    assert e.value.code == "bad-metrics"


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda m: m.pop("confusion"), "confusion"),
        (lambda m: m.update({"pos-hist": m["pos-hist"][:-1]}), "pos-hist"),
        (lambda m: m.update({"neg-hist": [-1] + m["neg-hist"][1:]}), "neg-hist"),
        (lambda m: m.update({"confusion": [0.5] + m["confusion"][1:]}), "confusion"),
        (lambda m: m.update({"num-classes": 1}), "num-classes"),
        (lambda m: m.update({"bins": "ten"}), "bins"),
        (lambda m: m.update({"confusion": "1,2,3,4"}), "confusion"),
        # pos-hist no longer agrees with the confusion matrix
        (lambda m: m.update({"pos-hist": [m["pos-hist"][0] + 1] + m["pos-hist"][1:]}), "pos-hist"),
    ],
)
def test_counts_from_metrics_rejects_bad_input(mutate, key: str) -> None:
    scores, y = _predictions(2, 60, [0.5, 0.5])
    flat = counts_to_metrics(count_outcomes(scores, y, bins=10))
    mutate(flat)
    with pytest.raises(FedradError) as e:
        counts_from_metrics(flat)
    assert e.value.code == "bad-metrics"
    assert f"'{key}'" in str(e.value)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("scores", "labels", "code"),
    [
        (np.array([0.2, 0.8]), [1, 0], "bad-scores"),  # 1-D
        (np.array([[1.0], [1.0]]), [0, 0], "bad-scores"),  # one class
        (np.array([[0.5, np.nan], [0.5, 0.5]]), [0, 1], "bad-scores"),
        (np.array([[2.3, -1.1], [0.5, 0.5]]), [0, 1], "bad-scores"),  # logits
        (np.array([["a", "b"], ["c", "d"]]), [0, 1], "bad-scores"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0, 2], "bad-labels"),  # out of range
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0, -1], "bad-labels"),
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0.5, 1.0], "bad-labels"),  # not integer
        (np.array([[0.5, 0.5], [0.5, 0.5]]), [0, 1, 1], "bad-labels"),  # length
    ],
)
def test_count_outcomes_rejects_bad_input(scores, labels, code: str) -> None:
    with pytest.raises(FedradError) as e:
        count_outcomes(scores, labels)
    assert e.value.code == code


def test_count_outcomes_tolerates_rounding_and_float_labels() -> None:
    c = count_outcomes([[1.0 + 1e-9, -1e-9], [0.3, 0.7]], np.array([0.0, 1.0]), bins=4)
    np.testing.assert_array_equal(c.confusion, [[1, 0], [0, 1]])
    assert c.pos_hist[0, 3] == 1 and c.neg_hist[1, 2] == 0 and c.neg_hist[1, 0] == 1


def test_count_outcomes_rejects_bad_bins() -> None:
    with pytest.raises(FedradError):
        count_outcomes([[0.5, 0.5]], [0], bins=0)


def test_outcome_counts_validates_arrays() -> None:
    with pytest.raises(FedradError, match="shape"):
        OutcomeCounts(2, 3, np.zeros((2, 2)), np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(FedradError, match="num_classes"):
        OutcomeCounts.zeros(1, 3)
    with pytest.raises(FedradError, match="bins"):
        OutcomeCounts(2, "3", np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(FedradError, match="whole counts"):
        OutcomeCounts(2, 3, np.full((2, 2), 0.5), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(FedradError, match="negative"):
        OutcomeCounts(2, 3, -np.ones((2, 2)), np.zeros((2, 3)), np.zeros((2, 3)))


def test_pooled_metrics_rejects_bad_class_arguments() -> None:
    counts = OutcomeCounts.zeros(2, 10)
    with pytest.raises(FedradError, match="3 class names"):
        pooled_metrics(counts, ["a", "b", "c"])
    with pytest.raises(FedradError, match="positive"):
        pooled_metrics(counts, ["a", "b"], positive_class="c")
    with pytest.raises(FedradError):
        pooled_metrics(counts, positive_class=2)


# --------------------------------------------------------------------------- undefined values


def test_undefined_values_are_nan_not_errors() -> None:
    # only negatives, all predicted negative: sensitivity, precision, f1 and AUC are 0/0
    m = pooled_metrics(count_outcomes([[0.9, 0.1]] * 5, [0] * 5))
    assert m["accuracy"] == 1.0 and m["specificity"] == 1.0 and m["npv"] == 1.0
    for key in ("sensitivity", "precision", "f1", "auc", "auc-ci-low", "sensitivity-ci-low"):
        assert math.isnan(m[key]), key


def test_multiclass_macro_ignores_undefined_classes() -> None:
    # class 2 never occurs and is never predicted
    scores = [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]]
    m = pooled_metrics(count_outcomes(scores, [0, 1, 1, 1]), ["a", "b", "c"])
    assert math.isnan(m["c/sensitivity"]) and math.isnan(m["c/auc"])
    assert m["c/specificity"] == 1.0
    assert m["a/sensitivity"] == 1.0 and m["b/sensitivity"] == pytest.approx(2 / 3)
    assert m["macro-sensitivity"] == pytest.approx((1.0 + 2 / 3) / 2, abs=EXACT)
    assert m["macro-auc"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- intervals


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [  # Newcombe, Stat Med 1998, table I (Wilson score, no continuity correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_known_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_contains_estimate_and_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 500))
        k = int(rng.integers(0, n + 1))
        lo, hi = wilson_interval(k, n)
        assert lo <= k / n <= hi
        ref = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(FedradError):
        wilson_interval(5, 3)


def test_hanley_mcneil_known_value_and_interval() -> None:
    # Hanley & McNeil, Radiology 1982: A = 0.893 with 51 abnormal, 58 normal -> SE 0.032
    assert hanley_mcneil_se(0.893, 51, 58) == pytest.approx(0.032, abs=1e-3)
    lo, hi = hanley_mcneil_interval(0.893, 51, 58)
    assert lo < 0.893 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.0325, abs=2e-3)
    lo_big, hi_big = hanley_mcneil_interval(0.893, 510, 580)
    assert hi_big - lo_big < hi - lo
    assert hanley_mcneil_interval(1.0, 10, 10) == (1.0, 1.0)
    assert all(math.isnan(v) for v in hanley_mcneil_interval(0.8, 0, 10))
