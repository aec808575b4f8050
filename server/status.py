"""The coordinator's view of a study: ``status.json``, a rotating JSON log, ``fedrad status``.

The ServerApp keeps ``<out-dir>/status.json`` up to date (written atomically at every step
of every round): the run's phase, the current round and step, which sites were asked and
which have answered, the last pooled and central metrics, and every fault of the run so far
(``faults``: a site's error reply, an excluded reply, or a site asked in a step that sent
no reply before ``round-timeout``).  Its log also goes, one JSON
object a line, to ``<out-dir>/logs/server.jsonl``, which rotates at 5 MB (five old files
kept), so a long study never fills the disk.

``fedrad status --out-dir DIR`` prints that view; with ``--connection NAME`` it also asks the
SuperLink (through Flower's CLI, on the coordinator machine) which SuperNodes are online and
which runs exist.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedrad.common.errors import FedradError

__all__ = [
    "STATUS_FILE",
    "JsonLogFormatter",
    "StatusWriter",
    "attach_run_log",
    "fetch_nodes",
    "fetch_runs",
    "format_status",
    "read_status",
]

STATUS_FILE = "status.json"
#: ``status.json`` keeps this many of the run's latest faults.
MAX_FAULTS = 200
LOG_FILE = Path("logs") / "server.jsonl"
_HEADLINE = ("auc", "accuracy", "sensitivity", "specificity", "f1")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class StatusWriter:
    """Keeps ``<out_dir>/status.json`` current; every call rewrites it atomically."""

    def __init__(self, out_dir: str | os.PathLike[str], *, num_rounds: int,
                 run_id: int | None = None) -> None:
        self.path = Path(out_dir) / STATUS_FILE
        self.state: dict[str, Any] = {
            "format": "fedrad-status/1",
            "run-id": run_id,
            "phase": "starting",
            "round": 0,
            "num-rounds": int(num_rounds),
            "step": "",
            "asked": [],
            "answered": [],
            "failed": [],
            "faults": [],
            "last-metrics": {},
            "started-at": time.time(),
            "updated-at": time.time(),
        }
        self._write()

    def _write(self) -> None:
        self.state["updated-at"] = time.time()
        _atomic_write(self.path, json.dumps(self.state, indent=2, allow_nan=False) + "\n")

    def step(self, server_round: int, step: str, *, asked: Sequence[int | str] = ()) -> None:
        """A new step of ``server_round`` started (``train``, ``evaluate``, a protocol step)."""
        self.state.update(phase="running", round=int(server_round), step=step,
                          asked=[str(a) for a in asked], answered=[], failed=[])
        self._write()

    def replies(self, answered: Sequence[int | str], failed: Sequence[str] = ()) -> None:
        """The step's replies are in: who answered, and each failure's text.

        A site that was asked in this step, did not answer and is not named in ``failed``
        sent no reply before the step's timeout (a straggler, or a site that died): it is
        added to ``failed`` as such.  Every failure is also kept in the run's ``faults``.
        """
        answered = [str(a) for a in answered]
        failed = [str(f) for f in failed]
        step = self.state["step"]
        failed += [f"{step}: node {node} sent no reply before the step's timeout "
                   "(round-timeout); counted as dropped"
                   for node in self.state["asked"]
                   if node not in answered
                   and not any(re.search(rf"\bnode {re.escape(node)}\b", f) for f in failed)]
        self.state["answered"] = answered
        self.state["failed"] = failed
        faults = self.state.setdefault("faults", [])
        for text in failed:
            entry = {"round": self.state["round"], "step": step, "failure": text}
            if not any(f["round"] == entry["round"] and f["failure"] == text for f in faults):
                faults.append(entry)
        del faults[:-MAX_FAULTS]
        self._write()

    def metrics(self, server_round: int, rows: Mapping[str, Mapping[str, Any]]) -> None:
        """Round ``server_round`` ended with these metric rows (``pooled``, ``central``...)."""
        keep = {}
        for scope in ("pooled", "central"):
            if scope in rows:
                row = rows[scope]
                keep[scope] = {k: row.get(k, row.get(f"macro-{k}")) for k in _HEADLINE}
        self.state["last-metrics"] = {"round": int(server_round), **keep}
        self._write()

    def finish(self, phase: str = "finished", message: str = "") -> None:
        """The run ended (``finished`` or ``failed``)."""
        self.state.update(phase=phase, step="", message=message)
        self._write()


def read_status(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``status.json`` of a run folder, with a clear error when there is none."""
    path = Path(out_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedradError(
            "no-status",
            f"{path} does not exist: give the run's out-dir (the folder with metrics.json)",
        ) from None
    except json.JSONDecodeError as err:
        raise FedradError("bad-status", f"{path} is not valid JSON ({err})") from None


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def attach_run_log(out_dir: str | os.PathLike[str], *, max_bytes: int = 5 * 2**20,
                   backups: int = 5, logger_name: str = "fedrad") -> logging.Handler:
    """Send ``logger_name``'s records to ``<out_dir>/logs/server.jsonl``, rotating.

    Returns the handler (remove it from the logger when the run ends). The logger's level
    is left as it is when it was set; an unset level becomes INFO.
    """
    path = Path(out_dir) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes,
                                                   backupCount=backups, encoding="utf-8")
    handler.setFormatter(JsonLogFormatter())
    handler.setLevel(logging.INFO)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        # a level someone chose (e.g. a quiet console) is kept; otherwise log INFO and up
        logger.setLevel(logging.INFO)
    return handler


