"""Operating it: model versions that come and go while serving, which version serves, and API keys.

Versions come and go under MODEL_POLL_SECONDS, MODEL_VERSION_POLICY picks the one that serves, and the keys come from
API_KEYS and API_KEYS_FILE. Unit level with the app, then end to end with real gunicorn under continuous load and a
real tritonclient."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton

from service import create_app, metrics
from service.auth import KeyFileError
from service.registry import ModelRegistry
from service.settings import Settings
from tests.conftest import wait_ready
from tests.helpers import GunicornServer, image_bytes, metric_value

PNG = image_bytes()


def publish(store: Path, name: str, version: str, source: Path) -> None:
    """The supported way: stage beside the versions, then rename (atomic), as the exporter does."""
    staging = store / name / f".staging-{version}"
    shutil.copytree(source, staging)
    staging.rename(store / name / version)


def unpublish(store: Path, name: str, version: str) -> None:
    trash = store / name / f".removed-{version}"
    (store / name / version).rename(trash)
    shutil.rmtree(trash)


# --- API keys --------------------------------------------------------------------------------------------------------

@pytest.fixture()
def keyed_client(lenet_store, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated 2026-11\nfile-key\n\n")
    app = create_app(Settings.from_env({}, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet", API_KEYS="env-key, other",
                                       API_KEYS_FILE=str(keys_file)))
    wait_ready(app)
    return app.test_client()


def failures(reason: str) -> float:
    return metrics.AUTH_FAILURES.labels(reason)._value.get()


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/models/lenet/classify", "/v2/models/lenet/infer"])
def test_without_a_key_the_api_answers_401(keyed_client, path):
    before = failures("missing")
    response = keyed_client.post(path, data=PNG, content_type="image/png")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="convserve"'
    body = response.get_json()
    if path.startswith("/v2"):
        assert set(body) == {"error"} and "key" in body["error"]
    else:
        assert body["error"]["code"] == "unauthorized" and "Authorization: Bearer" in body["error"]["message"]
    assert failures("missing") == before + 1


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer nope"}, {"X-API-Key": "env-key-but-longer"},
                                     {"Authorization": "Basic ZW52LWtleQ=="}, {"X-API-Key": "#"}])
def test_a_wrong_key_is_401(keyed_client, headers):
    response = keyed_client.get("/v1/models", headers=headers)
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer env-key"}, {"Authorization": "bearer other"},
                                     {"X-API-Key": "file-key"}, {"X-API-Key": " env-key "}])
def test_a_known_key_in_either_header_is_served(keyed_client, headers):
    response = keyed_client.post("/v1/classify", data=PNG, content_type="image/png", headers=headers)
    assert response.status_code == 200 and response.get_json()["predictions"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/", "/openapi.json", "/v2/health/live",
                                  "/v2/health/ready"])
def test_health_metrics_page_and_document_stay_open(keyed_client, path):
    assert keyed_client.get(path).status_code == 200


def test_keys_are_off_unless_configured(client):
    assert client.post("/v1/classify", data=PNG, content_type="image/png").status_code == 200


def test_an_unreadable_or_empty_keys_file_stops_the_start(lenet_store, tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        create_app(Settings.from_env({}, MODEL_STORE=lenet_store, API_KEYS_FILE=str(tmp_path / "missing")),
                   load_models=False)
    placeholder = tmp_path / "keys"
    placeholder.write_text("# replace me with real keys, one per line\n\n")
    with pytest.raises(KeyFileError, match="holds no key"):
        create_app(Settings.from_env({}, MODEL_STORE=lenet_store, API_KEYS_FILE=str(placeholder)),
                   load_models=False)


# --- versions while serving ----------------------------------------------------------------------------------------

@pytest.fixture()
def registry_for(lenet_store):
    def build(**overrides) -> ModelRegistry:
        registry = ModelRegistry(Settings.from_env({}, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet",
                                                   MODEL_POLL_SECONDS=0, **overrides))
        registry.load_all()
        return registry

    return build


def test_a_rescan_loads_new_versions_and_drops_removed_ones(registry_for, lenet_store):
    registry = registry_for()
    original = lenet_store / "lenet" / "1"
    shutil.copytree(original, lenet_store / "lenet" / ".staging-2")  # half-published: never looked at
    (lenet_store / "lenet" / "3").mkdir()  # being copied, no metadata.json yet: skipped, not failed
    registry.rescan()
    assert registry.loaded_versions("lenet") == ["1"] and registry.failure("lenet", "3") is None
    (lenet_store / "lenet" / ".staging-2").rename(lenet_store / "lenet" / "2")
    registry.rescan()
    assert registry.loaded_versions("lenet") == ["1", "2"] and registry.get("lenet").version == "2"
    held = registry.get("lenet")
    unpublish(lenet_store, "lenet", "2")
    registry.rescan()
    assert registry.loaded_versions("lenet") == ["1"] and registry.get("lenet").version == "1"
    # An in-flight holder finishes on the version it holds.
    assert held.predict(np.zeros((1, 3, 32, 32), np.float32)).probabilities.shape == (1, 4)
    assert registry.ready


def test_a_new_version_that_fails_leaves_the_previous_one_serving(registry_for, lenet_store):
    registry = registry_for()
    publish(lenet_store, "lenet", "2", lenet_store / "lenet" / "1")
    (lenet_store / "lenet" / "2" / "model.onnx").write_bytes(b"tampered")
    counted = metrics.MODEL_LOAD_FAILURES.labels("lenet", "2")._value.get()
    registry.rescan()
    assert registry.get("lenet").version == "1" and registry.ready
    assert "sha256" in registry.failure("lenet", "2").reason
    registry.rescan()  # the same broken folder is not loaded again at every scan
    assert metrics.MODEL_LOAD_FAILURES.labels("lenet", "2")._value.get() == counted + 1
    shutil.copy(lenet_store / "lenet" / "1" / "model.onnx", lenet_store / "lenet" / "2" / "model.onnx")
    registry.rescan()  # repaired in place: tried again
    assert registry.get("lenet").version == "2" and registry.failure("lenet", "2") is None


def test_the_version_policy_pins_what_serves(registry_for, lenet_store):
    publish(lenet_store, "lenet", "2", lenet_store / "lenet" / "1")
    pinned = registry_for(MODEL_VERSION_POLICY="lenet=1")
    assert pinned.get("lenet").version == "1" and pinned.get("lenet", "2").version == "2"
    assert pinned.describe("lenet")["default_version"] == "1"
    missing = registry_for(MODEL_VERSION_POLICY="lenet=7")
    assert "pinned to version 7" in missing.readiness_problem()
    with pytest.raises(ValueError, match="MODEL_VERSION_POLICY"):
        assert Settings.from_env({}, MODEL_VERSION_POLICY="lenet:1").version_pins is None


# --- end to end ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_versions_come_and_go_under_load_without_a_failed_request(lenet_store, tmp_path):
    poll = 1.0
    server = GunicornServer(tmp_path, WORKERS=2, DEFAULT_MODEL="lenet", MODEL_STORE=lenet_store,
                            MODEL_POLL_SECONDS=poll)
    outcomes, versions, not_ready, stop = [], [], [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                response = requests.post(f"{server.url}/v1/classify", data=PNG, timeout=10,
                                         headers={"Content-Type": "image/png", "Connection": "close"})
                outcomes.append(response.status_code)
                versions.append((time.monotonic(), response.json().get("version")))
            except requests.RequestException as exc:
                outcomes.append(type(exc).__name__)

    def readiness():
        while not stop.is_set():
            if requests.get(f"{server.url}/readyz", timeout=10).status_code != 200:
                not_ready.append(time.monotonic())
            time.sleep(0.05)

    def served_everywhere(version: str, since: float) -> float:
        """Seconds until 20 answers in a row (from both workers) come from ``version``."""
        deadline = since + 30
        while time.monotonic() < deadline:
            recent = [v for t, v in versions[-20:] if t > since]
            if len(recent) == 20 and set(recent) == {version}:
                return versions[-20][0] - since
            time.sleep(0.05)
        raise AssertionError(f"version {version} not served: {versions[-20:]}")

    threads = [threading.Thread(target=load) for _ in range(4)] + [threading.Thread(target=readiness)]
    try:
        server.wait_ready()
        for thread in threads:
            thread.start()
        time.sleep(1)
        published = time.monotonic()
        publish(lenet_store, "lenet", "2", lenet_store / "lenet" / "1")
        assert served_everywhere("2", published) <= 2 * poll  # within two polling periods, warm-up included
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        assert metric_value(text, "convserve_model_served", model="lenet", version="2") == 1
        assert metric_value(text, "convserve_model_loaded", model="lenet", version="2") == 1
        removed = time.monotonic()
        unpublish(lenet_store, "lenet", "2")
        assert served_everywhere("1", removed) <= 2 * poll
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        server.stop()
    assert outcomes and set(outcomes) == {200}, [o for o in outcomes if o != 200][:5]
    assert not not_ready, "readiness left 200 while versions changed"
    assert "unloaded model lenet version 2" in server.log()


@pytest.mark.slow
def test_tritonclient_sends_its_key(lenet_store, tmp_path):
    server = GunicornServer(tmp_path, WORKERS=1, DEFAULT_MODEL="lenet", MODEL_STORE=lenet_store,
                            API_KEYS="s3cret-key")
    try:
        server.wait_ready()
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        assert client.is_server_ready()  # /v2/health/ready stays open for probes
        with pytest.raises(triton.InferenceServerException, match="key"):
            client.get_model_metadata("lenet")
        headers = {"Authorization": "Bearer s3cret-key"}
        assert client.get_model_metadata("lenet", headers=headers)["name"] == "lenet"
        tensor = triton.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([PNG], dtype=np.object_))
        result = client.infer("lenet", [tensor], headers=headers)
        assert result.as_numpy("probabilities").shape == (1, 4)
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        assert metric_value(text, "convserve_auth_failures_total", reason="missing") >= 1
        assert "s3cret-key" not in server.log()
    finally:
        server.stop()
