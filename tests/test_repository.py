"""The model repository API and the statistics and classification extensions over REST, with tritonclient.http.

The server is a real gunicorn with two workers: load and unload take effect in every worker before the call answers,
stay in force while the store is polled and when a worker is replaced, and a load that fails says why."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import SHIPPED_STORE
from tests.helpers import GunicornServer, image_bytes, metric_value, wait_until

pytestmark = pytest.mark.slow

KEY = "repository-key"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    for name in ("convnet", "lenet"):
        shutil.copytree(SHIPPED_STORE / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, store):
    running = GunicornServer(tmp_path_factory.mktemp("repository"), WORKERS=2, MODEL_STORE=store,
                             MODEL_POLL_SECONDS=0.5, API_KEYS=KEY)
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


HEADERS = {"Authorization": f"Bearer {KEY}"}
PNG = {**HEADERS, "Content-Type": "image/png"}


def loaded_everywhere(server, name: str, version: str) -> float:
    """convserve_model_loaded is the minimum over live workers: 1 only when every worker holds the version."""
    return metric_value(requests.get(server.url + "/metrics", timeout=5).text, "convserve_model_loaded",
                        model=name, version=version)


def test_the_repository_needs_a_key(server, client):
    for call in (client.get_model_repository_index, lambda: client.unload_model("lenet"),
                 lambda: client.load_model("lenet"), client.get_inference_statistics):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "401"


def test_unload_then_load_in_every_worker(server, client, store):
    index = client.get_model_repository_index(headers=HEADERS)
    assert {(m["name"], m["version"], m["state"]) for m in index} == {("convnet", "7", "READY"),
                                                                      ("lenet", "3", "READY")}
    client.unload_model("lenet", headers=HEADERS)
    try:
        assert loaded_everywhere(server, "lenet", "3") == 0  # every worker dropped it before the call answered
        for _ in range(8):  # fresh connections reach both workers
            answer = requests.post(server.url + "/v1/models/lenet/classify", data=image_bytes(), headers=PNG,
                                   timeout=10)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_unloaded", answer.text
            ready = requests.get(server.url + "/v2/models/lenet/ready", headers=HEADERS, timeout=10)
            assert ready.status_code == 404 and "unloaded" in ready.json()["error"]
        assert not client.is_model_ready("lenet", headers=HEADERS)
        entry = next(m for m in client.get_model_repository_index(headers=HEADERS) if m["name"] == "lenet")
        assert entry["state"] == "UNAVAILABLE" and "unloaded" in entry["reason"]
        ready_only = requests.post(server.url + "/v2/repository/index", json={"ready": True}, headers=HEADERS,
                                   timeout=10).json()
        assert [(m["name"], m["state"]) for m in ready_only] == [("convnet", "READY")]
        # polling (every 0.5 s here) sees a new version of it, and loads it no more than the others
        shutil.copytree(store / "lenet" / "3", store / "lenet" / ".staging")
        os.rename(store / "lenet" / ".staging", store / "lenet" / "5")
        try:
            wait_until(lambda: any(m["version"] == "5" for m in client.get_model_repository_index(headers=HEADERS)),
                       "a scan that sees lenet v5", timeout=10)
            entry = next(m for m in client.get_model_repository_index(headers=HEADERS) if m["version"] == "5")
            assert entry["state"] == "UNAVAILABLE" and "unloaded" in entry["reason"]
            assert requests.post(server.url + "/v1/models/lenet/classify", data=image_bytes(), headers=PNG,
                                 timeout=10).status_code == 404
        finally:
            shutil.rmtree(store / "lenet" / "5")
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200  # the default model serves
    finally:
        client.load_model("lenet", headers=HEADERS)
    assert loaded_everywhere(server, "lenet", "3") == 1
    assert client.is_model_ready("lenet", headers=HEADERS)
    for _ in range(8):
        assert requests.post(server.url + "/v1/models/lenet/classify", data=image_bytes(), headers=PNG,
                             timeout=10).status_code == 200


def test_an_unload_outlives_a_replaced_worker(server, client):
    client.unload_model("lenet", headers=HEADERS)
    try:
        victim = min(server.worker_pids())
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(server.worker_pids() - {victim}) == 2 and server.all_workers_ready(),
                   "a replacement worker ready", timeout=60)
        assert loaded_everywhere(server, "lenet", "3") == 0
        assert not client.is_model_ready("lenet", headers=HEADERS)
    finally:
        client.load_model("lenet", headers=HEADERS)
    assert loaded_everywhere(server, "lenet", "3") == 1


def test_a_load_picks_up_a_new_version_now_and_says_why_one_fails(server, client, store):
    shutil.copytree(store / "lenet" / "3", store / "lenet" / ".staging")
    metadata = json.loads((store / "lenet" / ".staging" / "metadata.json").read_text())
    metadata["files"]["model"]["sha256"] = "0" * 64  # a checksum that cannot match: the version fails to load
    (store / "lenet" / ".staging" / "metadata.json").write_text(json.dumps(metadata))
    os.rename(store / "lenet" / ".staging", store / "lenet" / "4")
    try:
        with pytest.raises(InferenceServerException) as failed:
            client.load_model("lenet", headers=HEADERS)
        assert failed.value.status() == "400" and "sha256" in failed.value.message().lower(), failed.value.message()
        entry = next(m for m in client.get_model_repository_index(headers=HEADERS) if m["version"] == "4")
        assert entry["state"] == "UNAVAILABLE" and entry["reason"]
    finally:
        shutil.rmtree(store / "lenet" / "4")
    client.load_model("lenet", headers=HEADERS)  # the store is right again: it serves
    with pytest.raises(InferenceServerException) as missing:
        client.load_model("nosuchmodel", headers=HEADERS)
    assert missing.value.status() == "404"


def test_statistics_and_classification_over_rest(server, client):
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([image_bytes(seed=1), image_bytes(seed=2)], dtype=object))
    before = client.get_inference_statistics("lenet", headers=HEADERS)["model_stats"][0]
    for binary in (True, False):
        ranked = client.infer("lenet", [tensor], headers=dict(HEADERS), outputs=[  # it adds to the dict
            triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]).as_numpy("probabilities")
        assert ranked.shape == (2, 3)
        scores = [[float((entry.decode() if isinstance(entry, bytes) else entry).split(":")[0]) for entry in row]
                  for row in ranked]
        assert all(row == sorted(row, reverse=True) for row in scores)
    after = client.get_inference_statistics("lenet", "3", headers=HEADERS)["model_stats"][0]
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 2
    assert after["inference_count"] - before["inference_count"] == 4
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0
    unknown = requests.get(server.url + "/v2/models/nosuch/stats", headers=HEADERS, timeout=5)
    assert unknown.status_code == 404 and "error" in unknown.json()