def _flwr_json(args: Sequence[str], flwr: str | None) -> dict[str, Any]:
    exe = flwr or shutil.which("flwr")
    if exe is None:
        raise FedradError("no-flwr", "Flower's 'flwr' command is not on PATH")
    result = subprocess.run([exe, *args, "--format", "json"], capture_output=True, text=True,
                            timeout=120)
    text = result.stdout.strip()
    try:
        data = json.loads(text[text.index("{"):]) if "{" in text else {}
    except json.JSONDecodeError:
        data = {}
    if result.returncode != 0 or not data.get("success", False):
        reason = data.get("error-message") or (result.stderr or text).strip()[-300:]
        raise FedradError("superlink-unreachable",
                          f"'flwr {' '.join(args)}' failed: {reason}")
    return data


def fetch_nodes(connection: str, *, flwr: str | None = None) -> list[dict[str, Any]]:
    """The SuperNodes the SuperLink knows (``flwr supernode ls CONNECTION``)."""
    return list(_flwr_json(["supernode", "ls", connection], flwr).get("nodes", []))


def fetch_runs(connection: str, *, flwr: str | None = None) -> list[dict[str, Any]]:
    """The runs the SuperLink knows (``flwr ls CONNECTION``)."""
    return list(_flwr_json(["ls", connection], flwr).get("runs", []))


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def format_status(status: Mapping[str, Any], *, nodes: Sequence[Mapping[str, Any]] = (),
                  runs: Sequence[Mapping[str, Any]] = (), now: float | None = None) -> str:
    """The coordinator's status as plain text."""
    now = time.time() if now is None else now
    lines = []
    age = now - float(status.get("updated-at", now))
    lines.append(
        f"run {status.get('run-id') or '-'}: {status.get('phase')}, round "
        f"{status.get('round')}/{status.get('num-rounds')}"
        + (f", step {status['step']}" if status.get("step") else "")
        + f" (updated {age:.0f} s ago)"
    )
    if status.get("message"):
        lines.append(f"  {status['message']}")
    asked, answered = status.get("asked", []), status.get("answered", [])
    if asked:
        waiting = [a for a in asked if a not in answered]
        lines.append(f"  replies: {len(answered)} of {len(asked)} sites"
                     + (f"; waiting for {', '.join(waiting)}" if waiting else ""))
    for failure in status.get("failed", []):
        lines.append(f"  failed: {failure}")
    current = set(status.get("failed", []))
    earlier = [f for f in status.get("faults", []) if f.get("failure") not in current]
    if earlier:
        lines.append(f"  earlier faults this run: {len(earlier)}"
                     + (" (latest 5)" if len(earlier) > 5 else ""))
        for fault in earlier[-5:]:
            lines.append(f"    round {fault.get('round')}: {fault.get('failure')}")
    last = status.get("last-metrics") or {}
    if last:
        lines.append(f"  metrics after round {last.get('round')}:")
        lines.append("    scope    " + "".join(f"{k:>13}" for k in _HEADLINE))
        for scope in ("pooled", "central"):
            if scope in last:
                lines.append(f"    {scope:<9}" + "".join(f"{_fmt(last[scope].get(k)):>13}"
                                                        for k in _HEADLINE))
    if nodes:
        online = [n for n in nodes if n.get("status") == "online"]
        lines.append(f"  SuperNodes: {len(online)} online of {len(nodes)} registered")
        for n in nodes:
            since = n.get("online-at") if n.get("status") == "online" else n.get("offline-at")
            lines.append(f"    node {n.get('node-id')}: {n.get('status')} (since {since})")
    for r in runs:
        lines.append(f"  run {r.get('run-id')}: {r.get('status')}, {r.get('elapsed')} elapsed, "
                     f"app {r.get('fab-id')} {r.get('fab-version')}")
    return "\n".join(lines)
