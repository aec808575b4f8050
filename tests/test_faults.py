"""Faults with real Flower processes on loopback: a killed site, a straggler, a SuperLink restart.

``test_killed_site_and_straggler``: three SuperNodes with TLS and registered site keys,
``min-sites=2``, plain FedAvg and a small ``round-timeout``.  In round 1, site-3's SuperNode,
SuperExec and ClientApp (one process group) are SIGKILLed while its ClientApp trains: the round
goes on with site-1 and site-2 and status.json records site-3's node (the SuperLink's "Node
Unavailable" error reply once it misses its heartbeats, or no reply before the timeout).  site-3
is started again at once and again every few seconds, as a service manager would: the SuperLink
refuses a SuperNode whose node still counts as online (exit code 1, Flower code 305) until 60 s
after the last heartbeat; then it gets its registered node back and trains in round 2 (its
egress log shows the round-2 training reply).  When round 2 training starts, site-2's SuperExec
and ClientApp are SIGSTOPped (its SuperNode keeps sending heartbeats: a slow site, not a dead
one; stopping the ClientApp alone is not enough, Flower's SuperExec starts a new one when a
ClientApp stops sending task heartbeats): the step ends after about ``round-timeout`` without
it, status.json records it, and after SIGCONT it evaluates in round 2 again.

``test_superlink_restart_and_resume``: deploy/README.md's setup (TLS, SuperNode
authentication, the sites behind fedrad's gateway) with the SuperLink's state in a database
(``--database``: registered keys and node ids survive it).  After round 1 of 2 is saved, the
SuperLink, its SuperExec and the ServerApp (one process group) are SIGKILLed; the two
SuperNodes (the same processes, started without ``--max-retries`` / ``--max-wait-time``, so
they retry for ever; the gateway answers 502 meanwhile) reconnect to a new SuperLink on the
same port and database, and ``flwr run`` with ``resume=true`` and the same out-dir runs
round 2 only: two checkpoints, metrics rows for rounds 1 and 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _federation import BIN, ROOT, LoopbackFederation, make_site_caches, metric_rows

from fedrad.server import certs

pytestmark = pytest.mark.integration

#: Seconds the server waits for each step's replies; a healthy step takes ~20 s on an idle
#: 2-core machine and ~40 s under load (one fresh ClientApp process per message).
ROUND_TIMEOUT = 60


@pytest.fixture(scope="module")
def site_caches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_site_caches(tmp_path_factory.mktemp("fault-sites"), num_sites=3,
                            images_per_site=16, test_images=4, image_size=32, cache_size=28,
                            seed=5)


def _run_config(out_dir: Path, rounds: int, extra: str = "") -> str:
    return (f'num-server-rounds={rounds} image-size=28 model="resnet18" min-sites=2 '
            f'secure-aggregation=false class-names="normal,opacity" out-dir="{out_dir}" {extra}')


def _launch(fed: LoopbackFederation, run_config: str) -> subprocess.Popen:
    return fed.start("flwr-run", [str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream",
                                  "--run-config", run_config])


def _wait_for(what: str, check, fed: LoopbackFederation, timeout: float,
              run: subprocess.Popen | None = None):
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        if run is not None and run.poll() is not None:
            raise AssertionError(fed.diagnostics(f"flwr run ended while waiting for {what}"))
        time.sleep(0.1)
    raise AssertionError(fed.diagnostics(f"timed out after {timeout} s waiting for {what}"))


def _status(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _at(out_dir: Path, server_round: int, step: str) -> bool:
    status = _status(out_dir)
    return (status.get("round"), status.get("step")) == (server_round, step)


def _node_id(fed: LoopbackFederation, name: str) -> str | None:
    found = re.search(r"SuperNode ID: (\d+)", (fed.logs / f"{name}.log").read_text())
    return found.group(1) if found else None


def _group(leader: subprocess.Popen, command: bytes = b"") -> list[int]:
    """Live processes of ``leader``'s process group, but ``leader``, whose command line
    holds ``command`` (a SuperNode's group: its SuperExec and ClientApp processes)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        if (int(fields[2]) == leader.pid and pid != leader.pid and fields[0] != "Z"
                and command in cmdline):
            pids.append(pid)
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _egress(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _study_federation(tmp_path: Path, sites: int):
    """TLS, SuperNode authentication and a SuperLink whose state survives it, as deployed."""
    study = tmp_path / "study"
    certs.init_study(study, server_names=["localhost"], server_ips=["127.0.0.1"])
    keys = [certs.add_site(study, f"site-{i + 1}") for i in range(sites)]
    fed = LoopbackFederation(tmp_path, study=study)
    try:
        fed.start_superlink(database=tmp_path / "superlink.db")
        for key in keys:
            reg = fed.flwr("supernode", "register", str(key.public_key), "loopback",
                           timeout=120)
            assert reg.returncode == 0, fed.diagnostics("register", reg.stdout + reg.stderr)
    except BaseException:
        fed.stop()
        raise
    return fed, keys


def _restart(fed: LoopbackFederation, name: str, args: list[str],
             run: subprocess.Popen) -> tuple[str, int]:
    """Start a crashed site's SuperNode again and again, as its service manager would, until
    the SuperLink accepts it: its node counts as online (and a new SuperNode with its key is
    refused, exit code 1) until 2 heartbeat intervals (60 s) after the last heartbeat."""
    for attempt in range(1, 30):
        log = f"{name}-restart-{attempt}"
        proc = fed.start(log, args)
        _wait_for(f"{log} to connect or exit", lambda p=proc, n=log: p.poll() is not None
                  or _node_id(fed, n), fed, 120, run)
        if proc.poll() is None:
            return log, attempt
        time.sleep(3)
    raise AssertionError(fed.diagnostics(f"{name} was never accepted again"))


def _finish(fed: LoopbackFederation, run: subprocess.Popen, timeout: float) -> str:
    try:
        run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(fed.diagnostics("flwr run did not finish")) from None
    output = (fed.logs / "flwr-run.log").read_text()
    assert run.returncode == 0, fed.diagnostics("flwr run failed", output)
    assert "ServerApp raised an exception" not in output, fed.diagnostics("ServerApp", output)
    return output


@pytest.mark.timeout(1200)
def test_killed_site_and_straggler(tmp_path: Path, site_caches: list[Path]) -> None:
    out = tmp_path / "run-out"
    fed, keys = _study_federation(tmp_path, 3)
    site_args = {key.site_id: fed.supernode_args(
        cache, key.site_id, key=key.private_key,
        node_config=f'egress-log="{tmp_path}/egress-{key.site_id}.jsonl"')
        for cache, key in zip(site_caches, keys, strict=True)}
    stopped: list[int] = []
    try:
        sites = {name: fed.start(name, args) for name, args in site_args.items()}
        ids = {name: _wait_for(f"{name} to connect", lambda n=name: _node_id(fed, n), fed, 120)
               for name in sites}
        started = time.monotonic()
        # a separate evaluation step after round 1 (evaluate-with-training=false) holds
        # round 2 back until site-3, accepted again ~60 s after its kill, is online
        run = _launch(fed, _run_config(out, 2, f"round-timeout={ROUND_TIMEOUT} "
                                               "evaluate-with-training=false"))

        # round 1: site-3 dies while its ClientApp trains, and is started again
        _wait_for("round 1 training at site-3", lambda: _at(out, 1, "train") and _group(
            sites["site-3"], b"flwr-clientapp"), fed, 300, run)
        fed.kill(sites["site-3"])
        killed = time.monotonic()
        assert not _group(sites["site-3"], b"flwr-clientapp")
        restarted, attempts = _restart(fed, "site-3", site_args["site-3"], run)
        back = time.monotonic() - killed
        assert _node_id(fed, restarted) == ids["site-3"]  # its registered key, its node

        # round 2: site-2's SuperExec and ClientApp stall, its SuperNode stays online
        _wait_for("round 2 training", lambda: _at(out, 2, "train"), fed, 600, run)
        step_start = time.monotonic()
        for _ in range(10):  # the SuperExec first, then any ClientApp it was starting
            frozen = [p for p in _group(sites["site-2"]) if p not in stopped]
            _signal_all(frozen, signal.SIGSTOP)
            stopped += frozen
            time.sleep(0.1)
        assert stopped, fed.diagnostics("site-2 has no SuperExec to stop")
        _wait_for("the end of round 2 training", lambda: not _at(out, 2, "train"), fed,
                  ROUND_TIMEOUT + 120, run)
        straggler_step = time.monotonic() - step_start
        _signal_all(stopped, signal.SIGCONT)
        stopped = []
        output = _finish(fed, run, 600)
        total = time.monotonic() - started
    finally:
        _signal_all(stopped, signal.SIGCONT)
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs)
    print(f"\nkilled site: accepted again {back:.0f} s after the kill ({attempts} starts); "
          f"straggler step "
          f"{straggler_step:.0f} s (round-timeout {ROUND_TIMEOUT} s); run {total:.0f} s")

    faults = _status(out)["faults"]
    dead = [f["failure"] for f in faults if f["round"] == 1 and f"node {ids['site-3']}" in
            f["failure"]]
    assert dead, fed.diagnostics(f"site-3's failure is not in status.json: {faults}", output)
    print(f"recorded for the killed site: {dead[0]}")
    slow = [f["failure"] for f in faults if (f["round"], f["step"]) == (2, "train")]
    assert slow and all(f"node {ids['site-2']} " in f and re.search(r"no[ -]reply", f)
                        for f in slow), fed.diagnostics(f"straggler faults: {faults}", output)
    assert ROUND_TIMEOUT - 2 <= straggler_step <= ROUND_TIMEOUT + 30, straggler_step

    rows = metric_rows(out)
    assert {(1, "pooled"), (2, "pooled")} <= rows.keys(), rows.keys()
    assert {(1, "site:site-1"), (1, "site:site-2")} <= rows.keys(), rows.keys()
    # the restarted site-3 and the straggler site-2 both evaluate in round 2
    assert {(2, f"site:site-{i}") for i in (1, 2, 3)} <= rows.keys(), rows.keys()
    assert (out / "checkpoints" / "round-002.pt").is_file()
    rejoined = [(e["server-round"], e["message-type"])
                for e in _egress(tmp_path / "egress-site-3.jsonl")]
    assert (2, "train") in rejoined, fed.diagnostics(f"site-3 sent {rejoined}", output)
    assert (1, "train") not in rejoined  # killed before it could answer


