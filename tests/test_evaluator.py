"""The server's metrics log, its files and its round tables."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedrad.common.errors import FedradError
from fedrad.common.metrics import count_outcomes, pooled_metrics
from fedrad.server.evaluator import (
    METRICS_CSV,
    METRICS_JSON,
    MetricsLog,
    format_final_summary,
    format_round_table,
)

BINARY = ["normal", "effusion"]
FOUR = ["normal", "nodule", "effusion", "pneumothorax"]


def _metrics(seed: int, n: int, class_names: list[str], signal: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    c = len(class_names)
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c)) + signal * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return pooled_metrics(count_outcomes(p, y), class_names)


def _filled_log(out_dir: Path, class_names: list[str], rounds: int = 3) -> MetricsLog:
    log = MetricsLog(out_dir, class_names)
    for r in range(1, rounds + 1):
        # record out of display order on purpose
        log.record(r, "site:hosp-b", _metrics(10 * r + 2, 150, class_names, signal=r))
        log.record(r, "pooled", _metrics(10 * r, 400, class_names, signal=r))
        log.record(r, "site:hosp-a", _metrics(10 * r + 1, 250, class_names, signal=r))
    return log


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k]
        for k in a
    )


# --------------------------------------------------------------------------- log


def test_record_rows_latest_and_ordering(tmp_path: Path) -> None:
    log = _filled_log(tmp_path, BINARY)
    rows = log.rows()
    assert [(r["round"], r["scope"]) for r in rows[:3]] == [
        (1, "pooled"),
        (1, "site:hosp-a"),
        (1, "site:hosp-b"),
    ]
    assert len(rows) == 9 and log.rounds() == [1, 2, 3]
    assert rows[0]["n"] == 400 and "n" not in rows[0]["metrics"]

    latest = log.latest("pooled")
    assert latest is not None and latest["n"] == 400
    assert latest["auc"] == pytest.approx(_metrics(30, 400, BINARY, signal=3)["auc"])
    assert log.latest("central") is None

    # rows() hands out copies
    rows[0]["metrics"]["accuracy"] = -1.0
    assert log.rows()[0]["metrics"]["accuracy"] != -1.0


def test_record_replaces_and_takes_explicit_n(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, BINARY)
    log.record(0, "central", {"accuracy": 0.5}, n=20)
    log.record(0, "central", {"accuracy": np.float64(0.75), "tp": np.int64(3)}, n=20)
    (row,) = log.rows()
    assert row["metrics"] == {"accuracy": 0.75, "tp": 3}
    assert type(row["metrics"]["accuracy"]) is float and type(row["metrics"]["tp"]) is int


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"round": 1, "scope": "global", "metrics": {}}, "bad-scope"),
        ({"round": 1, "scope": "site:", "metrics": {}}, "bad-scope"),
        ({"round": -1, "scope": "pooled", "metrics": {}}, "bad-round"),
        ({"round": 1, "scope": "pooled", "metrics": {"auc": "high"}}, "bad-metrics"),
        ({"round": 1, "scope": "pooled", "metrics": {"n": 5}, "n": 6}, "bad-metrics"),
        ({"round": 1, "scope": "pooled", "metrics": {"n": float("nan")}}, "bad-metrics"),
        ({"round": 1, "scope": "pooled", "metrics": {}, "n": -3}, "bad-metrics"),
    ],
)
def test_record_rejects_bad_input(tmp_path: Path, kwargs: dict, code: str) -> None:
    with pytest.raises(FedradError) as e:
        MetricsLog(tmp_path, BINARY).record(**kwargs)
    assert e.value.code == code


# --------------------------------------------------------------------------- files


def test_write_creates_both_files_atomically(tmp_path: Path) -> None:
    out = tmp_path / "run" / "nested"
    log = _filled_log(out, BINARY)
    json_path, csv_path = log.write()
    assert json_path == out / METRICS_JSON and csv_path == out / METRICS_CSV
    assert json_path.is_file() and csv_path.is_file()
    assert sorted(p.name for p in out.iterdir()) == [METRICS_CSV, METRICS_JSON]  # no temp left

    doc = json.loads(json_path.read_text())
    assert doc["class-names"] == BINARY
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    assert list(doc["rounds"][0]["scopes"]) == ["pooled", "site:hosp-a", "site:hosp-b"]
    assert doc["rounds"][2]["scopes"]["pooled"]["n"] == 400

    # called after every round: a later write sees the new round
    log.record(4, "pooled", _metrics(40, 400, BINARY))
    log.write()
    assert [r["round"] for r in json.loads(json_path.read_text())["rounds"]] == [1, 2, 3, 4]
    assert sum(1 for _ in csv.reader(csv_path.open())) == 1 + 10


def test_json_round_trips_including_nan(tmp_path: Path) -> None:
    log = _filled_log(tmp_path, FOUR)
    log.record(3, "central", {"accuracy": float("nan"), "macro-auc": 0.7}, n=0)
    log.write()
    text = (tmp_path / METRICS_JSON).read_text()
    assert "NaN" not in text  # strict JSON: NaN is written as null
    back = MetricsLog.load(tmp_path)
    assert back.class_names == FOUR
    original, loaded = log.rows(), back.rows()
    assert [(r["round"], r["scope"], r["n"]) for r in original] == [
        (r["round"], r["scope"], r["n"]) for r in loaded
    ]
    assert all(_same(a["metrics"], b["metrics"]) for a, b in zip(original, loaded, strict=True))
    assert math.isnan(back.latest("central")["accuracy"])


def test_load_rejects_foreign_json(tmp_path: Path) -> None:
    (tmp_path / METRICS_JSON).write_text('{"rounds": []}')
    with pytest.raises(FedradError) as e:
        MetricsLog.load(tmp_path)
    assert e.value.code == "bad-metrics-file"


def test_csv_columns_are_stable(tmp_path: Path) -> None:
    a = _filled_log(tmp_path / "a", BINARY)
    # same content recorded in another order, with metric dicts in reversed key order
    b = MetricsLog(tmp_path / "b", BINARY)
    for row in reversed(a.rows()):
        b.record(
            row["round"], row["scope"], dict(reversed(list(row["metrics"].items()))), n=row["n"]
        )
    a.write()
    b.write()
    text_a = (tmp_path / "a" / METRICS_CSV).read_text()
    assert text_a == (tmp_path / "b" / METRICS_CSV).read_text()

    rows = list(csv.reader(text_a.splitlines()))
    header = rows[0]
    assert header[:3] == ["round", "scope", "n"]
    assert header[3:9] == [
        "accuracy",
        "accuracy-ci-low",
        "accuracy-ci-high",
        "sensitivity",
        "sensitivity-ci-low",
        "sensitivity-ci-high",
    ]
    assert header.index("auc") < header.index("tp")
    assert len(header) == len(set(header))
    assert all(len(r) == len(header) for r in rows)
    assert [r[1] for r in rows[1:4]] == ["pooled", "site:hosp-a", "site:hosp-b"]
    pooled_1 = dict(zip(header, rows[1], strict=True))
    assert float(pooled_1["auc"]) == a.rows()[0]["metrics"]["auc"]  # full precision
    assert int(pooled_1["n"]) == 400


def test_csv_union_of_columns_and_empty_cells(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, FOUR)
    log.record(1, "pooled", {"accuracy": 0.5, "macro-auc": float("nan")}, n=10)
    log.record(2, "pooled", {"accuracy": 0.6, "normal/sensitivity": 0.9, "zz-extra": 1}, n=10)
    header, r1, r2 = list(csv.reader(log.to_csv().splitlines()))
    assert header == [
        "round",
        "scope",
        "n",
        "accuracy",
        "macro-auc",
        "normal/sensitivity",
        "zz-extra",
    ]
    assert r1 == ["1", "pooled", "10", "0.5", "nan", "", ""]
    assert r2 == ["2", "pooled", "10", "0.6", "", "0.9", "1"]


def test_write_reports_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    log = MetricsLog(blocker / "out", BINARY)
    log.record(1, "pooled", {"accuracy": 1.0}, n=1)
    with pytest.raises(FedradError) as e:
        log.write()
    assert e.value.code == "metrics-write-failed" and "out-dir" in str(e.value)


# --------------------------------------------------------------------------- tables


def test_binary_round_table_shows_scopes_numbers_and_ci() -> None:
    rows = {
        "site:hosp-a": {
            "n": 120,
            "accuracy": 0.9,
            "sensitivity": 0.85,
            "specificity": 0.93,
            "f1": 0.8,
            "auc": 0.951,
            "auc-ci-low": 0.931,
            "auc-ci-high": 0.968,
        },
        "pooled": {
            "n": 1200,
            "accuracy": 0.912,
            "sensitivity": 0.88,
            "specificity": 0.931,
            "f1": 0.874,
            "auc": 0.9512,
            "auc-ci-low": 0.93,
            "auc-ci-high": 0.97,
        },
        "central": {
            "n": 50,
            "accuracy": float("nan"),
            "sensitivity": float("nan"),
            "specificity": 1.0,
            "f1": float("nan"),
            "auc": float("nan"),
            "auc-ci-low": float("nan"),
            "auc-ci-high": float("nan"),
        },
    }
    table = format_round_table(7, rows, BINARY)
    lines = table.splitlines()
    assert "7" in lines[0]
    assert lines[1].split() == ["scope", "n", "accuracy", "sensitivity", "specificity", "f1", "auc"]
    assert [ln.split()[0] for ln in lines[2:]] == ["pooled", "central", "site:hosp-a"]
    pooled = lines[2].split()
    assert pooled[:7] == ["pooled", "1200", "0.912", "0.880", "0.931", "0.874", "0.951"]
    assert "0.951 [0.93-0.97]" in lines[2]
    assert "0.951 [0.93-0.97]" in lines[4]
    assert lines[3].split() == ["central", "50", "n/a", "n/a", "1.000", "n/a", "n/a"]
    assert "nan" not in table.lower().replace("n/a", "")
    # fixed width: every column starts at the same offset on every line
    starts = {ln.index(ln.split()[2], len(ln.split()[0]) + 2) for ln in lines[1:]}
    assert len(starts) == 1
    assert all(ln == ln.rstrip() for ln in lines)


def test_multiclass_round_table_uses_macro_columns(tmp_path: Path) -> None:
    log = _filled_log(tmp_path, FOUR, rounds=1)
    table = format_round_table(1, log.round_rows(1), FOUR)
    header = table.splitlines()[1].split()
    assert header == [
        "scope",
        "n",
        "accuracy",
        "macro-sensitivity",
        "macro-specificity",
        "macro-f1",
        "macro-auc",
    ]
    pooled = log.latest("pooled")
    assert f"{pooled['macro-auc']:.3f}" in table.splitlines()[2]
    assert f"{pooled['accuracy']:.3f}" in table.splitlines()[2]


def test_round_table_missing_values_and_empty() -> None:
    table = format_round_table(2, {"pooled": {"accuracy": 0.5}}, BINARY)
    assert table.splitlines()[2].split() == ["pooled", "n/a", "0.500", "n/a", "n/a", "n/a", "n/a"]
    assert "no metrics" in format_round_table(2, {}, BINARY)


def test_final_summary_has_last_table_and_best_round(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, BINARY)
    for r, auc in ((1, 0.71), (2, 0.93), (3, 0.88)):
        log.record(r, "pooled", {"accuracy": 0.8, "auc": auc}, n=100)
        log.record(r, "site:a", {"accuracy": 0.7, "auc": auc + 0.05}, n=40)
    log.record(3, "central", {"accuracy": 0.75, "auc": float("nan")}, n=30)
    summary = format_final_summary(log)
    assert "0.880" in summary and "0.710" not in summary  # the last round's table
    assert "site:a" in summary
    assert "best round by pooled auc: 2 (0.930)" in summary
    assert "best round by central accuracy: 3 (0.750)" in summary  # AUC never defined
    assert "no metrics" in format_final_summary(MetricsLog(tmp_path, BINARY))
