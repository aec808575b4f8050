"""Deployment mode on loopback: a real SuperLink, three SuperNodes, ``flwr run .``.

Each SuperNode points at its own site cache with ``--node-config``; the run must come
back with pooled metrics for both rounds, and every process started here is stopped.
The first runs plain FedAvg (``secure-aggregation=false``, per-site rows).  The second
runs the same federation with TLS (certificates from ``fedrad certs``), SuperNode
authentication and secure aggregation on (pooled rows only), shows that a SuperNode with an
unregistered key or one trusting another CA is refused, and compares its round-1 model and
pooled metrics with the first run's (same caches, same seed): equal within quantisation.
"""

from __future__ import annotations

import csv
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
from fedrad.server import certs
from fedrad.simulations.synthetic import generate_synthetic_federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROUNDS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class LoopbackFederation:
    """Starts and stops the Flower processes of one test, logging each to a file."""

    def __init__(self, tmp_path: Path, study: Path | None = None) -> None:
        self.tmp = tmp_path
        self.study = certs.StudyPaths(study) if study else None
        self.port = _free_port()
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        home = tmp_path / "flwr-home"
        home.mkdir()
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1",
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
        out = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.tmp, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> None:
        args = [str(BIN / "flower-superlink"), "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.study:
            args += ["--ssl-ca-certfile", str(self.study.ca_cert),
                     "--ssl-certfile", str(self.study.server_cert),
                     "--ssl-keyfile", str(self.study.server_key), "--enable-supernode-auth"]
        else:
            args.append("--insecure")
        link = self.start("superlink", args)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert link.poll() is None, self.diagnostics("the SuperLink exited early")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(self.diagnostics("the SuperLink did not open its port"))

    def supernode_args(self, cache: Path, site_id: str, *, ca: Path | None = None,
                       key: Path | None = None) -> list[str]:
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(_free_port()),
                "--node-config", f'data-dir="{cache}" site-id="{site_id}"']
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

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _run_and_check(fed: LoopbackFederation, out_dir: Path, *, secure: bool) -> dict:
    run_config = (
        f'num-server-rounds={ROUNDS} image-size=32 model="resnet18" local-epochs=1 '
        f'min-sites=3 out-dir="{out_dir}" class-names="normal,opacity" '
        f'secure-aggregation={"true" if secure else "false"}'
    )
    # secure aggregation costs 4 x rounds + 4 message round trips instead of 2 x rounds, and
    # each spawns a ClientApp process per site (~3 s alone, far more on a loaded machine)
    result = fed.flwr("run", str(ROOT), "loopback", "--stream", "--run-config", run_config,
                      timeout=1800 if secure else 600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, fed.diagnostics("flwr run failed", output)
    assert "ServerApp raised an exception" not in output, fed.diagnostics("ServerApp", output)
    metrics_file = out_dir / "metrics.json"
    assert metrics_file.is_file(), fed.diagnostics("no metrics.json", output)
    text = metrics_file.read_text()
    for site in ("site:site-1", "site:site-2", "site:site-3"):
        # with secure aggregation the server never sees one site's counts
        assert (site in text) != secure, fed.diagnostics(f"{site} row (secure={secure})", output)
    assert (out_dir / "checkpoints" / f"round-{ROUNDS:03d}.pt").is_file()
    rows = _metric_rows(out_dir)
    pooled = [key for key in rows if key[1] == "pooled" and key[0] >= 1]
    assert len(pooled) == ROUNDS, fed.diagnostics("pooled rows", output)
    if secure:
        assert "secure aggregation: node" not in output, fed.diagnostics("exclusion", output)
    return json.loads(text)


def _metric_rows(out_dir: Path) -> dict[tuple[int, str], dict[str, str]]:
    with open(out_dir / "metrics.csv", newline="") as fh:
        return {(int(r["round"]), r["scope"]): r for r in csv.DictReader(fh)}


#: The plain run's outputs, for the secure run to compare with (same caches, same seed).
_PLAIN: dict[str, Path] = {}


def test_flwr_run_against_superlink_and_three_supernodes(
    tmp_path: Path, site_caches: list[Path]
) -> None:
    fed = LoopbackFederation(tmp_path)
    try:
        fed.start_superlink()
        for i, cache in enumerate(site_caches):
            fed.start(f"supernode-{i}", fed.supernode_args(cache, f"site-{i + 1}"))
        _run_and_check(fed, tmp_path / "run-out", secure=False)
        _PLAIN["out"] = tmp_path / "run-out"
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs)


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.timeout(2400)
def test_tls_and_site_authentication(tmp_path: Path, site_caches: list[Path]) -> None:
    study = tmp_path / "study"
    certs.init_study(study, server_names=["localhost"], server_ips=["127.0.0.1"])
    keys = [certs.add_site(study, f"site-{i + 1}") for i in range(3)]
    stranger = certs.add_site(study, "not-registered")
    other_ca = tmp_path / "other-study"
    certs.init_study(other_ca, server_names=["localhost"], server_ips=["127.0.0.1"])

    fed = LoopbackFederation(tmp_path, study=study)
    try:
        fed.start_superlink()
        for key in keys:
            reg = fed.flwr("supernode", "register", str(key.public_key), "loopback",
                           timeout=120)
            assert reg.returncode == 0, fed.diagnostics("register failed",
                                                        reg.stdout + reg.stderr)
        for i, (cache, key) in enumerate(zip(site_caches, keys, strict=True)):
            fed.start(f"supernode-{i}",
                      fed.supernode_args(cache, key.site_id, key=key.private_key))
        # An unregistered key and a CA the SuperLink's certificate does not chain to are
        # both refused: those SuperNodes exit with an error instead of joining.
        intruder = fed.start("intruder-key", fed.supernode_args(
            site_caches[0], "intruder", key=stranger.private_key) + ["--max-retries", "2"])
        wrong_ca = fed.start("intruder-ca", fed.supernode_args(
            site_caches[0], "intruder", key=keys[0].private_key,
            ca=certs.StudyPaths(other_ca).ca_cert) + ["--max-retries", "2"])
        # A SuperNode without TLS (plain HTTP to the TLS port) never gets in either.
        plain_args = fed.supernode_args(site_caches[0], "intruder")
        ca_at = plain_args.index("--root-certificates")
        plain_args[ca_at:ca_at + 2] = ["--insecure"]
        no_tls = fed.start("intruder-no-tls", plain_args + ["--max-retries", "2"])
        _run_and_check(fed, tmp_path / "run-out", secure=True)
        for proc, name, reason in ((intruder, "intruder-key", "Failed to activate SuperNode"),
                                   (wrong_ca, "intruder-ca", "CERTIFICATE_VERIFY_FAILED"),
                                   (no_tls, "intruder-no-tls", "Failed to initialize")):
            code = _wait_exit(proc, 120)
            assert code not in (None, 0), fed.diagnostics(f"{name} was not refused")
            assert reason in (fed.logs / f"{name}.log").read_text(), fed.diagnostics(name)
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs)
    _compare_with_plain(tmp_path / "run-out")