@pytest.mark.timeout(1200)
def test_superlink_restart_and_resume(tmp_path: Path, site_caches: list[Path]) -> None:
    out = tmp_path / "run-out"
    database = tmp_path / "superlink.db"
    run_config = _run_config(out, 2)
    fed, keys = _study_federation(tmp_path, 2)
    link = fed.procs[0]
    try:
        # as in deploy/README.md: TLS, SuperNode authentication, the sites behind the gateway
        gateway = fed.start_gateway()
        sites = [fed.start(key.site_id, fed.supernode_args(
                     cache, key.site_id, key=key.private_key, port=gateway,
                     node_config=f'egress-log="{tmp_path}/egress-{key.site_id}.jsonl"'))
                 for cache, key in zip(site_caches, keys, strict=False)]
        for key in keys:
            _wait_for(f"{key.site_id} to connect", lambda k=key: _node_id(fed, k.site_id),
                      fed, 120)
        started = time.monotonic()
        run = _launch(fed, run_config)
        _wait_for("round 1's checkpoint", (out / "checkpoints" / "round-001.pt").is_file,
                  fed, 600, run)
        # the coordinator's machine dies: SuperLink, its SuperExec and the ServerApp
        fed.kill(link)
        down = time.monotonic()
        run.wait(timeout=120)  # flwr run loses its SuperLink and stops
        time.sleep(5)  # the SuperNodes retry meanwhile
        assert all(s.poll() is None for s in sites), fed.diagnostics("a SuperNode gave up")
        fed.start_superlink("superlink-restarted", database=database)
        result = fed.flwr("run", str(ROOT), "loopback", "--stream", "--run-config",
                          f"{run_config} resume=true", timeout=600)
        resumed = time.monotonic() - down
        output = result.stdout + result.stderr
        assert result.returncode == 0, fed.diagnostics("resumed flwr run failed", output)
        assert "ServerApp raised an exception" not in output, fed.diagnostics("ServerApp", output)
        # the same SuperNode processes served both runs, after retrying through the outage
        assert all(s.poll() is None for s in sites), fed.diagnostics("a SuperNode exited")
        for key in keys:
            assert "Connection successful after" in (fed.logs / f"{key.site_id}.log").read_text()
        total = time.monotonic() - started
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs)
    print(f"\nSuperLink restart: resumed run done {resumed:.0f} s after the kill; "
          f"test {total:.0f} s")

    assert "resume: continuing after round 1 of 2" in (out / "logs" / "server.jsonl").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "round-001.pt", "round-002.pt"]
    pooled = [r for r, scope in metric_rows(out) if scope == "pooled" and r >= 1]
    assert sorted(pooled) == [1, 2]
    assert _status(out)["phase"] == "finished"
    for key in keys:
        replies = _egress(tmp_path / f"egress-{key.site_id}.jsonl")
        trained = {(e["server-round"], e["run-id"]) for e in replies
                   if e["message-type"] == "train"}
        first = {run_id for r, run_id in trained if r == 1}
        # round 1 in the first run, round 2 in the resumed one, from the same SuperNode
        assert len(first) == 1 and any(r == 2 and run_id not in first
                                       for r, run_id in trained), (key.site_id, trained)
