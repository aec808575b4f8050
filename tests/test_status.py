"""The coordinator's view: status.json, the rotating JSON log and ``fedrad status``."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.common.errors import FedradError
from fedrad.server.status import (
    StatusWriter,
    attach_run_log,
    fetch_nodes,
    format_status,
    read_status,
)


def test_status_follows_the_round(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path, num_rounds=3, run_id=42)
    assert read_status(tmp_path)["phase"] == "starting"
    writer.step(2, "train", asked=[11, 12, 13])
    writer.replies([11, 13], failed=["node 12 failed: [site-internal-error] ..."])
    state = read_status(tmp_path)
    assert (state["round"], state["step"], state["answered"]) == (2, "train", ["11", "13"])
    text = format_status(state, now=state["updated-at"] + 5)
    assert "run 42: running, round 2/3, step train (updated 5 s ago)" in text
    assert "replies: 2 of 3 sites; waiting for 12" in text
    assert "failed: node 12 failed" in text
    writer.metrics(2, {"pooled": {"auc": 0.91, "accuracy": 0.8},
                       "central": {"macro-auc": 0.88}})
    writer.finish()
    state = read_status(tmp_path)
    assert state["phase"] == "finished"
    assert state["last-metrics"]["central"]["auc"] == 0.88
    assert "0.910" in format_status(state)
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_missing_status_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FedradError, match="give the run's out-dir"):
        read_status(tmp_path)
    result = CliRunner().invoke(app, ["status", "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no-status" in result.output


def test_run_log_is_json_lines_and_rotates(tmp_path: Path) -> None:
    handler = attach_run_log(tmp_path, max_bytes=2000, backups=2, logger_name="fedrad.t")
    try:
        log = logging.getLogger("fedrad.t")
        for i in range(100):
            log.info("round %d: pooled AUC %.3f", i, 0.5 + i / 1000)
    finally:
        logging.getLogger("fedrad.t").removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["server.jsonl", "server.jsonl.1", "server.jsonl.2"]
    for name in files:
        path = tmp_path / "logs" / name
        assert path.stat().st_size <= 2000 + 200
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            assert entry["level"] == "INFO" and entry["message"].startswith("round ")
    last = (tmp_path / "logs" / "server.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["message"] == "round 99: pooled AUC 0.599"


def _fake_flwr(tmp_path: Path, output: str, code: int = 0) -> str:
    script = tmp_path / "flwr"
    script.write_text(f"#!/bin/sh\ncat <<'JSON'\n{output}\nJSON\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_nodes_from_the_superlink(tmp_path: Path) -> None:
    nodes = {"success": True, "nodes": [
        {"node-id": "11", "status": "online", "online-at": "2026-11-26 09:00:00Z"},
        {"node-id": "12", "status": "offline", "offline-at": "2026-11-26 09:05:00Z"}]}
    flwr = _fake_flwr(tmp_path, json.dumps(nodes))
    got = fetch_nodes("study-local", flwr=flwr)
    assert [n["node-id"] for n in got] == ["11", "12"]
    StatusWriter(tmp_path, num_rounds=1)
    text = format_status(read_status(tmp_path), nodes=got)
    assert "SuperNodes: 1 online of 2 registered" in text
    assert "node 12: offline (since 2026-11-26 09:05:00Z)" in text
    failing = _fake_flwr(tmp_path, json.dumps({"success": False,
                                               "error-message": "connection refused"}), 1)
    with pytest.raises(FedradError, match="connection refused"):
        fetch_nodes("study-local", flwr=failing)


def test_status_command(tmp_path: Path) -> None:
    writer = StatusWriter(tmp_path, num_rounds=2)
    writer.step(1, "evaluate", asked=["1", "2"])
    result = CliRunner().invoke(app, ["status", "--out-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["status"]["step"] == "evaluate"
    result = CliRunner().invoke(app, ["status", "--out-dir", str(tmp_path)])
    assert "round 1/2, step evaluate" in result.output
    assert os.path.isfile(tmp_path / "status.json")
