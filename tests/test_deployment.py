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

import json
import subprocess
from pathlib import Path

import pytest
from _federation import ROOT, LoopbackFederation, make_site_caches, metric_rows
from _federation import free_port as _free_port  # noqa: F401 - other tests import it from here

from fedrad.server import certs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROUNDS = 2


@pytest.fixture(scope="module")
def site_caches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_site_caches(tmp_path_factory.mktemp("deploy-sites"), num_sites=3,
                            images_per_site=30, test_images=30, image_size=64, cache_size=32,
                            seed=3)


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
    rows = metric_rows(out_dir)
    pooled = [key for key in rows if key[1] == "pooled" and key[0] >= 1]
    assert len(pooled) == ROUNDS, fed.diagnostics("pooled rows", output)
    if secure:
        assert "secure aggregation: node" not in output, fed.diagnostics("exclusion", output)
    return json.loads(text)


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
    a, b = metric_rows(_PLAIN["out"]), metric_rows(secure_out)
    for rnd in range(1, ROUNDS + 1):
        p, q = a[(rnd, "pooled")], b[(rnd, "pooled")]
        assert p["n"] == q["n"]  # exact integer sums of the counts
        n = int(p["n"])
        for key in ("accuracy", "sensitivity", "specificity"):
            assert abs(float(p[key]) - float(q[key])) <= 1.0 / n + 1e-9, (rnd, key)
        assert abs(float(p["auc"]) - float(q["auc"])) <= 0.05, rnd
