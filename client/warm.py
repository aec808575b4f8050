"""A warm ClientApp launcher for ``fedrad site run``: one pre-imported zygote forks each task.

Flower's SuperExec starts a fresh ClientApp process for every message a site receives, and
each one spends seconds importing torch, torchvision, flwr and fedrad before it pulls its
task (~3 s on an idle 2-core machine, far more when 20 sites start at once).  With the warm
launcher, ``fedrad site run`` starts one **zygote** per site, before its SuperNode and
SuperExec (and so before any gRPC channel exists): a process that imports those modules once
(:data:`PRELOAD`), runs nothing else, and listens on a Unix socket in the site's private
temporary folder (mode 0700, socket 0600).  The SuperExec's ClientApp command becomes a
tiny launcher script (standard library only, ``python -I -S``) that:

1. connects to the zygote and sends its arguments (the SuperNode's Runtime API address,
   the task's token, ``--parent-pid``), its working folder and environment, and its
   standard input, output and error (file descriptors, ``SCM_RIGHTS``);
2. relays SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the task's process;
3. exits with the task's exit code (or dies of the same signal).

For each launcher the zygote forks a child which takes over the launcher's descriptors,
folder and environment, reseeds numpy's global generator (Python's ``random`` reseeds
itself on fork; torch's default generator has a fixed seed in every fresh process anyway),
and runs :func:`fedrad.client.approval.clientapp_main` - the same code ``fedrad-clientapp``
runs, so every task's app bundle is hashed and checked against the site's approved list,
read afresh, before the bundle is unpacked or its code loaded.  If the launcher dies
(SIGKILL included) its task is killed; if the zygote's parent (``fedrad site run``) goes,
the zygote stops its tasks and exits.

Pre-importing is safe for the approval check because the only modules loaded before a
task's check are the site's own installed packages, the same ones a cold
``fedrad-clientapp`` has loaded before its check (it imports fedrad and flwr first; flwr
resolves ``fedrad.client.client_app`` under the already imported installed ``fedrad``
package in both paths).  A bundle never brings code that runs before its hash is checked.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["PRELOAD", "LAUNCHER_ENV", "serve_zygote", "write_launcher", "wait_ready",
           "patch_supernode_poll", "supernode_main"]

log = logging.getLogger(__name__)

#: ``FEDRAD_SITE_LAUNCHER=cold`` makes ``fedrad site run`` start a fresh
#: ``fedrad-clientapp`` process per task instead (Flower's default behaviour).
LAUNCHER_ENV = "FEDRAD_SITE_LAUNCHER"

#: What the zygote imports once, before any task: everything a cold ClientApp imports
#: before it trains (the heavy third-party packages and fedrad's ClientApp module).
PRELOAD = (
    "numpy",
    "torch",
    "torchvision",
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
    "fedrad.client.approval",
    "fedrad.client.egress",
    "fedrad.client.client_app",
)

#: What every forked task runs: ``fedrad-clientapp``'s main, approval check included.
CLIENTAPP_ENTRY = "fedrad.client.approval:clientapp_main"

_RELAYED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
_READY = "ready"

# The launcher: standard library only, run with ``python -I -S`` (no site packages, ~20 ms).
_LAUNCHER = r'''
import array, os, signal, socket, sys, time
SOCKET = {socket_path!r}
RELAYED = {relayed!r}

def main():
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + {connect_timeout!r}
    while True:
        try:
            conn.connect(SOCKET)
            break
        except OSError as err:
            if time.monotonic() > deadline:
                sys.stderr.write("fedrad warm launcher: the site's zygote at %s does not "
                                 "answer (%s); is 'fedrad site run' running?\n" % (SOCKET, err))
                return 1
            time.sleep(0.05)
    import json
    request = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                          "env": dict(os.environ)}}).encode()
    fds = array.array("i", [0, 1, 2])
    conn.sendmsg([len(request).to_bytes(4, "big") + request],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])

    def relay(signum, _frame):
        try:
            conn.sendall(b"S" + bytes([signum]))
        except OSError:
            return  # the zygote already closed the task: nothing left to signal
    for name in RELAYED:
        signal.signal(getattr(signal, name), relay)
    data = b""
    while not data.endswith(b"\n") or not data.split(b"\n")[-2].startswith(b"X"):
        chunk = conn.recv(64)
        if not chunk:
            sys.stderr.write("fedrad warm launcher: the zygote went away before the task "
                             "ended\n")
            return 1
        data += chunk
    code = int(data.split(b"\n")[-2][1:])
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code

sys.exit(main())
'''


def write_launcher(path: Path, socket_path: Path, *, connect_timeout: float = 120.0) -> Path:
    """Write the launcher script for ``socket_path`` to ``path`` (mode 0700)."""
    body = _LAUNCHER.format(socket_path=str(socket_path), relayed=_RELAYED,
                            connect_timeout=float(connect_timeout))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"#!{sys.executable} -IS\n{body}")
    return path


def wait_ready(socket_path: Path, proc: object, *, timeout: float = 300.0) -> None:
    """Wait until the zygote listens (its ready file appears); fail if it exits first."""
    ready = socket_path.with_name(socket_path.name + "." + _READY)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if getattr(proc, "poll", lambda: None)() is not None:
            raise RuntimeError("the site's warm launcher (zygote) exited while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the site's zygote did not start within {timeout:.0f} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the zygote


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10.0)
    fds = array.array("i")
    data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the launcher closed the connection mid-request")
        data += chunk
    size = int.from_bytes(data[:4], "big")
    conn.settimeout(None)
    return json.loads(data[4:4 + size]), list(fds)


def _run_child(request: dict, fds: list[int], entry: str) -> None:
    """In the forked child: become the launcher's ClientApp process and never return."""
    code = 1
    try:
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()  # a fresh process seeds it from the OS
        sys.argv = ["fedrad-clientapp", *request["argv"]]
        module, _, attr = entry.partition(":")
        main = getattr(importlib.import_module(module), attr)
        try:
            main()
            code = 0
        except SystemExit as done:
            if done.code is None or isinstance(done.code, int):
                code = done.code or 0
            else:
                sys.stderr.write(f"{done.code}\n")
                code = 1
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - the child must always end here
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve_zygote(socket_path: Path, preload: tuple[str, ...] = PRELOAD, *,
                 entry: str = CLIENTAPP_ENTRY) -> int:
    """The zygote: import ``preload``, then fork one child per launcher request.

    Each child runs ``entry`` (``module:function``; ``fedrad-clientapp``'s approval-checked
    main unless a test names another) with the launcher's arguments, folder, environment
    and standard streams, and its exit status goes back to the launcher.
    """
    started = time.perf_counter()
    for name in preload:
        importlib.import_module(name)
    if threading.active_count() != 1:  # forking a process with threads is unsafe
        raise RuntimeError(f"importing {preload} started threads "
                           f"({[t.name for t in threading.enumerate()]}); cannot fork safely")
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(128)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    stopping = []
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    by_conn: dict[socket.socket, int] = {}
    by_pid: dict[int, socket.socket] = {}
    ready = socket_path.with_name(socket_path.name + "." + _READY)
    ready.write_text(f"{os.getpid()}\n")
    sys.stderr.write(f"fedrad zygote {os.getpid()}: {len(preload)} modules imported in "
                     f"{time.perf_counter() - started:.1f} s; forking one process per task\n")
    sys.stderr.flush()

    def reap() -> None:
        while by_pid:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = by_pid.pop(pid, None)
            if conn is not None:
                by_conn.pop(conn, None)
                with contextlib.suppress(OSError):
                    conn.sendall(f"X{_exit_code(status)}\n".encode())
                conn.close()

    try:
        while not stopping and os.getppid() == parent:
            readable, _, _ = select.select([listener, wake_r, *by_conn], [], [], 1.0)
            if wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            reap()
            for conn in [c for c in readable if c in by_conn]:
                pid = by_conn[conn]
                try:
                    data = conn.recv(64)
                except OSError:
                    data = b""
                if not data:  # the launcher died: its task must not outlive it
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    by_conn.pop(conn, None)
                    by_pid[pid] = conn  # reaped (and closed) by reap()
                    continue
                for i in range(0, len(data) - 1, 2):
                    if data[i:i + 1] == b"S":
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, data[i + 1])
            if listener in readable:
                conn, _ = listener.accept()
                try:
                    request, fds = _read_request(conn)
                except (OSError, ValueError, ConnectionError) as err:
                    sys.stderr.write(f"fedrad zygote: bad launcher request: {err}\n")
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    for sig in (signal.SIGCHLD, signal.SIGTERM):
                        signal.signal(sig, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    listener.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    for other in list(by_conn) + [conn]:
                        other.close()
                    _run_child(request, fds, entry)
                for fd in fds:
                    os.close(fd)
                by_conn[conn] = pid
                by_pid[pid] = conn
    finally:
        for pid in list(by_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while by_pid and time.monotonic() < deadline:
            reap()
            time.sleep(0.1)
        for pid in list(by_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while by_pid:
                pid, _ = os.waitpid(-1, 0)
                by_pid.pop(pid, None)
        listener.close()
        for path in (socket_path, ready):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return 0


# --------------------------------------------------------------------------- the poll


def patch_supernode_poll(seconds: float) -> bool:
    """Make an idle SuperNode ask the SuperLink for work every ``seconds`` instead of 3 s.

    Flower 1.42's ``start_client_internal`` sleeps ``time.sleep(3)`` when a pull brought
    no message.  This replaces that module's ``time`` with a proxy whose ``sleep(3)``
    sleeps ``seconds`` (every other sleep and function is the real one), in this process
    only.  Returns False, changing nothing, when the installed Flower does not have that
    exact code.
    """
    import inspect

    import flwr.supernode.start_client_internal as sci

    real = getattr(sci, "time", None)
    source = inspect.getsource(sci.start_client_internal)
    if real is not time or source.count("time.sleep(3)") != 1:
        return False

    class _Clock:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        @staticmethod
        def sleep(value: float) -> None:
            real.sleep(seconds if value == 3 else value)

    sci.time = _Clock()
    return True


def supernode_main(argv: list[str], poll: float) -> None:
    """``flower-supernode ARGV`` with the idle poll at ``poll`` seconds."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if not patch_supernode_poll(poll):
        sys.stderr.write("fedrad: this Flower version's SuperNode poll could not be changed; "
                         "it polls at Flower's own interval\n")
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":  # python -m fedrad.client.warm zygote SOCKET | supernode POLL ARGS
    if len(sys.argv) == 3 and sys.argv[1] == "zygote":
        sys.exit(serve_zygote(Path(sys.argv[2])))
    if len(sys.argv) >= 3 and sys.argv[1] == "supernode":
        supernode_main(sys.argv[3:], float(sys.argv[2]))
    else:
        raise SystemExit("usage: python -m fedrad.client.warm zygote SOCKET | "
                         "supernode POLL-SECONDS FLOWER-SUPERNODE-ARGS...")
