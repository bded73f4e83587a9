"""The container image, built and run for real (`make test-image`; marker `image`).

Builds the image with deploy/build-image.sh (docker when an engine answers, else buildah; a local Debian base when
python:3.11-slim-bookworm cannot be pulled), then runs the image's own command, as the image's own user, with
`buildah run --isolation chroot` (no daemon, host network) on a free port, and checks the service as a client would:
/readyz, /v1/classify, /v2 inference, /metrics, the HEALTHCHECK command, the UID of the serving processes, no
build tools in the image, and a graceful SIGTERM. The image size and timings go to stdout and
artifacts/image-report.json.

Needs root and buildah (and debootstrap + podman the first time, for the base image). Without them every test FAILS
with what to install: CI must not pass by skipping.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from service.api.docs import SWAGGER_UI_FILES
from service.settings import Settings

pytestmark = [pytest.mark.image, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("CONVSERVE_TEST_IMAGE", "convserve:latest")
REPORT = ROOT / "artifacts" / "image-report.json"
UID = 10001
LABELS = {"dog", "cat", "boat", "bird"}
SIZE_BUDGET_BYTES = 500 * 10**6  # the runtime image: Python + ONNX Runtime + numpy + the models
READY_TIMEOUT_S = 120
DRAIN_SECONDS = 2  # the server under test drains this long on SIGTERM (the image's default is 0)

report: dict = {"image": IMAGE}


def sh(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(color=(40, 90, 200), size=(32, 32)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class BuiltImage:
    name: str
    config: dict
    env: dict[str, str]
    size_bytes: int

    @property
    def settings(self) -> Settings:
        """What the service in the image runs with: its ENV over the settings' defaults."""
        return Settings.from_env(self.env)


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    started_at: float
    ready_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    grpc_target: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def gunicorn_processes(port: int) -> list[int]:
    """PIDs of the gunicorn processes serving on this port (found by the PORT in their environment)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"gunicorn") for part in cmdline[:2]) and f"PORT={port}".encode() in environ:
            pids.append(int(entry.name))
    return sorted(pids)


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def master_pid(port: int) -> int:
    pids = gunicorn_processes(port)
    masters = [pid for pid in pids if int(proc_status(pid)["PPid"]) not in pids]
    assert len(masters) == 1, f"expected one gunicorn master on port {port}, found {masters} among {pids}"
    return masters[0]


# ---- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tools():
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (buildah --isolation chroot and debootstrap need it)")
    if not shutil.which("buildah"):
        problems.append("apt-get install buildah")
    if problems:
        pytest.fail("the image tests cannot run here: " + "; ".join(problems))


@pytest.fixture(scope="module")
def image(tools) -> BuiltImage:
    started = time.monotonic()
    # BUILDER=buildah even where a Docker engine answers: the tests run the image from containers-storage.
    build = subprocess.run(["bash", "deploy/build-image.sh"], cwd=ROOT,
                           env={**os.environ, "IMAGE": IMAGE, "BUILDER": "buildah"},
                           capture_output=True, text=True, timeout=1200)
    report["build_seconds"] = round(time.monotonic() - started, 1)
    assert build.returncode == 0, f"deploy/build-image.sh failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    inspected = json.loads(sh("buildah", "inspect", "--type", "image", IMAGE).stdout)
    config = inspected["Docker"]["config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    size = int(sh("podman", "image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()) \
        if shutil.which("podman") else int(inspected.get("Size", 0))
    base = re.search(r"from BASE=(\S+) with (\w+)", build.stderr)
    report.update(size_bytes=size, size_mb=round(size / 1e6, 1), image_id=inspected.get("FromImageID", ""),
                  base=base.group(1) if base else None, builder=base.group(2) if base else None)
    return BuiltImage(IMAGE, config, env, size)


@pytest.fixture(scope="module")
def container(image):
    name = f"convserve-test-{os.getpid()}"
    sh("buildah", "rm", name, check=False)
    sh("buildah", "from", "--pull=false", "--name", name, image.name)
    yield name
    sh("buildah", "rm", name, check=False)


def buildah_run(container: str, *cmd: str, env: dict | None = None, timeout: float = 60,
                check: bool = True) -> subprocess.CompletedProcess:
    env_args = [arg for key, value in (env or {}).items() for arg in ("--env", f"{key}={value}")]
    return sh("buildah", "run", "--isolation", "chroot", *env_args, container, "--", *cmd, timeout=timeout,
              check=check)


@pytest.fixture(scope="module")
def server(image, container, tmp_path_factory):
    port, grpc_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("image") / "server.log"
    command = (image.config.get("Entrypoint") or []) + image.config["Cmd"]
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["buildah", "run", "--isolation", "chroot", "--env", f"PORT={port}", "--env", f"GRPC_PORT={grpc_port}",
             "--env", f"DRAIN_SECONDS={DRAIN_SECONDS}", container, "--", *command],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    running = Server(f"http://127.0.0.1:{port}", port, process, log_path, started)
    running.grpc_target = f"127.0.0.1:{grpc_port}"
    try:
        deadline = started + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the container exited ({process.returncode}):\n{running.log()[-4000:]}"
            try:
                # /readyz answers from the first worker ready; the gauge is the minimum over all live workers.
                if requests.get(f"{running.url}/readyz", timeout=2).status_code == 200 and \
                        scrape(running).get(("convserve_ready", ())) == 1.0:
                    break
            except requests.RequestException:
                pass  # refused, or accepted into the backlog while no worker has booted yet (a read timeout)
            assert time.monotonic() < deadline, f"not ready in {READY_TIMEOUT_S}s:\n{running.log()[-4000:]}"
            time.sleep(0.5)
        running.ready_seconds = round(time.monotonic() - started, 2)
        report["ready_seconds"] = running.ready_seconds
        yield running
    finally:
        if process.poll() is None:
            # buildah run does not forward SIGTERM (it kills its child): stop gunicorn itself, then buildah.
            for pid in gunicorn_processes(port):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for pid in gunicorn_processes(port):  # nothing may outlive the test
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def write_report():
    started = time.monotonic()
    yield
    report["test_seconds"] = round(time.monotonic() - started, 1)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nimage report ({REPORT}): {json.dumps(report)}")


# ---- the image, static -----------------------------------------------------------------------------------------------

def test_image_config(image):
    config = image.config
    assert config["User"] == f"{UID}:{UID}"
    assert config["Cmd"] == ["gunicorn", "-c", "python:service.gunicorn_config"]
    assert not config.get("Entrypoint")

    settings = Settings.from_env(image.env)  # the image's settings pass the service's checks
    assert f"{settings.PORT}/tcp" in config["ExposedPorts"] and f"{settings.GRPC_PORT}/tcp" in config["ExposedPorts"]
    assert str(settings.MODEL_STORE) == "/app/model_store"
    assert image.env["PYTHONDONTWRITEBYTECODE"] == "1" and image.env["PYTHONUNBUFFERED"] == "1"
    assert config["Healthcheck"]["Test"][0] == "CMD", "a HEALTHCHECK (docker format; OCI images drop it)"
    labels = config["Labels"]
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert labels["org.opencontainers.image.version"] == version
    report["revision"] = labels["org.opencontainers.image.revision"]
    assert report["revision"] != "unknown", "build-image.sh labels the image with the git revision"


def test_a_bad_setting_stops_the_container_with_one_line(image, container):
    """The image's own command with WORKERS=0: exit status 2 before any worker, one line naming the setting."""
    command = (image.config.get("Entrypoint") or []) + image.config["Cmd"]
    result = buildah_run(container, *command, env={"WORKERS": "0"}, check=False)
    assert result.returncode != 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "Booting worker" not in output, output
    assert [line for line in output.splitlines() if line.startswith("convserve:")] == \
        ["convserve: WORKERS=0 is not allowed: a whole number >= 1 (gunicorn worker processes)"], output


