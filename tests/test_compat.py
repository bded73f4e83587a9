"""The borrowed gunicorn and Werkzeug internals (service/compat.py): present where they ship, each absence named.

Each internal is present in the versions that ship, and each one's absence stops gunicorn's start with one line naming
it. The absence is simulated with a sitecustomize module that removes the internal before gunicorn starts, as an
upgrade that dropped it would."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service import compat
from tests.helpers import free_port
from tests.test_settings import GUNICORN, ROOT, clean_environ

# How to remove each borrowed internal, as Python run before anything else in the process.
REMOVALS = {
    "gunicorn.workers.base.util": """
        from gunicorn.workers import base
        del base.util
    """,
    "gunicorn.http.wsgi.Response.force_close": """
        from gunicorn.http import wsgi
        del wsgi.Response.force_close
    """,
    "gunicorn.workers.ggevent.GeventWorker": """
        from gunicorn.workers import base, ggevent
        ggevent.GeventWorker.handle = None  # a worker API that changed shape
    """,
    "werkzeug.routing.Rule._converters": """
        from werkzeug.routing import rules
        compile = rules.Rule.compile
        def compile_without_converters(self):
            compile(self)
            del self._converters
        rules.Rule.compile = compile_without_converters
    """,
}


def test_every_borrowed_internal_is_present_and_has_a_removal_test():
    compat.check()
    assert sorted(REMOVALS) == sorted(borrowed.name for borrowed in compat.BORROWED)


@pytest.mark.parametrize("name", sorted(REMOVALS))
def test_a_missing_internal_stops_the_start_with_one_line_naming_it(name, tmp_path: Path):
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(REMOVALS[name]))
    result = subprocess.run(GUNICORN, env=clean_environ(PORT=str(free_port()), PYTHONPATH=str(tmp_path)), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"convserve: {name} is missing from ") and "deploy/constraints.txt" in line, line
    assert result.stdout == ""


def test_the_check_names_what_is_missing_in_process(monkeypatch):
    from gunicorn.http import wsgi

    monkeypatch.delattr(wsgi.Response, "force_close")
    with pytest.raises(compat.MissingInternal) as raised:
        compat.check()
    assert raised.value.borrowed.name == "gunicorn.http.wsgi.Response.force_close"
    assert f"gunicorn {sys.modules['gunicorn'].__version__}" in str(raised.value)


def test_pyproject_allows_only_the_tested_major_of_each_package_borrowed_from():
    """An internal can go in any release, so the range is the pinned (tested) major, from the pinned minor on."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = dict(line.split("==") for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {canonicalize_name(name): version.split("#")[0].strip() for name, version in pins.items()}
    requirements = {canonicalize_name(r.name): r for r in map(
        Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])}
    for package in sorted({borrowed.name.split(".")[0] for borrowed in compat.BORROWED}):
        major, minor = map(int, pins[package].split(".")[:2])
        assert str(requirements[package].specifier) == f"<{major + 1},>={major}.{minor}", \
            f"pyproject: {requirements[package]}; deploy/constraints.txt tests {package}=={pins[package]}"
