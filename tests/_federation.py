"""Real Flower processes on loopback for the integration tests (deployment, faults).

:class:`LoopbackFederation` starts a SuperLink and SuperNodes as plain processes, each in
its own session (process group, so its SuperExec and ClientApp / ServerApp children go
with it), logs each to a file and stops every one of them.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedrad.client.prepare import prepare_site
from fedrad.common.config import load_settings
from fedrad.server import certs
from fedrad.simulations.synthetic import generate_synthetic_federation

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_site_caches(root: Path, *, num_sites: int, images_per_site: int, test_images: int,
                     image_size: int, cache_size: int, seed: int) -> list[Path]:
    """Synthetic DICOM sites under ``root``, each prepared into a cache of ``cache_size`` px."""
    federation = generate_synthetic_federation(
        root / "dicom", num_sites=num_sites, images_per_site=images_per_site,
        test_images=test_images, image_size=image_size, seed=seed)
    settings = load_settings({"image-size": cache_size})
    return [
        prepare_site(site.dicom_dir, site.labels_csv, root / "cache" / site.site_id, settings,
                     site_id=site.site_id).cache_dir
        for site in federation.sites
    ]


def metric_rows(out_dir: Path) -> dict[tuple[int, str], dict[str, str]]:
    """``metrics.csv`` keyed by (round, scope)."""
    with open(out_dir / "metrics.csv", newline="") as fh:
        return {(int(r["round"]), r["scope"]): r for r in csv.DictReader(fh)}


def children_map() -> dict[int, list[int]]:
    """Every live process's children, from one pass over ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """``root`` and all its descendants, whatever their session or process group.

    ``children`` (from :func:`children_map`) lets one pass over ``/proc`` serve many trees.
    """
    children = children_map() if children is None else children
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


class LoopbackFederation:
    """Starts and stops the Flower processes of one test, logging each to a file."""

    def __init__(self, tmp_path: Path, study: Path | None = None) -> None:
        self.tmp = tmp_path
        self.study = certs.StudyPaths(study) if study else None
        self.port = free_port()
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        home = tmp_path / "flwr-home"
        home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1",
                    # as the coordinator and site images set it (deploy/*.Dockerfile)
                    "MALLOC_MMAP_THRESHOLD_": "1048576",
                    # the SuperLink and SuperNodes start flower-superexec / flwr-clientapp
                    # by name: this interpreter's scripts come first
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        security = (f'root-certificates = "{self.study.ca_cert}"\n' if self.study
                    else "insecure = true\n")
        (home / "config.toml").write_text(
            "[superlink]\ndefault = \"loopback\"\n\n"
            f"[superlink.loopback]\naddress = \"127.0.0.1:{self.port}\"\n{security}"
        )

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start ``args`` in a new session (its own process group), output to logs/NAME.log."""
        out = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.tmp, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_superlink(self, name: str = "superlink", *,
                        database: Path | None = None) -> subprocess.Popen:
        """Start the SuperLink (state in ``database`` if given) and wait for its port."""
        args = [str(BIN / "flower-superlink"), "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if database is not None:
            args += ["--database", str(database)]
        if self.study:
            args += ["--ssl-ca-certfile", str(self.study.ca_cert),
                     "--ssl-certfile", str(self.study.server_cert),
                     "--ssl-keyfile", str(self.study.server_key), "--enable-supernode-auth"]
        else:
            args.append("--insecure")
        link = self.start(name, args)
        self.wait_port(self.port, link, "the SuperLink")
        return link

    def start_gateway(self) -> int:
        """Start fedrad's Fleet-only gateway in front of the (TLS) SuperLink; its port."""
        assert self.study is not None, "the gateway serves TLS: give the study"
        port = free_port()
        gateway = self.start("gateway", [
            sys.executable, "-m", "fedrad.server.gateway", "--listen", f"127.0.0.1:{port}",
            "--superlink", f"https://127.0.0.1:{self.port}",
            "--ca-cert", str(self.study.ca_cert), "--certfile", str(self.study.server_cert),
            "--keyfile", str(self.study.server_key)])
        self.wait_port(port, gateway, "the gateway")
        return port

    def wait_port(self, port: int, proc: subprocess.Popen, what: str) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.diagnostics(f"{what} exited early")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(self.diagnostics(f"{what} did not open port {port}"))

    def supernode_args(self, cache: Path, site_id: str, *, ca: Path | None = None,
                       key: Path | None = None, node_config: str = "",
                       port: int | None = None) -> list[str]:
        """``flower-supernode`` for one site, to the SuperLink (or ``port``, the gateway)."""
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port or self.port}",
                "--port", str(free_port()),
                "--node-config", f'data-dir="{cache}" site-id="{site_id}" {node_config}'.strip()]
        if self.study:
            args += ["--root-certificates", str(ca or self.study.ca_cert)]
            if key is not None:
                args += ["--auth-supernode-private-key", str(key)]
        else:
            args.append("--insecure")
        return args

    def flwr(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.tmp,
                              capture_output=True, text=True, timeout=timeout)

    def diagnostics(self, headline: str, output: str = "") -> str:
        parts = [headline, f"flwr output:\n{output[-4000:]}"]
        for log_file in sorted(self.logs.iterdir()):
            parts.append(f"{log_file.name}:\n{log_file.read_text()[-1500:]}")
        return "\n".join(parts)

    @staticmethod
    def signal_group(proc: subprocess.Popen, sig: int) -> None:
        """Send ``sig`` to the process group of ``proc`` (the process and its children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL ``proc`` and every process of its group, and reap it."""
        self.signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        # processes that left the groups started here (the SuperLink starts its SuperExec,
        # and that the ServerApp, in a session of their own): found now, killed at the end
        children = children_map()
        strays = {pid for proc in self.procs if proc.poll() is None
                  for pid in process_tree(proc.pid, children)[1:]}
        # a group whose leader already exited may still hold children: signal every group;
        # SIGCONT lets a stopped process act on the SIGTERM
        for proc in self.procs:
            self.signal_group(proc, signal.SIGTERM)
            self.signal_group(proc, signal.SIGCONT)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            self.signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=10)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
