"""The package layout of DESIGN.md: who may import whom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
ALLOWED = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "simulations": {"common", "client", "server", "simulations"},
}


def _imported_subpackages(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names = [node.module]
            elif node.level == 1:
                found.add(package)
                continue
            elif node.level >= 2:
                # ``from ..x import`` leaves the sub-package: treat as fedrad.<x>
                names = [f"fedrad.{node.module}" if node.module else "fedrad"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedrad" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add(parts[1])
            elif parts[0] == "fedrad" and len(parts) == 1:
                found.add("fedrad-root")
            elif parts[0] in PACKAGES:
                found.add(f"bare:{parts[0]}")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    for path in files:
        imported = _imported_subpackages(path, package)
        bare = {i for i in imported if i.startswith("bare:")}
        assert not bare, f"{path.relative_to(ROOT)} imports {bare}: use fedrad.<pkg> or relative"
        assert "fedrad-root" not in imported, f"{path.relative_to(ROOT)} imports fedrad's root"
        illegal = imported - ALLOWED[package]
        assert not illegal, (
            f"{path.relative_to(ROOT)} imports {sorted(illegal)}; {package} may only import "
            f"{sorted(ALLOWED[package])}"
        )


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from fedrad.server.server_app import app\nfrom ..client import x\n")
    assert _imported_subpackages(bad, "client") == {"server", "client"}


def test_flower_components_point_at_real_apps() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    components = config["tool"]["flwr"]["app"]["components"]
    for key in ("serverapp", "clientapp"):
        module, _, attr = components[key].partition(":")
        rel = Path(*module.split(".")[1:]).with_suffix(".py")
        assert (ROOT / rel).is_file(), f"{components[key]} does not name a file"
        assert f"\n{attr} = " in (ROOT / rel).read_text()


def test_pyproject_run_config_matches_settings() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from fedrad.common.config import Settings, load_settings

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert load_settings(config) == Settings()
    assert set(config) == set(Settings().to_run_config())
