"""App approval at the site: run only the app bundles (FABs) the site's IT has approved.

In Flower 1.42 whoever can start a run on the SuperLink sends every SuperNode an app
bundle (FAB) and the SuperNode runs it. Flower's own ``--trusted-entities`` check only
verifies signatures that Flower Hub issues for Hub apps (a run of a local bundle carries no
signature and is refused outright), so fedrad adds its own check, outside the bundle:

- ``fedrad site approve <fab-file-or-sha256>`` adds the bundle's SHA-256 to the site's
  allow-list (``approved-apps.json``), ``--revoke <sha256>`` removes one, ``--list`` shows
  them; the list is read afresh for every task, so a change needs no restart;
- ``fedrad site run`` starts ``flower-supernode --isolation process`` and a SuperExec whose
  ClientApp command is ``fedrad-clientapp`` (this module's :func:`clientapp_main`) instead
  of Flower's ``flwr-clientapp``; a random SuperExec secret stops any other local process
  from taking the SuperNode's tasks;
- ``fedrad-clientapp`` pulls the task, hashes the FAB it was given and, before the bundle is
  unpacked or imported, refuses any bundle whose SHA-256 is not on the allow-list: it logs
  ``REFUSED app bundle ...`` at the site and sends the server an error reply with a reason
  code and the hash (nothing else), which the egress log records.

The allow-list location reaches ``fedrad-clientapp`` through the ``FEDRAD_APPROVED_APPS``
environment variable that ``fedrad site run`` sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedrad.common.errors import FedradError

__all__ = [
    "APPROVED_APPS_ENV",
    "DEFAULT_APPROVED_FILE",
    "ApprovedApp",
    "AppNotApprovedError",
    "load_approved",
    "approve",
    "revoke",
    "check_bundle",
    "clientapp_main",
    "superexec_main",
    "run_site",
]

log = logging.getLogger(__name__)

APPROVED_APPS_ENV = "FEDRAD_APPROVED_APPS"
DEFAULT_APPROVED_FILE = "approved-apps.json"
CLIENTAPP_COMMAND = "fedrad-clientapp"
POLL_ENV = "FEDRAD_SUPERNODE_POLL"
#: glibc's malloc setting for the site's processes (unless set), as the coordinator image's
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = "1048576"
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AppNotApprovedError(FedradError):
    """The site has not approved the app bundle it was asked to run."""


@dataclass(frozen=True)
class ApprovedApp:
    """One allow-list entry."""

    sha256: str
    fab_id: str = ""
    version: str = ""
    approved_at: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"sha256": self.sha256, "fab-id": self.fab_id, "version": self.version,
                "approved-at": self.approved_at, "note": self.note}


def load_approved(path: Path) -> dict[str, ApprovedApp]:
    """Read the allow-list; a missing file approves nothing, a damaged one is an error."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["approved"]
        apps = {}
        for entry in entries:
            digest = str(entry["sha256"]).lower()
            if not _HEX64.match(digest):
                raise ValueError(f"{digest!r} is not a SHA-256 in hex")
            apps[digest] = ApprovedApp(digest, str(entry.get("fab-id", "")),
                                       str(entry.get("version", "")),
                                       str(entry.get("approved-at", "")),
                                       str(entry.get("note", "")))
        return apps
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FedradError(
            "approved-apps-damaged",
            "the site's list of approved app bundles cannot be read, so no bundle is run; "
            "re-create it with 'fedrad site approve <fab>'",
            local_detail=f"{path}: {type(err).__name__}: {err}",
        ) from err


def _fab_metadata(content: bytes) -> tuple[str, str]:
    from flwr.common.config import get_fab_config, get_metadata_from_config

    try:
        return get_metadata_from_config(get_fab_config(content))
    except Exception as err:  # noqa: BLE001 - any failure means "not a FAB"
        raise FedradError(
            "not-a-fab",
            f"this file is not a Flower app bundle ({type(err).__name__}: {err}); build one "
            "with 'flwr build --app <app folder>' and approve the .fab file it writes",
        ) from err


