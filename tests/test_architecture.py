"""The architecture, as rules the code keeps: the request path reads one way (views do no array work and stay out
of the registry's internals)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("view", sorted(p.name for p in (SERVICE / "api").glob("*.py")))
def test_views_do_no_numpy_work_and_stay_out_of_registry_internals(view):
    path = SERVICE / "api" / view
    assert not imported_modules(path) & {"numpy", "onnxruntime", "PIL", "struct"}, f"{view} does array work"
    attributes = {node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)}
    assert not attributes & {"models", "failures", "session", "_load_one"}, f"{view} reaches into the registry"