def test_image_size_is_within_budget(image):
    print(f"\nimage {image.name}: {image.size_bytes / 1e6:.1f} MB")
    assert image.size_bytes > 50 * 10**6, "implausibly small: the size was not read"
    assert image.size_bytes < SIZE_BUDGET_BYTES, \
        f"the image is {image.size_bytes / 1e6:.0f} MB, over the {SIZE_BUDGET_BYTES / 1e6:.0f} MB budget"


def test_image_user_is_10001(container):
    assert buildah_run(container, "id", "-u").stdout.strip() == str(UID)
    assert buildah_run(container, "id", "-g").stdout.strip() == str(UID)


def test_image_has_no_build_tools_torch_or_pip(container):
    probe = ("import importlib.util as u, shutil, sys; "
             "bad = [m for m in ('torch', 'onnx', 'pip', 'setuptools', 'pytest', 'matplotlib') if u.find_spec(m)]"
             " + [t for t in ('gcc', 'cc', 'g++', 'make', 'curl', 'wget') if shutil.which(t)]; "
             "print(sys.executable, sys.version.split()[0], bad); sys.exit(1 if bad else 0)")
    result = buildah_run(container, "python3", "-c", probe, check=False)
    assert result.returncode == 0, f"found in the runtime image: {result.stdout}{result.stderr}"
    report["python"] = result.stdout.split()[1]