def approve(path: Path, fab_or_hash: str, *, note: str = "") -> ApprovedApp:
    """Add a bundle (a ``.fab`` file, or its SHA-256 in hex) to the allow-list at ``path``."""
    candidate = Path(fab_or_hash)
    if candidate.is_file():
        content = candidate.read_bytes()
        fab_id, version = _fab_metadata(content)
        digest = hashlib.sha256(content).hexdigest()
    elif _HEX64.match(fab_or_hash.lower()):
        digest, fab_id, version = fab_or_hash.lower(), "", ""
    else:
        raise FedradError(
            "bad-approval",
            f"{fab_or_hash!r} is neither a .fab file nor a SHA-256 (64 hex digits); pass the "
            "bundle the coordinator sent you, or the hash it printed",
        )
    entry = ApprovedApp(digest, fab_id, version,
                        datetime.now(timezone.utc).isoformat(timespec="seconds"), note)
    apps = load_approved(path)
    apps[digest] = entry
    _write_approved(path, apps)
    return entry


def revoke(path: Path, sha256: str) -> ApprovedApp:
    """Remove a bundle from the allow-list; the next task of a run using it is refused."""
    digest = sha256.lower()
    apps = load_approved(path)
    if digest not in apps:
        raise FedradError(
            "not-approved",
            f"{sha256} is not in the site's approved bundles; 'fedrad site approve --list' "
            "shows the approved ones",
        )
    entry = apps.pop(digest)
    _write_approved(path, apps)
    return entry


