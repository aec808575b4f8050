"""The sites reach only the Fleet API; control requests from the network are refused.

A real SuperLink (TLS, site authentication) listens on loopback; fedrad's gateway serves
the sites' address. A site trains through the gateway, while ``flwr ls`` and
``flwr supernode register`` against the gateway fail, raw Control and Runtime API requests
get 403 with an explanation, and the same commands work on the coordinator's loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_deployment import LoopbackFederation, _free_port

from fedrad.client.prepare import prepare_site
from fedrad.common.config import load_settings
from fedrad.server import certs
from fedrad.server.gateway import REFUSAL
from fedrad.simulations.synthetic import generate_synthetic_federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent


def _wait_port(port: int, proc: subprocess.Popen, fed: LoopbackFederation) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, fed.diagnostics("the gateway exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(fed.diagnostics("the gateway did not open its port"))


def test_sites_reach_fleet_only_and_control_stays_on_loopback(tmp_path: Path) -> None:
    federation = generate_synthetic_federation(
        tmp_path / "dicom", num_sites=1, images_per_site=30, test_images=10, image_size=64,
        seed=7)
    site = federation.sites[0]
    cache = prepare_site(site.dicom_dir, site.labels_csv, tmp_path / "cache",
                         load_settings({"image-size": 32}), site_id="site-1").cache_dir
    study_dir = tmp_path / "study"
    certs.init_study(study_dir, server_names=["localhost"], server_ips=["127.0.0.1"])
    key = certs.add_site(study_dir, "site-1")
    stranger = certs.add_site(study_dir, "stranger")
    study = certs.StudyPaths(study_dir)

    fed = LoopbackFederation(tmp_path, study=study_dir)
    fed.env["PATH"] = f"{BIN}{os.pathsep}{fed.env.get('PATH', '')}"
    gateway_port = _free_port()
    with open(Path(fed.env["FLWR_HOME"]) / "config.toml", "a") as config:
        config.write(f'\n[superlink.sites-address]\naddress = "127.0.0.1:{gateway_port}"\n'
                     f'root-certificates = "{study.ca_cert}"\n')
    try:
        fed.start_superlink()  # --host defaults to 127.0.0.1: loopback only
        gateway = fed.start("gateway", [
            sys.executable, "-m", "fedrad.server.gateway",
            "--listen", f"127.0.0.1:{gateway_port}",
            "--superlink", f"https://127.0.0.1:{fed.port}", "--ca-cert", str(study.ca_cert),
            "--certfile", str(study.server_cert), "--keyfile", str(study.server_key)])
        _wait_port(gateway_port, gateway, fed)

        # From the sites' address: no control request gets through.
        for args in (("ls", "sites-address"),
                     ("supernode", "register", str(stranger.public_key), "sites-address")):
            denied = fed.flwr(*args, timeout=120)
            assert denied.returncode != 0, fed.diagnostics(f"{args} was not refused",
                                                           denied.stdout + denied.stderr)
        with httpx.Client(base_url=f"https://127.0.0.1:{gateway_port}",
                          verify=str(study.ca_cert)) as raw:
            for path in ("/v1/control/list-runs", "/v1/control/register-node",
                         "/v1/runtime/acquire-task", "/v1/fleet/../control/list-runs",
                         "/docs"):
                response = raw.post(path, content=b"")
                assert response.status_code == 403, (path, response.status_code)
                assert response.text == REFUSAL
        gateway_log = (fed.logs / "gateway.log").read_text()
        assert "refused POST /v1/control/list-runs" in gateway_log

        # On the coordinator's loopback the Control API works: register the site's key.
        reg = fed.flwr("supernode", "register", str(key.public_key), "loopback", timeout=120)
        assert reg.returncode == 0, fed.diagnostics("register", reg.stdout + reg.stderr)

        # The site connects to the gateway, authenticates, and trains.
        fed.start("supernode", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{gateway_port}",
            "--port", str(_free_port()), "--root-certificates", str(study.ca_cert),
            "--auth-supernode-private-key", str(key.private_key),
            "--node-config", f'data-dir="{cache}" site-id="site-1"'])
        out = tmp_path / "run-out"
        result = fed.flwr("run", str(Path(__file__).resolve().parents[1]), "loopback",
                          "--stream", "--run-config",
                          'num-server-rounds=1 image-size=32 model="resnet18" min-sites=1 '
                          f'secure-aggregation=false out-dir="{out}"')
        output = result.stdout + result.stderr
        assert result.returncode == 0, fed.diagnostics("run through the gateway", output)
        assert (out / "metrics.json").is_file(), fed.diagnostics("no metrics", output)
        listed = fed.flwr("ls", "loopback", timeout=120)
        assert listed.returncode == 0, fed.diagnostics("ls", listed.stdout + listed.stderr)
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs)
