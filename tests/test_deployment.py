"""Deployment mode on loopback: a real SuperLink, three SuperNodes, ``flwr run .``.

Each SuperNode points at its own site cache with ``--node-config``; the run must come
back with pooled metrics for both rounds, and every process started here is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrad.client.prepare import prepare_site
from fedrad.common.config import load_settings
from fedrad.simulations.synthetic import generate_synthetic_federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def site_caches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("deploy-sites")
    federation = generate_synthetic_federation(
        root / "dicom", num_sites=3, images_per_site=30, test_images=30, image_size=64, seed=3
    )
    settings = load_settings({"image-size": 32})
    return [
        prepare_site(site.dicom_dir, site.labels_csv, root / "cache" / site.site_id, settings,
                     site_id=site.site_id).cache_dir
        for site in federation.sites
    ]


def test_flwr_run_against_superlink_and_three_supernodes(
    tmp_path: Path, site_caches: list[Path]
) -> None:
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }
    (tmp_path / "flwr-home").mkdir()
    link_port = _free_port()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        "[superlink]\ndefault = \"loopback\"\n\n"
        f"[superlink.loopback]\naddress = \"127.0.0.1:{link_port}\"\ninsecure = true\n"
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp_path, start_new_session=True)
        procs.append(proc)
        return proc

    out_dir = tmp_path / "run-out"
    try:
        link = start("superlink", [
            str(BIN / "flower-superlink"), "--insecure", "--port", str(link_port),
            "--disable-runtime-dependency-installation",
        ])
        _wait_for_port(link_port, link)
        for i, cache in enumerate(site_caches):
            start(f"supernode-{i}", [
                str(BIN / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{link_port}",
                "--port", str(_free_port()),
                "--node-config", f'data-dir="{cache}" site-id="site-{i + 1}"',
            ])
        run_config = (
            f'num-server-rounds=2 image-size=32 model="resnet18" local-epochs=1 '
            f'min-sites=3 out-dir="{out_dir}" class-names="normal,opacity"'
        )
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "loopback", "--stream",
             "--run-config", run_config],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480,
        )
        output = result.stdout + result.stderr

        def diagnostics() -> str:
            parts = [f"flwr run output:\n{output[-4000:]}"]
            for log_file in sorted(logs.iterdir()):
                parts.append(f"{log_file.name}:\n{log_file.read_text()[-1500:]}")
            return "\n".join(parts)

        assert result.returncode == 0, diagnostics()
        assert "ServerApp raised an exception" not in output, diagnostics()
        metrics_file = out_dir / "metrics.json"
        assert metrics_file.is_file(), diagnostics()
        history = json.loads(metrics_file.read_text())
        text = json.dumps(history)
        for site in ("site:site-1", "site:site-2", "site:site-3"):
            assert site in text, diagnostics()
        assert (out_dir / "checkpoints" / "round-002.pt").is_file()
        assert (out_dir / "metrics.csv").is_file()
        csv_rows = (out_dir / "metrics.csv").read_text().splitlines()
        pooled = [r for r in csv_rows if ",pooled," in r]
        assert len(pooled) == 2, csv_rows
    finally:
        _stop(procs)
    assert all(p.poll() is not None for p in procs)