def _write_approved(path: Path, apps: dict[str, ApprovedApp]) -> None:
    body = json.dumps({"approved": [a.to_dict() for a in apps.values()]}, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".approved-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(body)
    os.replace(tmp, path)


def check_bundle(content: bytes, claimed_hash: str, approved: dict[str, ApprovedApp]) -> str:
    """Return the bundle's SHA-256 if the site approved it; raise otherwise.

    The hash is computed here from the bytes the site received, never taken from the
    SuperLink's claim; a claim that differs from the bytes is refused as well.
    """
    digest = hashlib.sha256(content).hexdigest()
    if claimed_hash and claimed_hash != digest:
        raise AppNotApprovedError(
            "app-hash-mismatch",
            f"the app bundle's content has SHA-256 {digest} but the coordinator named "
            f"{claimed_hash}; this site refuses it",
        )
    if digest not in approved:
        raise AppNotApprovedError(
            "app-not-approved",
            f"this site has not approved app bundle sha256 {digest} and refuses to run it; "
            "the site's IT must review the bundle and run 'fedrad site approve' to allow it",
        )
    return digest


def _approved_path_from_env() -> Path:
    value = os.environ.get(APPROVED_APPS_ENV)
    if not value:
        raise FedradError(
            "no-approved-apps",
            f"{CLIENTAPP_COMMAND} was started without {APPROVED_APPS_ENV}; start the site "
            "with 'fedrad site run', which sets it",
        )
    return Path(value)


def _refuse(client: Any, message: Any, context: Any, err: FedradError) -> None:
    """Send the server an error reply for a refused bundle and record it as egress."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supernode.runtime import run_clientapp as flower

    from fedrad.client.egress import log_reply

    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)),
                    reply_to=message)
    log_reply(context.node_config, reply, message)
    flower.push_message(client, reply, context)


def _checked_pull(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap Flower's ``pull_task_input`` so that the FAB is checked before it is used."""

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = original(client)
        try:
            approved = load_approved(_approved_path_from_env())
            digest = check_bundle(fab.content, fab.hash_str, approved)
        except FedradError as err:
            log.error("REFUSED app bundle %s (run %s, %s %s): %s", fab.hash_str, run.run_id,
                      run.fab_id, run.fab_version, err)
            if err.local_detail:
                log.error("local detail: %s", err.local_detail)
            _refuse(client, message, context, err)
            raise
        entry = approved[digest]
        log.info("approved app bundle %s (%s %s, approved %s) runs for run %s", digest,
                 entry.fab_id or run.fab_id, entry.version or run.fab_version,
                 entry.approved_at, run.run_id)
        return message, context, run, fab

    return pull_task_input


def clientapp_main() -> None:
    """``fedrad-clientapp``: Flower's ``flwr-clientapp`` with the site's approval check."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as flower

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("fedrad-clientapp %(levelname)s %(message)s"))
    fedrad_log = logging.getLogger("fedrad")
    fedrad_log.addHandler(handler)
    fedrad_log.setLevel(logging.INFO)
    flower.pull_task_input = _checked_pull(flower.pull_task_input)
    flwr_clientapp()


def superexec_main(command: Path | None = None) -> None:
    """``flower-superexec`` whose ClientApp command is ``fedrad-clientapp`` (or ``command``,
    the warm launcher of :mod:`fedrad.client.warm`, which runs the same code)."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    command = command or Path(sys.executable).parent / CLIENTAPP_COMMAND
    if not command.is_file():
        raise SystemExit(f"{command} is missing: reinstall fedrad (pip install fedrad) so that "
                         "its fedrad-clientapp command exists")
    # Flower's SubprocessExecutor launches TASK_TYPE_TO_COMMAND[task type] for each task;
    # only this SuperExec process is changed.
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(command)
    _approved_path_from_env()  # fail at start, not at the first run
    flower_superexec()


_RESERVED = ("--isolation", "--host", "--port", "--superexec-auth-secret-file")


def run_site(supernode_args: list[str], approved_path: Path, *, runtime_port: int = 9094,
             poll_seconds: float = 0.5, launcher: str | None = None,
             supernode_poll: float | None = None) -> int:
    """Run this site's SuperNode so that it runs only approved app bundles.

    Starts ``flower-supernode --isolation process`` with ``supernode_args`` (the SuperLink
    address, certificates, key, ``--node-config``) and fedrad's SuperExec, which launches
    ``fedrad-clientapp`` for every task. Both share a random SuperExec secret, and the
    Runtime API listens on 127.0.0.1 only. Returns when any process ends (the others are
    stopped), with the first exit code.

    ``launcher`` (default: ``FEDRAD_SITE_LAUNCHER``, else ``"warm"``): ``"warm"`` first
    starts the site's zygote (:mod:`fedrad.client.warm`), which imports the ClientApp's
    modules once and forks a process per task running the same approval-checked
    ``fedrad-clientapp`` code; ``"cold"`` starts a fresh ``fedrad-clientapp`` per task.
    ``supernode_poll`` (default: ``FEDRAD_SUPERNODE_POLL``, else Flower's 3 s): seconds an
    idle SuperNode waits before asking the SuperLink for work again
    (:func:`fedrad.client.warm.patch_supernode_poll`); the SuperExec then asks the
    SuperNode for a task as often (at most every 1 s, Flower's default), through Flower's
    own ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` unless that is set.
    """
    import signal
    import subprocess
    import time

    reserved = [a for a in supernode_args if a.split("=", 1)[0] in _RESERVED]
    if reserved:
        raise FedradError(
            "bad-site-run",
            f"fedrad site run sets {', '.join(_RESERVED)} itself; remove {', '.join(reserved)} "
            "from the flower-supernode arguments (use --runtime-port to move the local port)",
        )
    if "--allow-runtime-dependency-installation" in supernode_args:
        raise FedradError(
            "bad-site-run",
            "fedrad site run does not allow runtime dependency installation: it would install "
            "whatever packages a bundle names, from a package index, outside the approved "
            "bundle's hash; install fedrad's dependencies at the site instead",
        )
    approved_path = approved_path.expanduser().resolve()
    approved = load_approved(approved_path)
    if approved:
        log.info("%d approved app bundle(s) in %s", len(approved), approved_path)
    else:
        log.warning("no app bundle is approved in %s: every run will be refused until the "
                    "site approves one with 'fedrad site approve <fab>'", approved_path)
    from fedrad.client import warm

    launcher = (launcher or os.environ.get(warm.LAUNCHER_ENV) or "warm").lower()
    if launcher not in ("warm", "cold"):
        raise FedradError("bad-site-run", f"{warm.LAUNCHER_ENV}={launcher!r}: use 'warm' (one "
                          "pre-imported process forks each task) or 'cold' (a fresh process "
                          "per task)")
    if supernode_poll is None and os.environ.get(POLL_ENV):
        try:
            supernode_poll = float(os.environ[POLL_ENV])
        except ValueError as err:
            raise FedradError("bad-site-run", f"{POLL_ENV} must be a number of seconds, not "
                              f"{os.environ[POLL_ENV]!r}") from err
    if supernode_poll is not None and not 0.05 <= supernode_poll <= 3:
        raise FedradError("bad-site-run", f"the SuperNode poll must be 0.05-3 s, not "
                          f"{supernode_poll}")
    bindir = Path(sys.executable).parent
    env = {**os.environ, APPROVED_APPS_ENV: str(approved_path)}
    # buffers of 1 MB and more (a model's chunks in transit) go back to the system when
    # freed, instead of staying in malloc's heap as the high-water mark of every message
    env.setdefault(MMAP_THRESHOLD_ENV, MMAP_THRESHOLD)
    if supernode_poll is not None:
        # the SuperExec asks its SuperNode (on 127.0.0.1) for a task every 1 s by default:
        # Flower's own setting, at most the SuperNode's poll
        env.setdefault(SUPEREXEC_POLL_ENV, f"{min(supernode_poll, 1.0):g}")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="fedrad-site-") as tmp:
        secret = Path(tmp) / "superexec-secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(os.urandom(32).hex())
        runtime = ["--superexec-auth-secret-file", str(secret)]
        node = [str(bindir / "flower-supernode")]
        if supernode_poll is not None:
            node = [sys.executable, "-m", "fedrad.client.warm", "supernode", str(supernode_poll)]
        node += [*supernode_args, "--isolation", "process",
                 "--host", "127.0.0.1", "--port", str(runtime_port), *runtime]
        executor = [sys.executable, "-m", "fedrad.client.approval", "superexec",
                    "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",
                    "--parent-pid", str(os.getpid()), *runtime]
        zygote = None
        if launcher == "warm":
            socket_path = Path(tmp) / "zygote.sock"
            command = warm.write_launcher(Path(tmp) / "fedrad-clientapp-warm", socket_path)
            executor[4:4] = ["--clientapp-command", str(command)]
            zygote = [sys.executable, "-m", "fedrad.client.warm", "zygote", str(socket_path)]

        def stop(*_: object) -> None:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()

        previous = signal.signal(signal.SIGTERM, lambda *a: stop())
        try:
            if zygote is not None:  # before the SuperNode: no gRPC channel exists yet
                procs.append(subprocess.Popen(zygote, env=env))
                try:
                    warm.wait_ready(socket_path, procs[0])
                except (RuntimeError, TimeoutError) as err:
                    raise FedradError("warm-launcher-failed", f"{err}; see the site's log "
                                      f"above, or set {warm.LAUNCHER_ENV}=cold") from err
                log.info("warm launcher: each task is forked from pre-imported process %d",
                         procs[0].pid)
            procs.append(subprocess.Popen(node, env=env))
            procs.append(subprocess.Popen(executor, env=env))
            while all(p.poll() is None for p in procs):
                time.sleep(poll_seconds)
            code = next(p.returncode for p in procs if p.returncode is not None)
        except KeyboardInterrupt:
            code = 130
        finally:
            stop()
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":  # python -m fedrad.client.approval superexec ARGS...
    if len(sys.argv) > 1 and sys.argv[1] == "superexec":
        rest = sys.argv[2:]
        clientapp = None
        if rest[:1] == ["--clientapp-command"]:
            clientapp, rest = Path(rest[1]), rest[2:]
        sys.argv = [sys.argv[0], *rest]
        superexec_main(clientapp)
    else:
        raise SystemExit("usage: python -m fedrad.client.approval superexec ARGS")
