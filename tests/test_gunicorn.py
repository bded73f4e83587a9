"""The service as deployed (real gunicorn, 2 sync workers): v2 client, multi-worker metrics, bad input, shutdown.

The client is a real v2 client; bad input must leave the service robust, and shutdown must be graceful."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import requests
import tritonclient.http as triton

from service.preprocessing import InputSpec, preprocess
from tests.helpers import GunicornServer, image_bytes, metric_value

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = GunicornServer(tmp_path_factory.mktemp("gunicorn"), WORKERS=2)
    running.wait_ready()
    yield running
    running.stop()


def v1_probabilities(server, model, payloads):
    files = [("image", (f"{i}.png", p, "image/png")) for i, p in enumerate(payloads)]
    body = requests.post(f"{server.url}/v1/models/{model}/classify", files=files, timeout=10).json()
    return np.array([list(p["probabilities"].values()) for p in body["predictions"]], dtype=np.float32)


def test_tritonclient_live_ready_metadata_infer(server):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("convnet") and client.is_model_ready("lenet", "3")
    assert client.get_server_metadata()["name"] == "convserve"
    metadata = client.get_model_metadata("lenet")
    assert metadata["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    preprocessing = requests.get(f"{server.url}/v1/models/lenet", timeout=5).json()["input"]["preprocessing"]
    spec = InputSpec.from_metadata(preprocessing)
    payloads = [image_bytes(seed=s) for s in (1, 2, 3)]
    batch = np.stack([preprocess(p, spec) for p in payloads])
    for binary in (True, False):
        tensor = triton.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        result = client.infer("lenet", [tensor], outputs=[triton.InferRequestedOutput("probabilities",
                                                                                      binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("probabilities"), v1_probabilities(server, "lenet", payloads),
                                   atol=1e-6)
        assert result.get_response()["model_name"] == "lenet"


def test_tritonclient_sends_encoded_images_as_bytes(server):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    payloads = [image_bytes("JPEG", 640, 480, seed=4), image_bytes(seed=5)]
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(payloads, dtype=np.object_), binary_data=True)
    result = client.infer("convnet", [tensor])
    np.testing.assert_allclose(result.as_numpy("probabilities"), v1_probabilities(server, "convnet", payloads),
                               atol=1e-6)
    # The "none of these" answer, as extra output tensors a v2 client reads like any other, in JSON or binary.
    v1 = requests.post(f"{server.url}/v1/models/convnet/classify", timeout=10,
                       files=[("image", (f"{i}", p)) for i, p in enumerate(payloads)]).json()["predictions"]
    for binary in (False, True):
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("in_domain", "domain_score")]
        answered = client.infer("convnet", [tensor], outputs=outputs)
        assert answered.as_numpy("in_domain").dtype == np.bool_ and answered.as_numpy("probabilities") is None
        assert answered.as_numpy("in_domain").tolist() == [p["in_domain"] for p in v1]
        np.testing.assert_allclose(answered.as_numpy("domain_score"), [p["domain_score"] for p in v1], atol=1e-6)


def test_tritonclient_sees_errors(server):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    with pytest.raises(triton.InferenceServerException, match="No model named"):
        client.get_model_metadata("missing")


def test_metrics_are_aggregated_over_workers(server):
    before = requests.get(f"{server.url}/metrics", timeout=5).text
    for index in range(30):
        # A new connection per request, so both workers take turns.
        response = requests.post(f"{server.url}/v1/models/lenet/classify", data=image_bytes(seed=index),
                                 headers={"Content-Type": "image/png", "Connection": "close"}, timeout=10)
        assert response.status_code == 200
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    route = {"route": "/v1/models/<name>/classify", "method": "POST", "status": "200"}
    assert metric_value(text, "convserve_requests_total", **route) - \
        metric_value(before, "convserve_requests_total", **route) == 30
    assert metric_value(text, "convserve_predictions_total", model="lenet") - \
        metric_value(before, "convserve_predictions_total", model="lenet") == 30
    assert metric_value(text, "convserve_batch_size_count", model="lenet") - \
        metric_value(before, "convserve_batch_size_count", model="lenet") == 30
    assert metric_value(text, "convserve_ready") == 1
    assert metric_value(text, "convserve_inference_threads") == 2  # one per worker, summed over both
    assert metric_value(text, "convserve_queue_depth") == 0
    assert metric_value(text, "convserve_model_info", model="convnet") == 1
    assert 'route="/healthz"' not in text and 'route="/metrics"' not in text
    counting_workers = {name.rsplit("_", 1)[1] for name in os.listdir(server.metrics_dir)
                        if name.startswith("counter_")}
    assert len(counting_workers) >= 2  # both workers counted requests, and /metrics summed them


def test_a_dead_worker_is_replaced_and_its_counts_kept(server):
    requests.post(f"{server.url}/v1/models/lenet/classify", data=image_bytes(), timeout=10,
                  headers={"Content-Type": "image/png"})
    before = metric_value(requests.get(f"{server.url}/metrics", timeout=5).text, "convserve_requests_total")
    victim = sorted(server.worker_pids())[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(server.worker_pids()) < 2 or victim in server.worker_pids()):
        time.sleep(0.2)
    assert victim not in server.worker_pids() and len(server.worker_pids()) == 2
    server.wait_ready()  # the replacement has loaded its models
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    assert metric_value(text, "convserve_requests_total") >= before  # counters of the dead worker survive
    assert metric_value(text, "convserve_requests_in_flight") == 0  # live workers only


def test_bad_input_never_crashes_a_worker(server):
    workers = server.worker_pids()
    hostile = [
        ("image/png", b"\x89PNG\r\n\x1a\n" + b"\xff" * 5000),
        ("image/jpeg", b"\xff\xd8\xff\xe0" + os.urandom(3000)),
        ("image/gif", b"GIF89a" + b"\x00" * 100),
        ("image/tiff", b"II*\x00" + os.urandom(500)),
        ("image/webp", b"RIFF\x00\x00\x00\x00WEBPVP8 " + os.urandom(100)),
        ("application/json", b'{"images": ["' + b"A" * 10000 + b'"]}'),
        ("application/json", b"\xff\xfe"),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nbroken"),
    ]
    for content_type, body in hostile:
        response = requests.post(f"{server.url}/v1/classify", data=body, headers={"Content-Type": content_type},
                                 timeout=10)
        assert 400 <= response.status_code < 500, (content_type, response.status_code, response.text)
        assert "Traceback" not in response.text
    assert server.worker_pids() == workers


def test_graceful_shutdown_drains_then_exits(tmp_path):
    draining = GunicornServer(tmp_path, WORKERS=1, DRAIN_SECONDS=2, DEFAULT_MODEL="lenet")
    try:
        draining.wait_ready()
        started = time.monotonic()
        draining.process.send_signal(signal.SIGTERM)
        saw_not_ready = False
        while time.monotonic() - started < 1.5:
            response = requests.get(f"{draining.url}/readyz", timeout=2)
            if response.status_code == 503:
                saw_not_ready = True
                assert response.json()["reason"] == "shutting down"
                served = requests.post(f"{draining.url}/v1/classify", data=image_bytes(), timeout=5,
                                       headers={"Content-Type": "image/png"})
                assert served.status_code == 200  # still serving while the load balancer drains
                break
            time.sleep(0.05)
        assert saw_not_ready, draining.log()
        assert draining.process.wait(timeout=30) == 0
        assert time.monotonic() - started >= 2
    finally:
        draining.stop()
