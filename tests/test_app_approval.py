"""A site runs only the app bundles it has approved.

Unit tests cover the allow-list; the integration test starts a real SuperLink and one site
with ``fedrad site run`` on loopback: the approved bundle trains, and the same bundle with
one extra file is refused by the site, with the refusal in the site's log and egress log,
and its files are never unpacked at the site.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_deployment import ROOT, LoopbackFederation, _free_port

from fedrad.client.approval import (
    AppNotApprovedError,
    approve,
    check_bundle,
    load_approved,
    run_site,
)
from fedrad.client.prepare import prepare_site
from fedrad.common.config import load_settings
from fedrad.common.errors import FedradError
from fedrad.simulations.synthetic import generate_synthetic_federation

BIN = Path(sys.executable).parent


def _app_dir(parent: Path) -> Path:
    """A Flower app folder holding fedrad's pyproject.toml (the code is the installed fedrad)."""
    app = parent / "fedradapp"
    app.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    return app


def _build(app: Path, out: Path, env: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(BIN / "flwr"), "build", "--app", str(app)], cwd=out,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (fab,) = out.glob("*.fab")
    return fab


def _sent_ids(fed: LoopbackFederation) -> list[str]:
    """The ids of the replies the site's SuperNode says it sent."""
    return re.findall(r"Sending: \w+ message \(ID: ([0-9a-f]{64})\)",
                      (fed.logs / "site.log").read_text())


def test_approve_a_bundle_file_and_a_hash(tmp_path: Path) -> None:
    fab = _build(_app_dir(tmp_path), tmp_path / "build")
    digest = hashlib.sha256(fab.read_bytes()).hexdigest()
    allow = tmp_path / "site" / "approved-apps.json"
    assert load_approved(allow) == {}
    entry = approve(allow, str(fab), note="reviewed by IT")
    assert entry.sha256 == digest and entry.fab_id == "fedrad/fedrad"
    approve(allow, "ab" * 32)
    apps = load_approved(allow)
    assert set(apps) == {digest, "ab" * 32} and apps[digest].note == "reviewed by IT"
    assert check_bundle(fab.read_bytes(), digest, apps) == digest
    with pytest.raises(AppNotApprovedError, match="app-not-approved"):
        check_bundle(fab.read_bytes() + b"x", "", apps)
    with pytest.raises(AppNotApprovedError, match="app-hash-mismatch"):
        check_bundle(fab.read_bytes(), "ab" * 32, apps)


def test_bad_approvals_and_lists_are_clear_errors(tmp_path: Path) -> None:
    allow = tmp_path / "approved-apps.json"
    with pytest.raises(FedradError, match="neither a .fab file nor a SHA-256"):
        approve(allow, "not-a-hash")
    not_fab = tmp_path / "notes.fab"
    not_fab.write_bytes(b"hello")
    with pytest.raises(FedradError, match="flwr build"):
        approve(allow, str(not_fab))
    allow.write_text('{"approved": [{"sha256": "xyz"}]}')
    with pytest.raises(FedradError, match="approved-apps-damaged") as info:
        load_approved(allow)
    assert str(tmp_path) not in str(info.value)  # the path stays in local_detail
    with pytest.raises(FedradError, match="sets --isolation"):
        run_site(["--superlink", "x:1", "--isolation", "subprocess"], allow)
    with pytest.raises(FedradError, match="outside the approved bundle's hash"):
        run_site(["--superlink", "x:1", "--allow-runtime-dependency-installation"], allow)


