"""Certificates and site keys for a fedrad study (``fedrad certs``).

A study folder holds everything the coordinator issues::

    <study>/ca/ca.key, ca.crt          the study's certificate authority (keep ca.key offline)
    <study>/server/server.key, .pem    the SuperLink's TLS certificate (hostnames and IPs)
    <study>/sites/<site-id>/site.key   a site's SuperNode authentication key (OpenSSH ECDSA P-384)
    <study>/sites/<site-id>/site.pub   its public half, registered with the SuperLink
    <study>/registry.json              which sites exist, their key fingerprints, revocations

Hospital IT receives ``ca.crt`` (to trust the server) and its own ``site.key``; nothing is
reissued for the other sites when one is added or revoked.  Private keys are written with
mode 0600.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrad.common.errors import FedradError

__all__ = [
    "StudyPaths",
    "SiteKey",
    "init_study",
    "add_site",
    "revoke_site",
    "renew_server_certificate",
    "list_sites",
    "certificate_expiry",
]

log = logging.getLogger(__name__)

_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class StudyPaths:
    """Where the files of a study live."""

    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "server.pem"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    def site_dir(self, site_id: str) -> Path:
        return self.root / "sites" / site_id


@dataclass(frozen=True)
class SiteKey:
    """A site's SuperNode authentication key pair."""

    site_id: str
    private_key: Path
    public_key: Path
    fingerprint: str


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrad study"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _read_registry(paths: StudyPaths) -> dict[str, Any]:
    if not paths.registry.is_file():
        raise FedradError("no-study", f"no fedrad study in {paths.root}: run "
                          "'fedrad certs init' first")
    return json.loads(paths.registry.read_text())


def _write_registry(paths: StudyPaths, registry: dict[str, Any]) -> None:
    _write(paths.registry, (json.dumps(registry, indent=2, sort_keys=True) + "\n").encode())


def _load_ca(paths: StudyPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    except FileNotFoundError as err:
        raise FedradError("no-ca", f"the study's CA is missing ({err.filename}); it is "
                          "needed to issue or renew certificates") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedradError("bad-ca", "the study's CA key is not an elliptic-curve key")
    return key, cert


def _issue_server_cert(paths: StudyPaths, names: list[str], ips: list[str], days: int) -> None:
    ca_key, ca_cert = _load_ca(paths)
    key = ec.generate_private_key(ec.SECP384R1())
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    try:
        alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    except ValueError as err:
        raise FedradError("bad-ip", f"not an IP address: {err}") from err
    if not alt:
        raise FedradError("no-server-name", "give the SuperLink's hostname (--server-name) "
                          "or IP address (--server-ip) that sites will connect to")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0] if names else ips[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths.server_key, _pem_key(key), private=True)
    _write(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def init_study(root: Path, *, server_names: list[str], server_ips: list[str] | None = None,
               days: int = 397, ca_days: int = 3650) -> StudyPaths:
    """Create a study: its CA and the SuperLink's certificate.

    Refuses to overwrite an existing study (its sites would lose trust).
    """
    paths = StudyPaths(Path(root))
    if paths.registry.exists() or paths.ca_key.exists():
        raise FedradError("study-exists", f"a study already exists in {paths.root}; use "
                          "'fedrad certs add-site' or 'renew' instead of init")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedrad study CA"))
        .issuer_name(_name("fedrad study CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _issue_server_cert(paths, list(server_names), list(server_ips or []), days)
    _write_registry(paths, {
        "format": "fedrad-study/1",
        "created": now.isoformat(),
        "server": {"names": list(server_names), "ips": list(server_ips or [])},
        "sites": {},
    })
    log.info("created study in %s", paths.root)
    return paths


def add_site(root: Path, site_id: str) -> SiteKey:
    """Create a site's SuperNode key pair; nothing is reissued for the other sites."""
    paths = StudyPaths(Path(root))
    if not _SITE_ID.match(site_id):
        raise FedradError("bad-site-id", f"site id {site_id!r} must be 1-64 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    registry = _read_registry(paths)
    if site_id in registry["sites"]:
        raise FedradError("site-exists", f"site {site_id!r} already has a key; revoke it "
                          "first to issue a new one")
    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    site_dir = paths.site_dir(site_id)
    _write(site_dir / "site.key", private, private=True)
    _write(site_dir / "site.pub", public + f" {site_id}\n".encode())
    fingerprint = hashlib.sha256(public).hexdigest()
    registry["sites"][site_id] = {"fingerprint": fingerprint, "created": _now().isoformat(),
                                  "revoked": None}
    _write_registry(paths, registry)
    return SiteKey(site_id, site_dir / "site.key", site_dir / "site.pub", fingerprint)


def revoke_site(root: Path, site_id: str, *, reason: str = "") -> Path:
    """Mark a site revoked; returns its public key file for ``flwr supernode unregister``."""
    paths = StudyPaths(Path(root))
    registry = _read_registry(paths)
    entry = registry["sites"].get(site_id)
    if entry is None:
        raise FedradError("no-such-site", f"site {site_id!r} is not in this study; known: "
                          + ", ".join(sorted(registry["sites"])))
    entry["revoked"] = {"at": _now().isoformat(), "reason": reason}
    _write_registry(paths, registry)
    return paths.site_dir(site_id) / "site.pub"


def renew_server_certificate(root: Path, *, days: int = 397) -> Path:
    """Issue a fresh SuperLink certificate from the study's CA (same names and IPs)."""
    paths = StudyPaths(Path(root))
    server = _read_registry(paths)["server"]
    _issue_server_cert(paths, server["names"], server["ips"], days)
    return paths.server_cert


def certificate_expiry(path: Path) -> dt.datetime:
    """When a PEM certificate expires (UTC)."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc


def list_sites(root: Path) -> list[dict[str, Any]]:
    """The study's sites with their fingerprints and revocation state."""
    registry = _read_registry(StudyPaths(Path(root)))
    return [{"site-id": k, **v} for k, v in sorted(registry["sites"].items())]
