"""The architecture as rules the code keeps: one-way layers, each shared name once, a layout that explains itself.

The request path reads one way (views do no array work and stay out of the registry's internals); the names training
and the service share are written in service/contract.py; queued routes come from the views; every module says what
it owns in its first line, and README's development map names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path, PurePath

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


# ---- each shared name is defined once: service/contract.py ----------------------------------------------------------

ROOT = SERVICE.parent


def string_constants(path: Path) -> list[tuple[str, int]]:
    """Every string literal in a module with its line, docstrings aside (f-string pieces included)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def shared_names() -> set[str]:
    from service import contract

    return {contract.INPUT, *contract.OUTPUT_NAMES, contract.LOGITS, *contract.PRECISIONS, *contract.SHED_REASONS}


def test_the_shared_names_are_written_in_at_most_two_modules():
    """The contract itself, plus at most one other module (the /v1 answers' JSON fields share two of the names)."""
    where: dict[str, set[str]] = {name: set() for name in shared_names()}
    for path in sorted([*SERVICE.rglob("*.py"), *(ROOT / "training").rglob("*.py")]):
        if "proto" in path.parts:
            continue  # generated
        for value, _ in string_constants(path):
            if value in where:
                where[value].add(str(path.relative_to(ROOT)))
    assert all("service/contract.py" in modules for modules in where.values())
    spread = {name: sorted(modules) for name, modules in where.items() if len(modules) > 2}
    assert not spread, f"use service/contract.py's names instead of these strings: {spread}"


def test_the_counter_sees_a_name_written_out(tmp_path):
    path = tmp_path / "module.py"
    path.write_text('"""Mentions "queue_full" in a docstring, which is fine."""\nreason = "queue_full"\n'
                    'def f():\n    """queue_timeout"""\n    return {"fp32": 1}\n')
    assert sorted(string_constants(path)) == [("fp32", 5), ("queue_full", 2)]


def test_the_queued_routes_are_derived_from_the_views():
    """Shedding before the body is read follows the views' own declaration, so renaming a view cannot turn it off."""
    from service import create_app
    from service.api import QUEUED_ENDPOINTS
    from service.settings import Settings

    app = create_app(Settings.from_env({}), load_models=False)
    assert app.extensions[QUEUED_ENDPOINTS] == {"v1.classify", "v1.inspect", "v2.infer"}


# ---- a layout that explains itself ----------------------------------------------------------------------------------

GENERATED = ("_pb2.py", "_pb2_grpc.py")


def modules(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))
            if not path.name.endswith(GENERATED)]


@pytest.mark.parametrize("path", modules("service", "training", "bench", "tests"),
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_every_module_opens_with_one_line_that_says_what_it_owns(path):
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    lines = docstring.splitlines()
    assert lines and lines[0].strip(), "no module docstring"
    assert len(lines) == 1 or not lines[1].strip(), "the first line is not a summary of its own (a blank line follows)"
    assert len(lines[0]) <= 117, "the summary is longer than one line"


def development_map() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development"):]
    return section.split("```", 2)[1]


def test_the_readme_map_names_every_module_and_only_modules_that_exist():
    named = {PurePath(name).name for name in re.findall(r"[\w./]+\.py\b", development_map())}
    present = {path.name for path in modules("service", "training", "bench")}
    assert not present - named, f"README's development map misses {sorted(present - named)}"
    anywhere = {path.name for path in modules("service", "training", "bench", "tests", "deploy")}
    assert not named - anywhere, f"README's development map names modules that are gone: {sorted(named - anywhere)}"
    for package in ("service/", "  api/", "  proto/", "  static/", "training/", "model_store/", "tests/", "bench/",
                    "deploy/"):
        assert f"\n{package}" in development_map(), f"README's development map misses {package.strip()}"


def test_bench_and_tests_import_each_other_without_path_edits():
    """`python -m bench` and pytest both run from the repository root, where `bench`, `service` and `tests` import."""
    edits = [str(path.relative_to(ROOT)) for path in modules("bench", "tests", "service", "training")
             if path != Path(__file__) and "sys.path.insert" in path.read_text()]
    assert not edits, f"sys.path edited in {edits}"


def test_no_test_file_is_over_700_lines():
    """A test file that grows past this is doing two jobs: split it by what it tests (as tests/test_deploy_*.py)."""
    long = {str(path.relative_to(ROOT)): count for path in modules("tests")
            if (count := len(path.read_text().splitlines())) > 700}
    assert not long, f"split these: {long}"


INFERENCE_PATH_AND_CORE = ["pipeline", "inference_queue", "oip", "registry", "model", "verification", "preprocessing",
                           "visualize", "payload", "contract", "settings", "metadata", "errors", "metrics",
                           "metrics_files", "request_context", "logs", "tracing", "otlp_wire"]
WEB_LAYER = {"flask", "werkzeug", "flask_cors", "service.api", "service.inputs", "service.auth", "service.worker",
             "gunicorn"}


def imported_names(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it, by full dotted name (and each of its parents)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        found = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] + [f"{node.module}.{alias.name}" for alias in node.names] \
            if isinstance(node, ast.ImportFrom) and node.module else []
        for name in found:
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


@pytest.mark.parametrize("module", INFERENCE_PATH_AND_CORE)
def test_the_inference_path_and_the_core_import_nothing_of_the_web_layer(module):
    """So they run, and are tested, without Flask: the layers import downwards only."""
    assert not imported_names(SERVICE / f"{module}.py") & WEB_LAYER, f"service/{module}.py imports the web layer"
