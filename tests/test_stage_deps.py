"""dvc.yaml must name every source file a stage runs, so that `dvc repro` re-runs a stage when its code changes."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

SRC = ROOT / "src"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The file of a chestxray module (package -> its __init__.py), or None if it is not one of ours."""
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(start: Path) -> set[Path]:
    """Every chestxray source file that `start` imports at module level, transitively."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chestxray"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("chestxray")]
            todo += [f for f in map(module_file, names) if f is not None]
    return {p for p in seen if not _docstring_only(p)}


def _docstring_only(path: Path) -> bool:
    """A package __init__ holding only its docstring runs nothing."""
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_dependency_exists(stage):
    missing = [d for d in STAGES[stage].get("deps", []) if not d.startswith("artifacts/") and not (ROOT / d).exists()]
    assert not missing, f"stage {stage} depends on paths that do not exist: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_source_file_is_a_dependency(stage):
    module = STAGES[stage]["cmd"].split("python -m ")[1].split()[0]
    deps = [ROOT / d for d in STAGES[stage].get("deps", [])]
    code = imported_files(module_file(module))
    uncovered = sorted(str(f.relative_to(ROOT)) for f in code
                       if not any(f == d or d in f.parents for d in deps))
    assert not uncovered, f"stage {stage} runs code dvc.yaml does not list as deps: {uncovered}"
