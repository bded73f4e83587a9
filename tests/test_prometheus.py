"""A real Prometheus server scrapes a real gunicorn process (2 workers); values are checked through its HTTP API."""

from __future__ import annotations

import io
import shutil
import subprocess
import time

import pytest
import requests

from tests.helpers import GunicornServer, free_port, image_bytes, wait_for

pytestmark = pytest.mark.slow
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    assert PROMETHEUS, "prometheus is not installed: apt-get install prometheus (.ci/run does this)"
    folder = tmp_path_factory.mktemp("prometheus")
    service = GunicornServer(folder, WORKERS=2)
    service.wait_ready()
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: convserve
    static_configs:
      - targets: ["127.0.0.1:{service.port}"]
""")
    log = (folder / "prometheus.log").open("wb")
    prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/-/ready", 200, 60, prometheus)
        yield service, f"http://127.0.0.1:{port}"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        log.close()
        service.stop()


def query(prometheus: str, expression: str) -> float | None:
    body = requests.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=5).json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def eventually(prometheus: str, expression: str, expected: float, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = query(prometheus, expression)
        if value == expected:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{expression} = {value}, expected {expected}")


def test_prometheus_sees_the_known_traffic(stack):
    service, prometheus = stack
    eventually(prometheus, 'up{job="convserve"}', 1)
    for seed in range(6):  # 6 single-image requests to the default model
        requests.post(f"{service.url}/v1/classify", data=image_bytes(seed=seed), timeout=10,
                      headers={"Content-Type": "image/png", "Connection": "close"}).raise_for_status()
    files = [("image", (f"{i}.png", io.BytesIO(image_bytes(seed=i)), "image/png")) for i in range(4)]
    requests.post(f"{service.url}/v1/models/lenet/classify", files=files, timeout=10).raise_for_status()
    for _ in range(3):  # 3 client errors
        requests.post(f"{service.url}/v1/classify", data=b"junk", headers={"Content-Type": "image/png"}, timeout=10)
    requests.get(f"{service.url}/healthz", timeout=5)

    eventually(prometheus, 'sum(convserve_requests_total{route="/v1/classify",status="200"})', 6)
    eventually(prometheus, 'sum(convserve_requests_total{route="/v1/classify",status="400"})', 3)
    eventually(prometheus, 'sum(convserve_requests_total{route="/v1/models/<name>/classify",status="200"})', 1)
    eventually(prometheus, 'sum(convserve_predictions_total{model="convnet"})', 6)
    eventually(prometheus, 'sum(convserve_predictions_total{model="lenet"})', 4)
    eventually(prometheus, 'sum(convserve_batch_size_sum{model="lenet"})', 4)
    eventually(prometheus, 'sum(convserve_inference_duration_seconds_count{model="convnet"})', 6)
    eventually(prometheus, 'sum(convserve_request_duration_seconds_count{route="/v1/classify"})', 9)
    eventually(prometheus, 'count(convserve_model_info)', 2)
    eventually(prometheus, "convserve_ready", 1)
    eventually(prometheus, "convserve_requests_in_flight", 0)
    assert query(prometheus, 'count(convserve_requests_total{route="/healthz"})') is None
    # Over all requests so far (the series are new, so a rate() window may not hold two samples of them yet).
    p99 = query(prometheus, "histogram_quantile(0.99, sum by (le) "
                            '(convserve_request_duration_seconds_bucket{route="/v1/classify"}))')
    assert p99 is not None and 0 < p99 < 10
