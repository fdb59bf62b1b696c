"""The design card's import rules: runtime/ needs numpy and the standard library only (so it ships
alone), and nothing under passes/ or runtime/ imports compiler/."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def test_runtime_imports_numpy_and_the_standard_library_only():
    allowed = {"numpy", "__future__"} | set(sys.stdlib_module_names)
    assert {k: v for k, v in imported_roots("runtime").items() if k not in allowed} == {}


def test_passes_import_neither_compiler_nor_runtime():
    roots = imported_roots("passes")
    assert "compiler" not in roots and "runtime" not in roots
