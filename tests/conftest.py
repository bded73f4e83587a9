"""The shared fixtures: settings, app and client on the shipped model store or a copy, and the deploy manifests.

The fixtures chain settings → app → client. The shipped model store is used read-only; tests that change a store work
on a copy in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service import create_app
from service.settings import Settings
from tests.deploy_artefacts import (  # noqa: F401 - the rendered manifests, as fixtures for tests/test_deploy_*.py
    all_docs,
    base_docs,
    kserve_docs,
    model_version_job,
    model_volume_docs,
    queue_docs,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_STORE = REPO / "model_store"
SHIPPED_MODELS = sorted(p.name for p in SHIPPED_STORE.iterdir() if p.is_dir() and not p.name.startswith("."))


def wait_ready(app, timeout: float = 30.0) -> None:
    assert app.extensions["convserve"].registry.loading_done.wait(timeout), "models did not load in time"


@pytest.fixture(scope="session")
def shipped_settings() -> Settings:
    return Settings.from_env({}, MODEL_STORE=SHIPPED_STORE)


@pytest.fixture(scope="session")
def app(shipped_settings):
    application = create_app(shipped_settings)
    wait_ready(application)
    return application


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def lenet_store(tmp_path) -> Path:
    """A private store holding a copy of the shipped lenet model, as its version 1."""
    store = tmp_path / "store"
    shipped = max((SHIPPED_STORE / "lenet").iterdir(), key=lambda path: int(path.name))
    shutil.copytree(shipped, store / "lenet" / "1", ignore=shutil.ignore_patterns("*.png"))
    return store


@pytest.fixture()
def make_client():
    """Build an app on given settings and return a ready test client."""

    def build(**overrides):
        settings = Settings.from_env({}, **overrides)
        application = create_app(settings)
        wait_ready(application)
        return application.test_client()

    return build


# In CI nothing may be skipped: a skipped test hides a missing install step.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    import os

    if os.environ.get("CI") and _skipped and exitstatus == 0:
        print(f"\nCI: {len(_skipped)} test(s) were skipped, which CI does not allow: {_skipped[:5]}")
        session.exitstatus = 1
