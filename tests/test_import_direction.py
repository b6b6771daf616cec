"""Imports point one way: package -> mmr_core, never mmr_core -> package, never package -> package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imagebind", "medvlm", "mmcot", "llava")
DISTRIBUTIONS = {"mmr_core": ROOT / "shared"} | {f"mmr_{name}": ROOT / "packages" / name for name in PACKAGES}


def imported_top_level_modules(path: Path) -> set[str]:
    """Every top-level module name imported anywhere in a Python file (absolute imports only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def forbidden_imports(distribution: str) -> set[str]:
    others = set(DISTRIBUTIONS) - {distribution}
    return others if distribution == "mmr_core" else others - {"mmr_core"}


@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_imports_point_one_way(distribution: str) -> None:
    folder = DISTRIBUTIONS[distribution]
    files = [p for p in folder.rglob("*.py") if ".venv" not in p.parts]
    assert files, f"no Python files found under {folder}"
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported_top_level_modules(path) & forbidden_imports(distribution))
    ]
    assert not violations, "imports must point package -> mmr_core only:\n" + "\n".join(violations)


def test_checker_detects_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from mmr_llava.model import Llava\nimport mmr_core\n")
    assert imported_top_level_modules(bad) & forbidden_imports("mmr_imagebind") == {"mmr_llava"}
    assert imported_top_level_modules(bad) & forbidden_imports("mmr_core") == {"mmr_llava"}
