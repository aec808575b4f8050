"""The deployment files parse and run real commands with real options and paths.

No Docker engine runs here, so the containers' commands are checked against the installed
programs instead: every executable exists, every ``--option`` is one the program accepts,
every secret file is one ``fedrad certs`` writes, the containers run as a non-root user and
the sites open no port and mount their DICOM read-only.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedrad.server import certs

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
DOCKERFILES = ("site.Dockerfile", "coordinator.Dockerfile")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@functools.cache
def _help(*argv: str) -> str:
    result = subprocess.run(list(argv) + ["--help"], capture_output=True, text=True,
                            timeout=120, env={"COLUMNS": "300", "PATH": str(BIN),
                                              "FLWR_TELEMETRY_ENABLED": "0"})
    assert result.returncode == 0, f"{argv} --help failed: {result.stderr[-500:]}"
    return result.stdout + result.stderr


def _options(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_run_as_non_root_and_copy_real_paths(name: str) -> None:
    steps = _instructions(DEPLOY / name)
    kinds = [k for k, _ in steps]
    assert kinds[0] in ("ARG", "FROM") and "FROM" in kinds
    users = [arg for k, arg in steps if k == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{name} must end as a non-root user"
    # the USER comes after every RUN that needs root, and before the command
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    for kind, arg in steps:
        if kind == "COPY":
            *sources, _dest = arg.split()
            for src in sources:
                assert src == "." or (ROOT / src).exists(), f"{name}: COPY {src} is missing"
        if kind in ("ENTRYPOINT", "CMD"):
            argv = yaml.safe_load(arg)
            assert isinstance(argv, list), f"{name}: {kind} must be an exec-form JSON array"
    # the program the container starts: ENTRYPOINT's, else CMD's
    start = [arg for k, arg in steps if k == "ENTRYPOINT"] or [a for k, a in steps if k == "CMD"]
    program = yaml.safe_load(start[-1])[0]
    assert (BIN / program).is_file(), f"{name}: {program} is not an installed program"
    run = " ".join(arg for k, arg in steps if k == "RUN")
    assert "pip install /src/fedrad" in run and "torch==" in run


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".venv-ci", "runs"):
        assert entry in ignored


def _service_argv(service: dict) -> list[str]:
    dockerfile = service.get("build", {}).get("dockerfile")
    entry: list[str] = []
    if dockerfile:
        for kind, arg in _instructions(ROOT / dockerfile):
            if kind == "ENTRYPOINT":
                entry = yaml.safe_load(arg)
    return entry + list(service["command"])


def test_compose_commands_use_real_programs_and_options(compose: dict) -> None:
    services = compose["services"]
    site_run = _help(str(BIN / "fedrad"), "site", "run")
    supernode = _help(str(BIN / "flower-supernode"))
    for name, service in services.items():
        argv = _service_argv(service)
        if argv[:3] == ["fedrad", "site", "run"]:
            for opt in _options(argv[3:]):
                # fedrad site run's own options, the rest goes to flower-supernode
                assert opt in site_run or opt in supernode, f"{name}: unknown option {opt}"
            node_config = argv[argv.index("--node-config") + 1]
            keys = {kv.split("=", 1)[0] for kv in shlex.split(node_config)}
            assert keys == {"data-dir", "site-id", "egress-log"}, name
        elif argv[:3] == ["fedrad", "site", "prepare"]:
            text = _help(str(BIN / "fedrad"), "site", "prepare")
            for opt in _options(argv[3:]):
                assert opt in text, f"{name}: fedrad site prepare has no {opt}"
        elif argv[0] == "flower-superlink":
            text = _help(str(BIN / "flower-superlink"))
            for opt in _options(argv[1:]):
                assert opt in text, f"{name}: flower-superlink has no {opt}"
            assert argv[argv.index("--host") + 1] == "127.0.0.1", "the SuperLink stays on loopback"
        elif argv[:3] == ["python", "-m", "fedrad.server.gateway"]:
            text = _help(sys.executable, "-m", "fedrad.server.gateway")
            for opt in _options(argv[3:]):
                assert opt in text, f"{name}: the gateway has no {opt}"
            assert service["network_mode"] == "service:superlink"
        else:
            pytest.fail(f"service {name} runs an unexpected command: {argv}")


def test_sites_open_no_port_and_read_dicom_read_only(compose: dict) -> None:
    for name, service in compose["services"].items():
        argv = _service_argv(service)
        if argv[:2] != ["fedrad", "site"]:
            continue
        assert "ports" not in service, f"{name}: a site container opens no port"
        assert service.get("read_only") is True
        for volume in service.get("volumes", []):
            if ":/dicom" in volume or ":/etc/fedrad" in volume:
                assert volume.endswith(":ro"), f"{name}: {volume} must be read-only"
    exposed = [n for n, s in compose["services"].items() if "ports" in s]
    assert exposed == ["superlink"]
    assert compose["services"]["superlink"]["ports"] == ["9092:9092"]


def test_secrets_are_the_files_fedrad_certs_writes(compose: dict, tmp_path: Path) -> None:
    study = tmp_path / "study"
    certs.init_study(study, server_names=["superlink"], server_ips=["127.0.0.1"])
    for site in ("hospital-a", "hospital-b", "hospital-c"):
        certs.add_site(study, site)
    declared = compose["secrets"]
    for name, spec in declared.items():
        rel = Path(spec["file"])
        assert rel.parts[0] == "study", name
        assert (tmp_path / rel).is_file(), f"secret {name}: fedrad certs writes no {rel}"
    for name, service in compose["services"].items():
        argv = _service_argv(service)
        used = {a.split("/run/secrets/", 1)[1] for a in argv if a.startswith("/run/secrets/")}
        assert used <= set(service.get("secrets", [])), f"{name} uses undeclared secrets"
        assert set(service.get("secrets", [])) <= set(declared)
    # each site gets its own key only
    for letter in "abc":
        assert compose["services"][f"site-{letter}"]["secrets"] == ["ca.crt", f"site-{letter}.key"]


def test_flwr_connection_points_at_the_loopback_superlink(compose: dict) -> None:
    import tomllib

    config = tomllib.loads((DEPLOY / "flwr-config.toml").read_text())
    link = config["superlink"][config["superlink"]["default"]]
    superlink = compose["services"]["superlink"]["command"]
    assert link["address"] == f"127.0.0.1:{superlink[superlink.index('--port') + 1]}"
    assert link["root-certificates"] == "/run/secrets/ca.crt"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_set_the_malloc_threshold_the_tests_and_sites_run_with(
        name: str, tmp_path: Path) -> None:
    """Big buffers go back to the system when freed: in the images, the loopback
    federation of the tests and benchmark, and every process ``fedrad site run`` starts."""
    from _federation import LoopbackFederation

    from fedrad.client.approval import MMAP_THRESHOLD, MMAP_THRESHOLD_ENV

    env = " ".join(arg for k, arg in _instructions(DEPLOY / name) if k == "ENV")
    assert f"{MMAP_THRESHOLD_ENV}={MMAP_THRESHOLD}" in env.split()
    assert LoopbackFederation(tmp_path).env[MMAP_THRESHOLD_ENV] == MMAP_THRESHOLD