def test_image_ships_the_default_model(image, container):
    model = image.settings.DEFAULT_MODEL
    listing = buildah_run(container, "find", f"/app/model_store/{model}", "-name", "*.onnx", check=False)
    assert listing.returncode == 0 and "model.onnx" in listing.stdout, \
        f"the image's DEFAULT_MODEL={model} is not in /app/model_store: {listing.stdout}{listing.stderr}"
    # readable by the runtime user whatever the modes in the build context were
    buildah_run(container, "sh", "-c", f"cat /app/model_store/{model}/*/model.onnx > /dev/null")


# ---- the image, running ----------------------------------------------------------------------------------------------

def test_serving_processes_run_as_10001(server):
    pids = gunicorn_processes(server.port)
    assert len(pids) >= 2, f"expected a gunicorn master and its workers, found {pids}"
    for pid in pids:
        uids = proc_status(pid)["Uid"].split()
        assert uids == [str(UID)] * 4, f"gunicorn pid {pid} runs with uids {uids}"


def test_health_endpoints(server):
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    ready = requests.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert requests.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


def test_docs_and_their_assets_are_served_from_the_image(server):
    assert requests.get(f"{server.url}/docs", timeout=5).status_code == 200
    assert requests.get(f"{server.url}/openapi.json", timeout=10).json()["openapi"].startswith("3.1")
    for asset in SWAGGER_UI_FILES:  # the image keeps these of Swagger UI's files and prunes the rest
        assert requests.get(f"{server.url}/docs/{asset}", timeout=10).status_code == 200, asset


def classify(server) -> requests.Response:
    started = time.monotonic()
    response = requests.post(f"{server.url}/v1/classify", data=png_bytes(), headers={"Content-Type": "image/png"},
                             timeout=30)
    report.setdefault("classify_ms", round((time.monotonic() - started) * 1000, 1))
    return response


def test_classify_contract(server, image):
    response = classify(server)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == image.settings.DEFAULT_MODEL
    assert isinstance(body["version"], str) and body["version"]
    assert len(body["predictions"]) == 1
    prediction = body["predictions"][0]
    probabilities = prediction["probabilities"]
    assert set(probabilities) == LABELS
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())
    assert abs(sum(probabilities.values()) - 1.0) < 1e-4
    assert prediction["label"] == max(probabilities, key=probabilities.get)
    assert abs(prediction["confidence"] - probabilities[prediction["label"]]) < 1e-6


def test_v2_inference_protocol(server, image):
    """The KServe overlay declares PROTOCOL=v2: the image answers the Open Inference Protocol."""
    model = image.settings.DEFAULT_MODEL
    metadata = requests.get(f"{server.url}/v2/models/{model}", timeout=5)
    assert metadata.status_code == 200, metadata.text
    tensor_input = metadata.json()["inputs"][0]
    channels, height, width = tensor_input["shape"][1:]
    encoded = metadata.json().get("parameters", {}).get("alternative_input", {"name": "image"})
    requests_to_send = {
        "FP32": {"id": "fp32", "inputs": [{"name": tensor_input["name"], "datatype": "FP32",
                                           "shape": [1, channels, height, width],
                                           "data": [0.0] * (channels * height * width)}]},
        "BYTES": {"id": "bytes", "inputs": [{"name": encoded["name"], "datatype": "BYTES", "shape": [2],
                                             "data": [base64.b64encode(png_bytes()).decode(),
                                                      base64.b64encode(png_bytes((200, 30, 30))).decode()]}]},
    }
    for datatype, request in requests_to_send.items():
        response = requests.post(f"{server.url}/v2/models/{model}/infer", json=request, timeout=30)
        assert response.status_code == 200, f"{datatype}: {response.text}"
        body = response.json()
        assert body["model_name"] == model and body["id"] == request["id"]
        output = body["outputs"][0]
        batch = request["inputs"][0]["shape"][0]
        assert output["name"] == "probabilities" and output["datatype"] == "FP32"
        assert output["shape"] == [batch, len(LABELS)]
        for row in range(batch):
            assert abs(sum(output["data"][row * len(LABELS):(row + 1) * len(LABELS)]) - 1.0) < 1e-4