def _compare_with_plain(secure_out: Path) -> None:
    """Secure aggregation changes the global model only within the quantisation bound."""
    if "out" not in _PLAIN:
        pytest.skip("the plain deployment run did not run in this session; nothing to compare")
    import torch

    from fedrad.server.checkpoint import load_checkpoint

    plain = load_checkpoint(_PLAIN["out"] / "checkpoints" / "round-001.pt")["state_dict"]
    secure = load_checkpoint(secure_out / "checkpoints" / "round-001.pt")["state_dict"]
    assert plain.keys() == secure.keys()
    for key, value in plain.items():
        assert secure[key].dtype == value.dtype, key
        if value.is_floating_point():  # bound ~1e-7, plus thread-order noise of training
            assert torch.allclose(secure[key], value, atol=1e-4, rtol=0), key
        else:
            assert torch.equal(secure[key], value), key
    a, b = _metric_rows(_PLAIN["out"]), _metric_rows(secure_out)
    for rnd in range(1, ROUNDS + 1):
        p, q = a[(rnd, "pooled")], b[(rnd, "pooled")]
        assert p["n"] == q["n"]  # exact integer sums of the counts
        n = int(p["n"])
        for key in ("accuracy", "sensitivity", "specificity"):
            assert abs(float(p[key]) - float(q[key])) <= 1.0 / n + 1e-9, (rnd, key)
        assert abs(float(p["auc"]) - float(q["auc"])) <= 0.05, rnd