def test_site_approve_and_run_commands(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedrad.cli import app as fedrad_cli

    fab = _build(_app_dir(tmp_path), tmp_path / "build")
    allow = tmp_path / "approved-apps.json"
    result = CliRunner().invoke(fedrad_cli, ["site", "approve", str(fab), "--approved",
                                             str(allow), "--note", "IT change 12"])
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(fab.read_bytes()).hexdigest()
    assert digest in result.output and "1 approved bundle(s)" in result.output
    assert json.loads(allow.read_text())["approved"][0]["note"] == "IT change 12"
    result = CliRunner().invoke(fedrad_cli, ["site", "approve", "--list", "--approved",
                                             str(allow)])
    assert result.exit_code == 0 and digest in result.output and "IT change 12" in result.output
    result = CliRunner().invoke(fedrad_cli, ["site", "approve", "--revoke", digest,
                                             "--approved", str(allow)])
    assert result.exit_code == 0 and "0 approved bundle(s)" in result.output
    assert load_approved(allow) == {}
    result = CliRunner().invoke(fedrad_cli, ["site", "approve", "--revoke", digest,
                                             "--approved", str(allow)])
    assert result.exit_code == 2 and "[not-approved]" in result.output
    result = CliRunner().invoke(fedrad_cli, ["site", "approve", "nonsense", "--approved",
                                             str(allow)])
    assert result.exit_code == 2 and "neither a .fab file nor a SHA-256" in result.output
    result = CliRunner().invoke(fedrad_cli, ["site", "run", "--approved", str(allow),
                                             "--superlink", "x:1", "--port", "9999"])
    assert result.exit_code == 2 and "remove --port" in result.output


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_site_runs_the_approved_bundle_and_refuses_a_changed_one(tmp_path: Path) -> None:
    federation = generate_synthetic_federation(
        tmp_path / "dicom", num_sites=1, images_per_site=30, test_images=10, image_size=64,
        seed=5)
    site = federation.sites[0]
    cache = prepare_site(site.dicom_dir, site.labels_csv, tmp_path / "cache", load_settings(
        {"image-size": 32}), site_id="site-1").cache_dir
    app = _app_dir(tmp_path / "apps")
    allow = tmp_path / "site-it" / "approved-apps.json"
    egress = tmp_path / "site-it" / "egress.jsonl"

    fed = LoopbackFederation(tmp_path)
    # the SuperLink starts its SuperExec as 'flower-superexec' from PATH
    fed.env["PATH"] = f"{BIN}{os.pathsep}{fed.env.get('PATH', '')}"
    try:
        fed.start_superlink()
        approved_fab = _build(app, tmp_path / "build", env=fed.env)
        approved_hash = hashlib.sha256(approved_fab.read_bytes()).hexdigest()
        approve(allow, str(approved_fab))
        site_args = [str(BIN / "fedrad"), "site", "run", "--approved", str(allow),
                     "--runtime-port", str(_free_port()),
                     "--superlink", f"127.0.0.1:{fed.port}", "--insecure",
                     "--node-config",
                     f'data-dir="{cache}" site-id="site-1" egress-log="{egress}"']
        # The site is another machine: its own FLWR_HOME, where its ClientApps unpack FABs.
        site_home = tmp_path / "site-flwr-home"
        site_home.mkdir()
        log_file = open(fed.logs / "site.log", "w")  # noqa: SIM115 - closed with the process
        fed.procs.append(subprocess.Popen(
            site_args, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**fed.env, "FLWR_HOME": str(site_home)}, start_new_session=True))
        run_config = ('num-server-rounds=1 image-size=32 model="resnet18" min-sites=1 '
                      'secure-aggregation=false class-names="normal,opacity" out-dir="{}"')
        out = tmp_path / "run-approved"
        result = fed.flwr("run", str(app), "loopback", "--stream",
                          "--run-config", run_config.format(out))
        output = result.stdout + result.stderr
        assert result.returncode == 0, fed.diagnostics("approved run failed", output)
        assert (out / "metrics.json").is_file(), fed.diagnostics("no metrics", output)
        site_log = (fed.logs / "site.log").read_text()
        assert f"approved app bundle {approved_hash}" in site_log, fed.diagnostics("no ok")
        assert "REFUSED" not in site_log

        (app / "extra.py").write_text("print('code the site never reviewed')\n")
        changed_hash = hashlib.sha256(
            _build(app, tmp_path / "build-changed", env=fed.env).read_bytes()).hexdigest()
        assert changed_hash != approved_hash
        result = fed.flwr("run", str(app), "loopback", "--run-config",
                          run_config.format(tmp_path / "run-changed"))
        assert result.returncode == 0, fed.diagnostics("submit failed",
                                                       result.stdout + result.stderr)
        deadline = time.monotonic() + 300
        refusal = f"REFUSED app bundle {changed_hash}"
        while refusal not in (fed.logs / "site.log").read_text() or (
                '"kind": "error"' not in egress.read_text()):
            assert time.monotonic() < deadline, fed.diagnostics("the site did not refuse")
            time.sleep(1)
        site_log = (fed.logs / "site.log").read_text()
        assert "app-not-approved" in site_log and "fedrad site approve" in site_log
        entries = [json.loads(line) for line in egress.read_text().splitlines()]
        first_run = entries[0]["run-id"]
        approved_run = [e for e in entries if e["run-id"] == first_run]
        assert all(e["kind"] == "reply" for e in approved_run)
        assert "train" in [e["message-type"] for e in approved_run]  # the site trained
        refused = [e for e in entries if e["run-id"] != first_run]
        assert refused and all(e["kind"] == "error" for e in refused)
        assert "app-not-approved" in refused[0]["error"]
        assert changed_hash in refused[0]["error"]
        # Every message the SuperNode sent is in the egress log under the same SHA-256 id
        # (the refusal is logged before the SuperNode sends it: wait for that line).
        logged = sorted(e["message-id"] for e in entries)
        deadline = time.monotonic() + 120
        while sorted(_sent_ids(fed)) != logged:
            assert time.monotonic() < deadline, fed.diagnostics(f"sent {_sent_ids(fed)}")
            time.sleep(1)
        # Nothing the coordinator received or printed names the site's folders.
        coordinator_text = output + (fed.logs / "superlink.log").read_text()
        for local in (str(cache), str(allow.parent), str(site_home)):
            assert local not in coordinator_text
            assert local not in egress.read_text()
        installed = [p.name for p in (site_home / "apps").iterdir()]
        assert any(approved_hash[:8] in name for name in installed), installed
        assert not any(changed_hash[:8] in name for name in installed), installed
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs)
