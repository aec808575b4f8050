"""The server's metrics log and the tables it prints after every round.

Every round the server records one row per *scope*:

``"pooled"``
    metrics of the summed outcome counts of all sites (see :mod:`fedrad.common.metrics`);
``"site:<site-id>"``
    metrics of one site's counts;
``"central"``
    metrics on the server-held test set;
``"subgroup:<name>"``
    metrics of a pooled subgroup (e.g. one scanner vendor).

:class:`MetricsLog` keeps the full history and rewrites ``metrics.json`` (nested by round)
and ``metrics.csv`` (one row per round and scope) atomically into the run's output folder,
so a crash never leaves a half-written file.  :func:`format_round_table` and
:func:`format_final_summary` render the compact tables that go to the log and terminal.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrad.common.errors import FedradError

__all__ = [
    "MetricsLog",
    "format_round_table",
    "format_final_summary",
    "scope_sort_key",
    "METRICS_JSON",
    "METRICS_CSV",
]

logger = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
_FORMAT = "fedrad-metrics/1"

#: Column order of the CSV for the metrics fedrad computes; other keys follow sorted.
_METRIC_ORDER = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "auc",
    "macro-sensitivity",
    "macro-specificity",
    "macro-precision",
    "macro-f1",
    "macro-auc",
)
_PER_CLASS_ORDER = ("support", "sensitivity", "specificity", "precision", "f1", "auc")
_COUNT_ORDER = ("tp", "fp", "tn", "fn")
_SCOPE_PREFIXES = ("site:", "subgroup:")


def scope_sort_key(scope: str) -> tuple[int, str]:
    """Order scopes as pooled, central, sites (by id), subgroups (by name)."""
    if scope == "pooled":
        return (0, "")
    if scope == "central":
        return (1, "")
    if scope.startswith("site:"):
        return (2, scope)
    return (3, scope)


def _check_scope(scope: str) -> str:
    if not isinstance(scope, str):
        raise FedradError("bad-scope", f"scope must be a string, got {type(scope).__name__}.")
    if scope in ("pooled", "central"):
        return scope
    for prefix in _SCOPE_PREFIXES:
        if scope.startswith(prefix) and scope[len(prefix) :].strip():
            return scope
    raise FedradError(
        "bad-scope",
        f"unknown metrics scope {scope!r}: use 'pooled', 'central', "
        "'site:<site-id>' or 'subgroup:<name>'.",
    )


def _number(key: str, value: Any) -> int | float:
    """Plain int / float of a metric value (numpy scalars included)."""
    if isinstance(value, numbers.Integral):  # bool and numpy integers too
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise FedradError(
        "bad-metrics", f"metric {key!r} must be a number, got {type(value).__name__}."
    )


def _metric_column_order(keys: Iterable[str], class_names: Sequence[str]) -> list[str]:
    """Stable, readable order: known metrics with their CIs, per-class, counts, the rest."""
    remaining = set(keys) - {"n"}
    ordered: list[str] = []

    def take(key: str) -> None:
        if key in remaining:
            ordered.append(key)
            remaining.discard(key)

    for metric in _METRIC_ORDER:
        for key in (metric, f"{metric}-ci-low", f"{metric}-ci-high"):
            take(key)
    for name in class_names:
        for metric in _PER_CLASS_ORDER:
            take(f"{name}/{metric}")
    for key in _COUNT_ORDER:
        take(key)
    return ordered + sorted(remaining)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _json_value(value: int | float) -> int | float | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads back as NaN
    return value


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


class MetricsLog:
    """History of evaluation metrics, per round and scope, written after every round.

    Parameters
    ----------
    out_dir:
        Folder that receives ``metrics.json`` and ``metrics.csv`` (created on write).
    class_names:
        Class names in label order; two names mean a binary task (tables show
        sensitivity/specificity), more mean macro averages.
    """

    def __init__(self, out_dir: str | os.PathLike[str], class_names: Sequence[str]) -> None:
        names = [str(c) for c in class_names]
        if len(names) < 2:
            raise FedradError("bad-class", f"need at least two class names, got {names}.")
        self.out_dir = Path(out_dir)
        self.class_names = names
        self._rows: dict[tuple[int, str], dict[str, Any]] = {}

    def record(
        self, round: int, scope: str, metrics: Mapping[str, Any], n: int | None = None
    ) -> None:
        """Record the metrics of one scope in one round (replacing an earlier record).

        Parameters
        ----------
        round:
            Server round (0 for an evaluation before training).
        scope:
            ``"pooled"``, ``"central"``, ``"site:<site-id>"`` or ``"subgroup:<name>"``.
        metrics:
            Metric name -> number (NaN allowed), e.g. from ``pooled_metrics``.
        n:
            Number of samples; defaults to ``metrics["n"]``.
        """
        if isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 0:
            raise FedradError("bad-round", f"round must be a non-negative integer, got {round!r}.")
        round = int(round)
        scope = _check_scope(scope)
        values = {str(k): _number(str(k), v) for k, v in metrics.items()}
        n_metric = values.pop("n", None)
        if n is None:
            n = n_metric
        elif n_metric is not None and n_metric != n:
            raise FedradError(
                "bad-metrics", f"n={n} disagrees with metric 'n'={n_metric} for scope {scope!r}."
            )
        if n is not None:
            if (
                isinstance(n, bool)
                or not isinstance(n, numbers.Real)
                or not math.isfinite(n)
                or n < 0
                or n != int(n)
            ):
                raise FedradError("bad-metrics", f"n must be a non-negative integer, got {n!r}.")
            n = int(n)
        key = (round, scope)
        if key in self._rows:
            logger.debug("replacing metrics of round %s, scope %s", round, scope)
        self._rows[key] = {"round": round, "scope": scope, "n": n, "metrics": values}

    def rows(self) -> list[dict[str, Any]]:
        """All records as ``{"round", "scope", "n", "metrics"}``, by round then scope."""
        keys = sorted(self._rows, key=lambda k: (k[0], scope_sort_key(k[1])))
        return [self._copy_row(self._rows[k]) for k in keys]

    def rounds(self) -> list[int]:
        """Rounds that have at least one record, ascending."""
        return sorted({r for r, _ in self._rows})

    def scopes(self) -> list[str]:
        """Every scope recorded, in display order."""
        return sorted({s for _, s in self._rows}, key=scope_sort_key)

    def round_rows(self, round: int) -> dict[str, dict[str, Any]]:
        """``{scope: metrics}`` of one round (metrics include ``"n"``), in display order."""
        scopes = sorted((s for r, s in self._rows if r == round), key=scope_sort_key)
        return {s: self._metrics_with_n(self._rows[(round, s)]) for s in scopes}

    def latest(self, scope: str) -> dict[str, Any] | None:
        """Metrics (with ``"n"``) of the last round that recorded ``scope``, or None."""
        rounds = [r for r, s in self._rows if s == scope]
        if not rounds:
            return None
        return self._metrics_with_n(self._rows[(max(rounds), scope)])

    @staticmethod
    def _copy_row(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "metrics": dict(row["metrics"])}

    @staticmethod
    def _metrics_with_n(row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": row["n"]} if row["n"] is not None else {}
        out.update(row["metrics"])
        return out

    # ------------------------------------------------------------------ files

    def to_json(self) -> dict[str, Any]:
        """The JSON document: the full history nested by round (NaN as null)."""
        rounds: list[dict[str, Any]] = []
        for row in self.rows():
            if not rounds or rounds[-1]["round"] != row["round"]:
                rounds.append({"round": row["round"], "scopes": {}})
            rounds[-1]["scopes"][row["scope"]] = {
                "n": row["n"],
                "metrics": {k: _json_value(v) for k, v in row["metrics"].items()},
            }
        return {"format": _FORMAT, "class-names": list(self.class_names), "rounds": rounds}

    def csv_columns(self) -> list[str]:
        """CSV header: ``round, scope, n`` then every metric seen, in a stable order."""
        keys: set[str] = set()
        for row in self._rows.values():
            keys.update(row["metrics"])
        return ["round", "scope", "n", *_metric_column_order(keys, self.class_names)]

    def to_csv(self) -> str:
        """The CSV text: one row per round and scope; absent metrics empty, NaN as ``nan``."""
        columns = self.csv_columns()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in self.rows():
            values = {"round": row["round"], "scope": row["scope"], "n": row["n"], **row["metrics"]}
            writer.writerow([_csv_value(values.get(c)) for c in columns])
        return buf.getvalue()

    def write(self) -> tuple[Path, Path]:
        """Atomically (re)write ``metrics.json`` and ``metrics.csv``; return their paths."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            json_path = self.out_dir / METRICS_JSON
            csv_path = self.out_dir / METRICS_CSV
            _atomic_write_text(
                json_path, json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
            )
            _atomic_write_text(csv_path, self.to_csv())
        except OSError as e:
            raise FedradError(
                "metrics-write-failed",
                f"cannot write metrics into {self.out_dir}: {e.strerror}; check "
                "that 'out-dir' is writable.",
            ) from e
        logger.debug("metrics written to %s", self.out_dir)
        return json_path, csv_path

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> MetricsLog:
        """Read back the ``metrics.json`` that :meth:`write` produced (null -> NaN)."""
        path = Path(out_dir) / METRICS_JSON
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise FedradError("bad-metrics-file", f"cannot read {path}: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise FedradError(
                "bad-metrics-file",
                f"{path} is not a fedrad metrics file (expected format {_FORMAT!r}).",
            )
        log = cls(out_dir, doc["class-names"])
        for entry in doc["rounds"]:
            for scope, row in entry["scopes"].items():
                metrics = {k: (math.nan if v is None else v) for k, v in row["metrics"].items()}
                log.record(int(entry["round"]), scope, metrics, n=row["n"])
        return log