def test_grpc_inference_protocol(server, image):
    """The image serves the Open Inference Protocol over gRPC too (its grpcio, its generated messages)."""
    import grpc
    import numpy as np
    import tritonclient.grpc as triton
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    client = triton.InferenceServerClient(server.grpc_target)
    assert client.is_server_ready()
    model = image.settings.DEFAULT_MODEL
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([png_bytes(), png_bytes((200, 30, 30))], dtype=object))
    probabilities = client.infer(model, [tensor]).as_numpy("probabilities")
    assert probabilities.shape == (2, len(LABELS)) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.grpc_target))
    assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING


def scrape(server) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_the_request(server, image):
    model = image.settings.DEFAULT_MODEL
    key = ("convserve_requests_total", (("method", "POST"), ("protocol", "http"), ("route", "/v1/classify"),
                                        ("status", "200")))

    def predictions(samples):
        return sum(value for (name, labels), value in samples.items()
                   if name == "convserve_predictions_total" and ("model", model) in labels)

    before = scrape(server)
    assert classify(server).status_code == 200
    after = scrape(server)
    assert after.get(key) == before.get(key, 0.0) + 1, \
        f"convserve_requests_total for POST /v1/classify 200: {before.get(key)} -> {after.get(key)}"
    assert predictions(after) == predictions(before) + 1, "one image classified, one prediction counted"
    assert after[("convserve_ready", ())] == 1.0
    assert any(name == "convserve_model_info" and ("model", model) in labels for name, labels in after)
    durations = [value for (name, labels), value in after.items()
                 if name == "convserve_request_duration_seconds_count" and ("route", "/v1/classify") in labels]
    assert durations and sum(durations) >= 1
    assert not any(name == "convserve_requests_total" and dict(labels)["route"] in ("/healthz", "/readyz", "/metrics")
                   for name, labels in after), "health and metrics routes are not counted"


def test_healthcheck_command(server, image, container):
    """The image's HEALTHCHECK (no curl) passes against the running server and fails where nothing listens."""
    kind, *command = image.config["Healthcheck"]["Test"]
    assert kind == "CMD" and command[0] == "python3"
    assert buildah_run(container, *command, env={"PORT": str(server.port)}).returncode == 0
    refused = buildah_run(container, *command, env={"PORT": str(free_port())}, check=False)
    assert refused.returncode != 0, "the healthcheck must fail when the service does not answer"


def test_server_log_is_clean(server):
    log = server.log()
    assert "Booting worker" in log
    for bad in ("[ERROR]", "Traceback", "terminate called", "SIGABRT", "Failed to persist telemetry"):
        assert bad not in log, f"{bad!r} in the server log:\n{log[-3000:]}"


def test_graceful_shutdown_on_sigterm(server):
    """SIGTERM to gunicorn (what Kubernetes sends after preStop): /readyz turns 503 at once while requests are still
    served for DRAIN_SECONDS, then every process exits cleanly. Runs last: it stops the server."""
    os.kill(master_pid(server.port), signal.SIGTERM)
    signalled = time.monotonic()
    # the master relays SIGTERM to the workers: give them a moment, then every answer must be "draining"
    while requests.get(f"{server.url}/readyz", timeout=2).status_code != 503:
        assert time.monotonic() - signalled < 1.0, "/readyz still 200 a second after SIGTERM"
        time.sleep(0.05)
    report["readyz_503_after_seconds"] = round(time.monotonic() - signalled, 3)
    ready_codes, live_codes = set(), set()
    while time.monotonic() - signalled < DRAIN_SECONDS - 0.5:
        ready_codes.add(requests.get(f"{server.url}/readyz", timeout=2).status_code)
        live_codes.add(requests.get(f"{server.url}/healthz", timeout=2).status_code)
        time.sleep(0.1)
    assert ready_codes == {503}, f"/readyz during the drain: {ready_codes}"
    assert live_codes == {200}, f"/healthz during the drain (still serving): {live_codes}"
    server.process.wait(timeout=30 + DRAIN_SECONDS)
    report["shutdown_seconds"] = round(time.monotonic() - signalled, 2)
    assert server.process.returncode == 0, f"exit status {server.process.returncode}:\n{server.log()[-3000:]}"
    assert gunicorn_processes(server.port) == []
    assert "Shutting down: Master" in server.log()
    assert "SIGABRT" not in server.log() and "was sent SIGKILL" not in server.log()
