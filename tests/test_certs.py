"""``fedrad certs``: the study CA, the SuperLink certificate and site keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedrad.cli import app
from fedrad.common.errors import FedradError
from fedrad.server import certs


def _verify(cert_path: Path, ca_path: Path) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    return cert


def test_init_issues_a_server_certificate_chained_to_the_ca(tmp_path: Path) -> None:
    paths = certs.init_study(tmp_path / "s", server_names=["link.example.org"],
                             server_ips=["127.0.0.1"])
    cert = _verify(paths.server_cert, paths.ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FedradError, match="study-exists"):
        certs.init_study(tmp_path / "s", server_names=["x"])


def test_adding_a_site_leaves_the_others_untouched(tmp_path: Path) -> None:
    root = tmp_path / "s"
    paths = certs.init_study(root, server_names=["localhost"])
    first = [certs.add_site(root, f"site-{i}") for i in (1, 2, 3)]
    before = {p: p.read_bytes() for k in first for p in (k.private_key, k.public_key)}
    before[paths.server_cert] = paths.server_cert.read_bytes()
    fourth = certs.add_site(root, "site-4")
    assert all(p.read_bytes() == data for p, data in before.items())
    assert len({k.fingerprint for k in [*first, fourth]}) == 4
    key = serialization.load_ssh_private_key(fourth.private_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert fourth.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(FedradError, match="site-exists"):
        certs.add_site(root, "site-4")
    with pytest.raises(FedradError, match="bad-site-id"):
        certs.add_site(root, "../etc")


def test_revoke_and_renew(tmp_path: Path) -> None:
    root = tmp_path / "s"
    paths = certs.init_study(root, server_names=["localhost"], days=10)
    certs.add_site(root, "site-1")
    certs.revoke_site(root, "site-1", reason="left the study")
    [site] = certs.list_sites(root)
    assert site["revoked"]["reason"] == "left the study"
    ca_before = paths.ca_cert.read_bytes()
    old_expiry = certs.certificate_expiry(paths.server_cert)
    certs.renew_server_certificate(root, days=400)
    assert certs.certificate_expiry(paths.server_cert) > old_expiry
    assert paths.ca_cert.read_bytes() == ca_before
    _verify(paths.server_cert, paths.ca_cert)
    with pytest.raises(FedradError, match="no-such-site"):
        certs.revoke_site(root, "site-9")


def test_cli_round_trip(tmp_path: Path) -> None:
    runner = CliRunner()
    study = str(tmp_path / "s")
    assert runner.invoke(app, ["certs", "init", "--study", study, "--server-name",
                               "localhost"]).exit_code == 0
    assert runner.invoke(app, ["certs", "add-site", "--study", study, "--site-id",
                               "site-1"]).exit_code == 0
    result = runner.invoke(app, ["certs", "status", "--study", study])
    assert result.exit_code == 0 and "site-1: active" in result.output
    result = runner.invoke(app, ["certs", "add-site", "--study", str(tmp_path / "none"),
                                 "--site-id", "x"])
    words = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "[no-study]" in words and "certs init" in words
