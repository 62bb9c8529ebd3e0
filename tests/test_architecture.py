"""The import arrows that must never exist, and the package list that pyproject.toml must keep complete."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "vision_mamba"

FORBIDDEN = {
    ROOT / "kernels": ("vision_mamba", "lightning", "pytorch_lightning", "hydra"),
    PKG / "models": ("vision_mamba.data", "vision_mamba.tasks", "lightning", "pytorch_lightning"),
    PKG / "data": ("vision_mamba.models", "vision_mamba.tasks"),
    PKG / "utils": ("vision_mamba.models",),
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", list(FORBIDDEN), ids=lambda p: p.name)
def test_no_forbidden_imports(folder: Path) -> None:
    bad = []
    for path in folder.rglob("*.py"):
        for module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_tasks_import_no_concrete_model() -> None:
    bad = []
    for path in (PKG / "tasks").rglob("*.py"):
        for module in imported_modules(path):
            if module.startswith("vision_mamba.models"):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_pyproject_lists_every_package() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"vision_mamba." + ".".join(p.parent.relative_to(PKG).parts) if p.parent != PKG else "vision_mamba"
             for p in PKG.rglob("__init__.py")}
    found.add("vim_kernels")
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


def test_every_python_file_opens_with_a_docstring() -> None:
    missing = [str(p.relative_to(ROOT)) for folder in (PKG, ROOT / "kernels") for p in folder.rglob("*.py")
               if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"files without a one-line docstring on their job: {missing}"
