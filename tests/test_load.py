"""Hostile and heavy load against the service as deployed (real gunicorn, the gevent worker), at small scale.

Covered: slow and idle clients, overload shedding, health under load, kill -9 and SIGTERM under load.

Only behaviour is asserted here; how fast is `make bench`'s job (full scale, timings as ratios in one run)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.helpers import GunicornServer, image_bytes, metric_value

pytestmark = pytest.mark.slow

PNG = image_bytes()


def classify(url: str, body: bytes = PNG, content_type: str = "image/png", timeout: float = 20) -> requests.Response:
    return requests.post(f"{url}/v1/classify", data=body, timeout=timeout,
                         headers={"Content-Type": content_type, "Connection": "close"})


def open_socket(server: GunicornServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.fixture()
def one_worker(tmp_path):
    """One worker with one inference thread: anything that could block it would block the whole server."""
    running = GunicornServer(tmp_path, WORKERS=1, INFERENCE_THREADS=1, DEFAULT_MODEL="lenet", BODY_TIMEOUT=2,
                             KEEPALIVE=2)
    running.wait_ready()
    yield running
    running.stop()


def test_slow_and_idle_clients_cost_other_clients_nothing(one_worker):
    server = one_worker
    trickling, idle, slow_headers = [], [], []
    for _ in range(10):  # headers, then a body at a few bytes a second
        sock = open_socket(server)
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000\r\n\r\n" + PNG[:10])
        trickling.append(sock)
    for _ in range(5):  # connected, silent
        idle.append(open_socket(server))
    for _ in range(5):  # a request line, then nothing
        sock = open_socket(server)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost")
        slow_headers.append(sock)
    # A sync worker would now sit in a blocking read: these would time out.
    for _ in range(10):
        assert requests.get(f"{server.url}/healthz", timeout=2).status_code == 200
        assert classify(server.url, timeout=2).status_code == 200
    assert requests.get(f"{server.url}/metrics", timeout=2).status_code == 200
    for sock in trickling:
        sock.sendall(PNG[10:12])

    # BODY_TIMEOUT (2 s): each trickled body gets a 408 JSON answer, then the connection is closed.
    for sock in trickling:
        answer = read_until_closed(sock, timeout=10)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"application/json" in head and b'"request_timeout"' in body and b"BODY_TIMEOUT" in body
        assert b"connection: close" in head.lower()
    # KEEPALIVE (2 s) bounds silent connections and unfinished headers: closed without an answer.
    for sock in idle + slow_headers:
        assert read_until_closed(sock, timeout=10) == b""
    for sock in trickling + idle + slow_headers:
        sock.close()
    assert classify(server.url).status_code == 200
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    assert metric_value(text, "convserve_requests_total", route="/v1/classify", status="408") == 10


def test_a_keep_alive_connection_serves_several_requests_then_idles_out(one_worker):
    session = requests.Session()
    for _ in range(3):
        assert session.post(f"{one_worker.url}/v1/classify", data=PNG, headers={"Content-Type": "image/png"},
                            timeout=5).status_code == 200
    assert session.get(f"{one_worker.url}/readyz", timeout=5).status_code == 200


def test_chunked_bodies_are_limited_like_any_other(tmp_path):
    server = GunicornServer(tmp_path, WORKERS=1, DEFAULT_MODEL="lenet", MAX_UPLOAD_BYTES=50_000)
    try:
        server.wait_ready()

        def chunks(total):
            for _ in range(total // 10_000):
                yield b"\0" * 10_000

        response = requests.post(f"{server.url}/v1/classify", data=chunks(100_000), timeout=10,
                                 headers={"Content-Type": "image/png"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
        response = requests.post(f"{server.url}/v1/classify", data=iter([PNG]), timeout=10,
                                 headers={"Content-Type": "image/png"})
        assert response.status_code == 200  # a chunked body under the limit is read whole
    finally:
        server.stop()


@pytest.fixture()
def small_queue(tmp_path):
    running = GunicornServer(tmp_path, WORKERS=1, INFERENCE_THREADS=1, MAX_QUEUE=2, QUEUE_TIMEOUT=0.5,
                             DEFAULT_MODEL="convnet")
    running.wait_ready()
    yield running
    running.stop()


def test_overload_is_shed_promptly_with_503_and_health_stays_up(small_queue):
    server = small_queue
    batch = [("image", (f"{i}.jpg", image_bytes("JPEG", 640, 480, seed=i), "image/jpeg")) for i in range(16)]

    def heavy(_):
        return requests.post(f"{server.url}/v1/classify", files=batch, timeout=30, headers={"Connection": "close"})

    probes = []

    def probe_health(stop):
        while not stop.is_set():
            for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
                probes.append(requests.get(server.url + path, timeout=5).status_code)
            time.sleep(0.02)

    stop = threading.Event()
    prober = threading.Thread(target=probe_health, args=(stop,))
    prober.start()
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(heavy, range(48)))
    stop.set()
    prober.join(10)

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "overloaded"
            assert int(response.headers["Retry-After"]) >= 1
        else:
            assert len(response.json()["predictions"]) == 16
    assert probes and set(probes) == {200}

    text = requests.get(f"{server.url}/metrics", timeout=5).text
    shed = metric_value(text, "convserve_shed_total")
    assert shed == statuses.count(503)
    assert metric_value(text, "convserve_shed_total", reason="queue_full") + \
        metric_value(text, "convserve_shed_total", reason="queue_timeout") == shed
    assert metric_value(text, "convserve_queue_wait_seconds_count") >= statuses.count(200)
    assert metric_value(text, "convserve_queue_depth") == 0  # nothing left waiting
    assert metric_value(text, "convserve_inference_threads") == 1


def test_v2_sheds_in_the_protocol_error_form(small_queue):
    server = small_queue
    import base64

    encoded = base64.b64encode(image_bytes("JPEG", 640, 480)).decode()
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [16], "data": [encoded] * 16}]}

    def infer(_):
        return requests.post(f"{server.url}/v2/models/convnet/infer", json=body, timeout=30,
                             headers={"Connection": "close"})

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(infer, range(48)))
    shed = [r for r in responses if r.status_code == 503]
    assert shed and all(r.status_code in (200, 503) for r in responses)
    assert all(set(r.json()) == {"error"} and "overloaded" in r.json()["error"] and r.headers["Retry-After"]
               for r in shed)


def test_kill_9_under_load_fails_at_most_the_requests_that_worker_held(tmp_path):
    server = GunicornServer(tmp_path, WORKERS=2, DEFAULT_MODEL="lenet")
    clients = 6
    try:
        server.wait_ready()
        before = metric_value(requests.get(f"{server.url}/metrics", timeout=5).text, "convserve_requests_total")
        outcomes, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    outcomes.append(classify(server.url, timeout=10).status_code)
                except requests.RequestException as exc:
                    outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        victim = sorted(server.worker_pids())[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.5)
        server.wait_ready()  # the master replaced the worker and it has loaded its models
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(15)
        failed = [outcome for outcome in outcomes if outcome != 200]
        assert len(failed) <= clients, failed  # each client had at most one request in that worker
        assert outcomes.count(200) > 50
        assert victim not in server.worker_pids() and len(server.worker_pids()) == 2
        after = metric_value(requests.get(f"{server.url}/metrics", timeout=5).text, "convserve_requests_total")
        assert after >= before + outcomes.count(200) - 2 * clients  # the dead worker's counts were kept
    finally:
        server.stop()


def test_sigterm_under_load_loses_nothing_for_clients_that_honour_readiness(tmp_path):
    server = GunicornServer(tmp_path, WORKERS=2, DEFAULT_MODEL="lenet", DRAIN_SECONDS=2, KEEPALIVE=2)
    server.wait_ready()
    outcomes, not_ready = [], threading.Event()

    def poll_readiness():
        while not not_ready.is_set():
            try:
                if requests.get(f"{server.url}/readyz", timeout=2).status_code == 503:
                    not_ready.set()
            except requests.RequestException:
                not_ready.set()
            time.sleep(0.05)

    def client():
        session = requests.Session()  # keep-alive, as a load balancer's pool would
        while not not_ready.is_set():
            try:
                outcomes.append(session.post(f"{server.url}/v1/classify", data=PNG, timeout=10,
                                             headers={"Content-Type": "image/png"}).status_code)
            except requests.RequestException as exc:
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(8)] + [threading.Thread(target=poll_readiness)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(20)
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
    assert not_ready.is_set()
    assert outcomes and set(outcomes) == {200}, [o for o in outcomes if o != 200][:5]
    assert len(outcomes) > 50


def test_concurrent_requests_batched_together_get_their_own_answers(tmp_path):
    """Requests that wait together share one ONNX Runtime call; each still gets exactly its own probabilities."""
    server = GunicornServer(tmp_path, WORKERS=1, INFERENCE_THREADS=1, DEFAULT_MODEL="convnet",
                            QUEUE_TIMEOUT=30)  # every request answered, however slow the machine: none shed
    try:
        server.wait_ready()
        bodies = [[image_bytes("JPEG", 320, 240, seed=seed) for seed in range(count)] for count in (1, 3, 2, 1) * 6]

        def post(images):
            files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
            response = requests.post(f"{server.url}/v1/classify", files=files, timeout=30)
            assert response.status_code == 200, response.text
            return [p["probabilities"] for p in response.json()["predictions"]]

        alone = [post(images) for images in bodies[:4]]
        with ThreadPoolExecutor(24) as pool:
            together = list(pool.map(post, bodies))
        for index, answer in enumerate(together):
            expected = alone[index % 4]
            assert len(answer) == len(expected)
            for got, want in zip(answer, expected):
                assert got == pytest.approx(want, abs=1e-5)
        text = requests.get(f"{server.url}/metrics", timeout=5).text
        calls = metric_value(text, "convserve_batch_size_count", model="convnet")
        images = metric_value(text, "convserve_batch_size_sum", model="convnet")
        assert images == sum(len(b) for b in bodies[:4]) + sum(len(b) for b in bodies)
        assert calls < 4 + len(bodies)  # some requests shared a call
    finally:
        server.stop()


def test_v2_infer_is_batched_with_v1_classify(tmp_path):
    """/v2 infer (encoded images and preprocessed FP32 tensors) and /v1 classify requests for one version that wait
    together share ONNX Runtime calls; each gets its own answer, as it gets alone."""
    import base64

    server = GunicornServer(tmp_path, WORKERS=1, INFERENCE_THREADS=1, DEFAULT_MODEL="convnet", QUEUE_TIMEOUT=30)
    tensor = np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32)
    jpeg = [image_bytes("JPEG", 320, 240, seed=seed) for seed in range(3)]

    def classify(_):
        files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(jpeg)]
        answer = requests.post(f"{server.url}/v1/classify", files=files, timeout=30)
        assert answer.status_code == 200, answer.text
        return [list(p["probabilities"].values()) for p in answer.json()["predictions"]]

    def infer(kind):
        tensors = {"bytes": {"name": "image", "datatype": "BYTES", "shape": [3],
                             "data": [base64.b64encode(data).decode() for data in jpeg]},
                   "fp32": {"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32],
                            "data": tensor.ravel().tolist()}}
        answer = requests.post(f"{server.url}/v2/models/convnet/infer", timeout=30,
                               json={"inputs": [tensors[kind]], "outputs": [{"name": "probabilities"}]})
        assert answer.status_code == 200, answer.text
        flat = answer.json()["outputs"][0]["data"]
        return [flat[i:i + 4] for i in range(0, len(flat), 4)]

    calls = {"classify": classify, "bytes": infer, "fp32": infer}
    try:
        server.wait_ready()
        alone = {kind: call(kind) for kind, call in calls.items()}
        before = metric_value(requests.get(f"{server.url}/metrics", timeout=5).text, "convserve_batch_size_count",
                              model="convnet")
        kinds = list(calls) * 8
        with ThreadPoolExecutor(len(kinds)) as pool:
            together = list(pool.map(lambda kind: (kind, calls[kind](kind)), kinds))
        for kind, answer in together:
            assert np.allclose(answer, alone[kind], atol=1e-5), kind
        executions = metric_value(requests.get(f"{server.url}/metrics", timeout=5).text, "convserve_batch_size_count",
                                  model="convnet") - before
        assert executions < len(kinds), "no request shared an ONNX Runtime call"
    finally:
        server.stop()