# ---------------------------------------------------------------------- tables


def _is_binary(class_names: Sequence[str]) -> bool:
    return len(class_names) == 2


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _with_ci(metrics: Mapping[str, Any], key: str) -> str:
    text = _fmt(metrics.get(key))
    low, high = metrics.get(f"{key}-ci-low"), metrics.get(f"{key}-ci-high")
    defined = [v for v in (low, high) if isinstance(v, (int, float)) and not math.isnan(v)]
    if text != "n/a" and len(defined) == 2:
        text += f" [{low:.2f}-{high:.2f}]"
    return text


def _table_columns(class_names: Sequence[str]) -> list[str]:
    """Metric keys shown as table columns (after scope and n)."""
    if _is_binary(class_names):
        return ["accuracy", "sensitivity", "specificity", "f1", "auc"]
    return ["accuracy", "macro-sensitivity", "macro-specificity", "macro-f1", "macro-auc"]


def format_round_table(
    round: int, rows: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]
) -> str:
    """Render one round's metrics as a fixed-width plain-text table.

    Parameters
    ----------
    round:
        The server round, shown in the title line.
    rows:
        ``{scope: metrics}``; ``metrics["n"]`` gives the sample count.
    class_names:
        Two names: binary columns (accuracy, sensitivity, specificity, f1, auc);
        more: accuracy and macro averages.

    Returns
    -------
    str
        A title line and one line per scope (pooled, central, sites, subgroups); the AUC
        shows its 95 % CI when available (``0.951 [0.93-0.97]``); NaN and missing values
        print as ``n/a``.
    """
    columns = _table_columns(class_names)
    header = ["scope", "n", *columns]
    body = []
    for scope in sorted(rows, key=scope_sort_key):
        m = rows[scope]
        cells = [scope, _fmt(m.get("n"))]
        for key in columns:
            cells.append(_with_ci(m, key) if key.endswith("auc") else _fmt(m.get(key)))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0]), cells[1].rjust(widths[1])]
        parts += [c.ljust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
        return "  ".join(parts).rstrip()

    title = f"[ROUND {round}] evaluation ({'binary' if _is_binary(class_names) else 'macro'})"
    if not body:
        return f"{title}\n  no metrics recorded"
    return "\n".join([title, "  " + line(header), *("  " + line(b) for b in body)])


def _best_round(log: MetricsLog, scope: str, key: str) -> tuple[int, float] | None:
    best: tuple[int, float] | None = None
    for row in log.rows():
        if row["scope"] != scope:
            continue
        value = row["metrics"].get(key)
        if not isinstance(value, (int, float)) or math.isnan(value):
            continue
        if best is None or value > best[1]:  # ties keep the earlier round
            best = (row["round"], float(value))
    return best


def format_final_summary(log: MetricsLog) -> str:
    """The last round's table plus, for the pooled and central scopes, the best round.

    The best round maximises AUC (macro AUC for multi-class), falling back to accuracy
    when AUC is undefined in every round.
    """
    rounds = log.rounds()
    if not rounds:
        return "[SUMMARY] no metrics recorded"
    last = rounds[-1]
    lines = [
        f"[SUMMARY] {len(rounds)} evaluated round(s), last round {last}",
        format_round_table(last, log.round_rows(last), log.class_names),
    ]
    auc_key = "auc" if _is_binary(log.class_names) else "macro-auc"
    scopes = [s for s in ("pooled", "central") if s in log.scopes()]
    for scope in scopes:
        for key in (auc_key, "accuracy"):
            best = _best_round(log, scope, key)
            if best is not None:
                lines.append(f"best round by {scope} {key}: {best[0]} ({best[1]:.3f})")
                break
        else:
            lines.append(f"best round by {scope} {auc_key}: n/a (never defined)")
    return "\n".join(lines)
