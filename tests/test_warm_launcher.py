"""The warm launcher: a zygote forks one process per task, the launcher relays everything.

These tests run the zygote with a tiny test entry instead of ``fedrad-clientapp`` (the
approval-checked ClientApp itself runs through it in test_app_approval's integration test):
arguments, folder, environment, output and exit codes reach the task and come back; signals
sent to the launcher reach the task; a SIGKILLed launcher takes its task with it; numpy's
global generator differs between tasks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedrad.client import warm

ENTRY = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np

    def main():
        mode = sys.argv[1]
        if mode == "echo":
            print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                              "x": os.environ.get("FEDRAD_TEST_X"), "pid": os.getpid(),
                              "ppid": os.getppid(), "rand": float(np.random.rand())}))
            sys.stderr.write("to stderr\\n")
            sys.exit(int(sys.argv[2]))
        if mode == "sleep":
            with open(sys.argv[2], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(120)
        if mode == "raise":
            raise ValueError("boom")
''')


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen]]:
    (tmp_path / "warm_test_entry.py").write_text(ENTRY)
    sock = tmp_path / "z.sock"
    code = ("import sys; from pathlib import Path; from fedrad.client.warm import serve_zygote;"
            f"sys.exit(serve_zygote(Path({str(sock)!r}), ('numpy',),"
            " entry='warm_test_entry:main'))")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        warm.wait_ready(sock, proc, timeout=60)
        launcher = warm.write_launcher(tmp_path / "launch", sock, connect_timeout=5)
        yield launcher, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_arguments_folder_environment_output_and_exit_code(zygote, tmp_path: Path) -> None:
    launcher, proc = zygote
    work = tmp_path / "work"
    work.mkdir()
    runs = [subprocess.run([str(launcher), "echo", str(code)], cwd=work, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "FEDRAD_TEST_X": "y"})
            for code in (0, 7)]
    for run, code in zip(runs, (0, 7), strict=True):
        assert run.returncode == code, run.stderr
        out = json.loads(run.stdout)
        assert out["argv"] == ["echo", str(code)]
        assert out["cwd"] == str(work) and out["x"] == "y"
        assert out["ppid"] == proc.pid  # forked from the zygote
        assert run.stderr == "to stderr\n"
    first, second = (json.loads(r.stdout) for r in runs)
    assert first["pid"] != second["pid"]
    assert first["rand"] != second["rand"]  # numpy's global generator reseeded per task


def test_an_exception_is_exit_code_1_with_its_traceback(zygote) -> None:
    launcher, _ = zygote
    run = subprocess.run([str(launcher), "raise"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "ValueError: boom" in run.stderr


def test_signals_reach_the_task(zygote, tmp_path: Path) -> None:
    launcher, _ = zygote
    pid_file = tmp_path / "task.pid"
    run = subprocess.Popen([str(launcher), "sleep", str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        task = int(pid_file.read_text())
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == -signal.SIGTERM  # dies of the same signal
        assert not _alive(task)
    finally:
        with contextlib.suppress(ProcessLookupError):
            run.kill()
        run.wait()


def _start_sleeper(launcher: Path, pid_file: Path, **popen) -> tuple[subprocess.Popen, int]:
    """Launch the test task that writes its pid and sleeps; return it and the task's pid."""
    run = subprocess.Popen([str(launcher), "sleep", str(pid_file)], **popen)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    task = int(pid_file.read_text())
    return run, task


def test_a_killed_launcher_takes_its_task_with_it(zygote, tmp_path: Path) -> None:
    launcher, proc = zygote
    run, task = _start_sleeper(launcher, tmp_path / "task.pid")
    run.kill()
    run.wait()
    deadline = time.monotonic() + 30
    while _alive(task):
        assert time.monotonic() < deadline, "the task outlived its launcher"
        time.sleep(0.1)
    assert proc.poll() is None  # the zygote serves on


def test_the_zygote_stops_its_tasks_when_stopped(zygote, tmp_path: Path) -> None:
    launcher, proc = zygote
    run, task = _start_sleeper(launcher, tmp_path / "task.pid", stderr=subprocess.PIPE)
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert not _alive(task)
    assert run.wait(timeout=30) != 0


def test_no_zygote_is_a_clear_error(tmp_path: Path) -> None:
    launcher = warm.write_launcher(tmp_path / "launch", tmp_path / "none.sock",
                                   connect_timeout=0.2)
    run = subprocess.run([str(launcher)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and "fedrad site run" in run.stderr


def test_the_supernode_idle_poll_is_patched_only_in_that_module() -> None:
    import flwr.supernode.start_client_internal as sci

    real = sci.time
    try:
        assert warm.patch_supernode_poll(0.01)
        started = time.perf_counter()
        sci.time.sleep(3)
        assert time.perf_counter() - started < 1
        assert sci.time.time is real.time and sci.time.monotonic is real.monotonic
        assert time.sleep is real.sleep  # every other module keeps the real sleep
        assert not warm.patch_supernode_poll(0.01)  # patched already: the code is unknown
    finally:
        sci.time = real


def test_site_run_refuses_an_unknown_launcher_or_poll(tmp_path: Path, monkeypatch) -> None:
    from fedrad.client.approval import run_site
    from fedrad.common.errors import FedradError

    allow = tmp_path / "approved-apps.json"
    with pytest.raises(FedradError, match="use 'warm'"):
        run_site(["--superlink", "x:1"], allow, launcher="lukewarm")
    with pytest.raises(FedradError, match="0.05-3 s"):
        run_site(["--superlink", "x:1"], allow, supernode_poll=10)
    monkeypatch.setenv("FEDRAD_SUPERNODE_POLL", "soon")
    with pytest.raises(FedradError, match="number of seconds"):
        run_site(["--superlink", "x:1"], allow)


def test_the_fedrad_command_does_not_import_torch() -> None:
    """`fedrad site run` stays resident beside its SuperNode: torch (~0.5 GB) only loads
    in the commands that train, predict or list models."""
    code = ("import sys, fedrad.cli; heavy = sorted(m for m in ('torch', 'torchvision', "
            "'monai') if m in sys.modules); print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == ""


def test_site_run_starts_its_processes_with_the_malloc_threshold(tmp_path: Path,
                                                                 monkeypatch) -> None:
    import fedrad.client.approval as approval

    started: list[dict] = []

    class Stop(Exception):
        pass

    def popen(args, env=None, **kwargs):  # noqa: ANN001
        started.append(dict(env or {}))
        raise Stop

    monkeypatch.delenv(approval.MMAP_THRESHOLD_ENV, raising=False)
    monkeypatch.setattr("subprocess.Popen", popen)  # run_site imports it when it runs
    with pytest.raises(Stop):
        approval.run_site(["--superlink", "x:1"], tmp_path / "approved-apps.json",
                          launcher="cold")
    assert started and started[0][approval.MMAP_THRESHOLD_ENV] == approval.MMAP_THRESHOLD
    monkeypatch.setenv(approval.MMAP_THRESHOLD_ENV, "65536")  # the site's own choice wins
    with pytest.raises(Stop):
        approval.run_site(["--superlink", "x:1"], tmp_path / "approved-apps.json",
                          launcher="cold")
    assert started[-1][approval.MMAP_THRESHOLD_ENV] == "65536"
