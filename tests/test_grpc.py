"""The Open Inference Protocol over gRPC, tested with the clients users have against a real gunicorn.

The clients are tritonclient.grpc (binary tensors, metadata, health, repository, statistics, class_count) and the
standard grpc.health.v1 stub; gunicorn runs two workers, with and without API keys. The answers must be REST's for the
same images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import REPO
from tests.helpers import GunicornServer, image_bytes, wait_until

pytestmark = pytest.mark.slow

KEY = "grpc-test-key"
IMAGES = [image_bytes(seed=seed) for seed in range(5)]


def test_the_generated_code_matches_the_proto(tmp_path):
    """service/proto/inference_pb2.py(i) are what `make proto` writes from inference.proto today."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", "service/proto/inference.proto"], cwd=REPO, check=True)
    for name in ("inference_pb2.py", "inference_pb2.pyi"):
        assert (tmp_path / "service/proto" / name).read_text() == (REPO / "service/proto" / name).read_text(), \
            f"service/proto/{name} is stale: run make proto"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = GunicornServer(tmp_path_factory.mktemp("grpc"), grpc=True, WORKERS=2, MODEL_POLL_SECONDS=0)
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    running = GunicornServer(tmp_path_factory.mktemp("grpc-keys"), grpc=True, WORKERS=1, MODEL_POLL_SECONDS=0,
                             API_KEYS=KEY)
    running.wait_ready()
    yield running
    running.stop()


def bytes_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def rest_probabilities(server, model: str, images: list[bytes]) -> np.ndarray:
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    answer = requests.post(f"{server.url}/v1/models/{model}/classify", files=files, timeout=30)
    assert answer.status_code == 200, answer.text
    return np.array([list(p["probabilities"].values()) for p in answer.json()["predictions"]])


def test_health_and_metadata(server):
    client = triton.InferenceServerClient(server.grpc_target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lenet") and client.is_model_ready("convnet", "7")
    metadata = client.get_server_metadata()
    assert metadata.name == "convserve"
    assert {"binary_tensor_data", "classification", "model_repository", "statistics"} <= set(metadata.extensions)
    model = client.get_model_metadata("lenet", as_json=True)
    rest = requests.get(f"{server.url}/v2/models/lenet", timeout=10).json()
    assert model["versions"] == rest["versions"] and model["platform"] == rest["platform"]
    assert model["outputs"] == [{**o, "shape": [str(d) for d in o["shape"]]} for o in rest["outputs"]]
    assert [i["name"] for i in model["inputs"]] == ["input", "image"]
    assert model["inputs"] == [{**i, "shape": [str(d) for d in i["shape"]]} for i in rest["inputs"]]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nosuchmodel")
    assert "StatusCode.NOT_FOUND" in unknown.value.status() and "Available models" in unknown.value.message()


def test_model_configuration_as_triton_gives_it_over_both_protocols(server):
    """Triton's model configuration extension, which perf_analyzer reads before it sends a request: the same
    configuration from tritonclient.grpc and tritonclient.http, both inputs optional, the metadata's shapes."""
    import tritonclient.http as triton_http
    from google.protobuf.json_format import MessageToDict

    over_grpc = triton.InferenceServerClient(server.grpc_target).get_model_config("convnet", "7").config
    config = {"max_batch_size": 0, **MessageToDict(over_grpc, preserving_proto_field_name=True)}  # 0: not sent
    for tensor in config["input"] + config["output"]:
        tensor["dims"] = [int(d) for d in tensor["dims"]]  # int64 travels as a string in protobuf's JSON
    over_http = triton_http.InferenceServerClient(server.url.removeprefix("http://")).get_model_config("convnet")
    assert config == over_http
    metadata = requests.get(f"{server.url}/v2/models/convnet", timeout=10).json()
    assert over_http["max_batch_size"] == 0 and over_http["platform"] == metadata["platform"]
    types = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING", "BOOL": "TYPE_BOOL"}
    assert over_http["input"] == [{"name": i["name"], "data_type": types[i["datatype"]], "dims": i["shape"],
                                   "optional": True} for i in metadata["inputs"]]
    assert over_http["output"] == [{"name": o["name"], "data_type": types[o["datatype"]], "dims": o["shape"]}
                                   for o in metadata["outputs"]]
    assert "model_configuration" in triton.InferenceServerClient(server.grpc_target).get_server_metadata().extensions
    with pytest.raises(InferenceServerException) as unknown:
        triton.InferenceServerClient(server.grpc_target).get_model_config("nosuchmodel")
    assert "StatusCode.NOT_FOUND" in unknown.value.status()
    assert requests.get(f"{server.url}/v2/models/nosuchmodel/config", timeout=10).status_code == 404


def test_infer_bytes_and_fp32_give_rests_answers(server):
    client = triton.InferenceServerClient(server.grpc_target)
    answer = client.infer("lenet", [bytes_input(IMAGES)], request_id="req-1")
    assert answer.get_response().id == "req-1" and answer.get_response().model_version == "3"
    probabilities = answer.as_numpy("probabilities")
    assert probabilities.shape == (len(IMAGES), 4)
    np.testing.assert_allclose(probabilities, rest_probabilities(server, "lenet", IMAGES), atol=1e-6)
    assert answer.as_numpy("in_domain").dtype == bool and answer.as_numpy("domain_score").shape == (len(IMAGES),)
    # FP32, preprocessed as the metadata says: the same numbers as REST's /v2 for the same tensor
    tensor = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    fp32 = triton.InferInput("input", list(tensor.shape), "FP32")
    fp32.set_data_from_numpy(tensor)
    over_grpc = client.infer("lenet", [fp32], outputs=[triton.InferRequestedOutput("probabilities")])
    assert [o.name for o in over_grpc.get_response().outputs] == ["probabilities"]
    rest = requests.post(f"{server.url}/v2/models/lenet/infer", timeout=10, json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": list(tensor.shape), "data": tensor.ravel().tolist()}]}).json()
    np.testing.assert_allclose(over_grpc.as_numpy("probabilities").ravel(), rest["outputs"][0]["data"], atol=1e-6)


def test_class_count_answers_top_k_as_triton_does(server):
    client = triton.InferenceServerClient(server.grpc_target)
    answer = client.infer("lenet", [bytes_input(IMAGES[:2])],
                          outputs=[triton.InferRequestedOutput("probabilities", class_count=2)])
    ranked = answer.as_numpy("probabilities")
    assert ranked.shape == (2, 2)
    labels = requests.get(f"{server.url}/v2/models/lenet", timeout=10).json()["parameters"]["labels"]
    expected = rest_probabilities(server, "lenet", IMAGES[:2])
    for row, probabilities in zip(ranked, expected):
        scores = [entry.decode().split(":") for entry in row]
        order = np.argsort(-probabilities, kind="stable")[:2]
        assert [int(index) for _, index, _ in scores] == list(order)
        assert [label for _, _, label in scores] == [labels[i] for i in order]
        np.testing.assert_allclose([float(score) for score, _, _ in scores], probabilities[order], atol=1e-6)
    with pytest.raises(InferenceServerException) as wrong:
        client.infer("lenet", [bytes_input(IMAGES[:1])],
                     outputs=[triton.InferRequestedOutput("probabilities", class_count=9)])
    assert "INVALID_ARGUMENT" in wrong.value.status() and "classification" in wrong.value.message()


def test_statistics_count_every_worker(server):
    client = triton.InferenceServerClient(server.grpc_target)
    before = client.get_inference_statistics("convnet", as_json=True)["model_stats"][0]
    for _ in range(6):  # new channels: the calls spread over both workers
        triton.InferenceServerClient(server.grpc_target).infer("convnet", [bytes_input(IMAGES[:2])])
    after = client.get_inference_statistics("convnet", "7", as_json=True)["model_stats"][0]
    success = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"].get(
        "success", {}).get("count", 0))
    assert success == 6
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 12
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(after["inference_stats"][stage]["count"]) >= 6 and int(after["inference_stats"][stage]["ns"]) > 0
    assert sum(int(b["compute_infer"]["count"]) for b in after["batch_stats"]) == int(after["execution_count"])
    rest = requests.get(f"{server.url}/v2/models/convnet/versions/7/stats", timeout=10).json()["model_stats"][0]
    assert rest["inference_count"] >= int(after["inference_count"])  # REST and gRPC read the same figures
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert {(s["name"], s["version"]) for s in every} == {("convnet", "7"), ("lenet", "3")}


def test_repository_index_unload_and_load(server):
    client = triton.InferenceServerClient(server.grpc_target)
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} == {("convnet", "7", "READY"),
                                                                      ("lenet", "3", "READY")}
    client.unload_model("lenet")
    try:
        # every worker, on channels of their own (SO_REUSEPORT spreads new connections over the workers)
        assert not any(triton.InferenceServerClient(server.grpc_target).is_model_ready("lenet") for _ in range(8))
        entry = next(m for m in client.get_model_repository_index(as_json=True)["models"] if m["name"] == "lenet")
        assert entry["state"] == "UNAVAILABLE" and "unloaded" in entry["reason"]
        with pytest.raises(InferenceServerException) as unloaded:
            client.infer("lenet", [bytes_input(IMAGES[:1])])
        assert "NOT_FOUND" in unloaded.value.status() and "/load" in unloaded.value.message()
        assert client.is_server_ready()  # the default model still serves
    finally:
        client.load_model("lenet")
    assert all(triton.InferenceServerClient(server.grpc_target).is_model_ready("lenet") for _ in range(8))
    assert client.infer("lenet", [bytes_input(IMAGES[:1])]).as_numpy("probabilities").shape == (1, 4)
    with pytest.raises(InferenceServerException) as missing:
        client.load_model("nosuchmodel")
    assert "NOT_FOUND" in missing.value.status()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_perf_analyzer_measures_either_protocol(server, tmp_path, protocol):
    """Triton's perf_analyzer (from the tritonclient wheel) reads the metadata, the model configuration and the
    statistics, then sends BYTES images at 4 concurrent requests: every request answered (it stops at the first
    error, and at statistics whose compute counts disagree)."""
    from bench.protocols import perf_analyzer, run_perf_analyzer

    tool = perf_analyzer()
    assert not isinstance(tool, str), f"perf_analyzer cannot start: {tool}"
    measured = run_perf_analyzer(tool, tmp_path, server, protocol, "convnet", IMAGES[0], 4, 2)
    assert measured["ok_per_s"] > 0 and measured["p50_ms"] > 0, measured


def test_standard_health_service(server):
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.grpc_target))
    for service in ("", "inference.GRPCInferenceService", "readiness", "liveness"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Check(health_pb2.HealthCheckRequest(service="nonsense"), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_api_keys_over_grpc(keyed):
    anonymous = triton.InferenceServerClient(keyed.grpc_target)
    assert anonymous.is_server_live() and anonymous.is_server_ready()  # open, as /v2/health/* are
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(keyed.grpc_target))
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    for call in (lambda: anonymous.get_model_metadata("lenet"),
                 lambda: anonymous.infer("lenet", [bytes_input(IMAGES[:1])]),
                 lambda: anonymous.get_model_repository_index(), lambda: anonymous.unload_model("lenet"),
                 lambda: anonymous.get_inference_statistics()):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert "UNAUTHENTICATED" in refused.value.status()
    with pytest.raises(InferenceServerException):
        anonymous.infer("lenet", [bytes_input(IMAGES[:1])], headers={"authorization": "Bearer wrong"})
    for headers in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        answer = anonymous.infer("lenet", [bytes_input(IMAGES[:1])], headers=headers)
        assert answer.as_numpy("probabilities").shape == (1, 4)
        assert anonymous.get_model_repository_index(headers=headers).models
        assert anonymous.get_inference_statistics("lenet", headers=headers).model_stats
    assert triton.InferenceServerClient(keyed.grpc_target).is_model_ready("lenet", headers={"x-api-key": KEY})


def test_grpc_counts_in_the_request_metrics(server):
    triton.InferenceServerClient(server.grpc_target).infer("lenet", [bytes_input(IMAGES[:1])])
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    assert ('convserve_requests_total{method="POST",protocol="grpc",route="/inference.GRPCInferenceService/ModelInfer"'
            ',status="200"}') in text


def test_a_drain_turns_grpc_health_not_serving_then_stops(tmp_path):
    running = GunicornServer(tmp_path, grpc=True, WORKERS=1, MODEL_POLL_SECONDS=0, DRAIN_SECONDS=3,
                             DEFAULT_MODEL="lenet")
    running.wait_ready()
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(running.grpc_target))
    client = triton.InferenceServerClient(running.grpc_target)
    try:
        running.process.send_signal(15)
        wait_until(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                   == health_pb2.HealthCheckResponse.NOT_SERVING, "gRPC health NOT_SERVING", timeout=5)
        assert not client.is_server_ready()
        # still answering while it drains
        assert client.infer("lenet", [bytes_input(IMAGES[:1])]).as_numpy("probabilities").shape == (1, 4)
        running.process.wait(timeout=30)
    finally:
        running.stop()
    assert "Traceback" not in running.log()


def test_a_taken_grpc_port_stops_the_start_with_one_line(tmp_path, server):
    taken = GunicornServer(tmp_path, WORKERS=1, GRPC_PORT=server.grpc_port)
    assert taken.process.wait(timeout=30) != 0
    lines = [line for line in taken.log().splitlines() if "GRPC_PORT" in line]
    assert lines and "is not free" in lines[0] and "Traceback" not in taken.log()
    assert Path(taken.log_path).exists()


def test_tritonclient_http_calls_the_new_rest_routes_without_keys(server):
    """The REST side of the repository and statistics, as tritonclient.http calls them on an open server; the
    default model unloaded leaves the replica ready, serving the others."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.url.removeprefix("http://"))
    assert {(m["name"], m["state"]) for m in client.get_model_repository_index()} == {("convnet", "READY"),
                                                                                        ("lenet", "READY")}
    client.unload_model("convnet")
    try:
        assert not client.is_model_ready("convnet")
        assert client.is_server_ready() and requests.get(server.url + "/readyz", timeout=5).status_code == 200
        assert client.is_model_ready("lenet")
    finally:
        client.load_model("convnet")
    assert client.is_model_ready("convnet")
    stats = client.get_inference_statistics("convnet")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("convnet", "7")]


def test_rest_and_grpc_at_once_share_batches_and_get_their_own_answers(tmp_path):
    """REST requests (event loop, thread pool) and gRPC calls (their own threads) wait in one queue: either may run
    a batch holding the other's requests and hand each its answer."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers import metric_value

    running = GunicornServer(tmp_path, grpc=True, WORKERS=1, INFERENCE_THREADS=1, QUEUE_TIMEOUT=30,
                             MODEL_POLL_SECONDS=0)
    rest_images, grpc_images = IMAGES[:2], IMAGES[2:5]
    try:
        running.wait_ready()
        alone_rest = rest_probabilities(running, "convnet", rest_images)
        client = triton.InferenceServerClient(running.grpc_target)
        alone_grpc = client.infer("convnet", [bytes_input(grpc_images)]).as_numpy("probabilities")

        def over_grpc(_):
            return triton.InferenceServerClient(running.grpc_target).infer(
                "convnet", [bytes_input(grpc_images)]).as_numpy("probabilities")

        before = metric_value(requests.get(running.url + "/metrics", timeout=5).text, "convserve_batch_size_count",
                              model="convnet")
        with ThreadPoolExecutor(24) as pool:
            rest_answers = [pool.submit(rest_probabilities, running, "convnet", rest_images) for _ in range(12)]
            grpc_answers = [pool.submit(over_grpc, index) for index in range(12)]
            for answer in rest_answers:
                np.testing.assert_allclose(answer.result(), alone_rest, atol=1e-5)
            for answer in grpc_answers:
                np.testing.assert_allclose(answer.result(), alone_grpc, atol=1e-5)
        calls = metric_value(requests.get(running.url + "/metrics", timeout=5).text, "convserve_batch_size_count",
                             model="convnet") - before
        assert calls < 24, "no two requests shared an ONNX Runtime call"
    finally:
        running.stop()
    assert "Traceback" not in running.log()


def call_thread_cpus(pid: int) -> list[set[int]]:
    """The CPU set of each of the worker's gRPC call threads (named grpc-call by service/grpc_server.py)."""
    import os

    cpus = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == "grpc-call":
                cpus.append(os.sched_getaffinity(int(task.name)))
        except (OSError, ProcessLookupError):  # a thread that ended meanwhile
            continue
    return cpus


def calls_on_every_worker(running: GunicornServer) -> dict[int, list[set[int]]]:
    """Calls over fresh channels (connections, spread over the workers by the kernel) until each worker has run one."""
    def threads():
        for _ in range(8):
            with grpc.insecure_channel(running.grpc_target) as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                triton.InferenceServerClient(running.grpc_target).is_server_live()
        found = {pid: call_thread_cpus(pid) for pid in running.worker_pids()}
        return found if len(found) == running.workers and all(found.values()) else None

    return wait_until(threads, "a gRPC call thread in every worker", timeout=60, interval=0)


def test_each_workers_grpc_threads_keep_to_a_cpu_of_their_own_and_a_replacement_takes_its_predecessors(tmp_path):
    """GRPC_CPU_AFFINITY=auto: where the workers have CPUs to themselves (this machine: an affinity mask of at least
    WORKERS CPUs, no smaller cgroup quota), each worker's call threads keep to one CPU, a different one per worker,
    while its event loop (REST) keeps them all; a worker killed with -9 is replaced on the same CPU. Elsewhere the
    threads keep every CPU."""
    import os
    import signal

    from service.settings import cpu_of_worker

    every = os.sched_getaffinity(0)
    own = [cpu_of_worker(slot, 2) for slot in (0, 1)]
    running = GunicornServer(tmp_path, grpc=True, WORKERS=2, MODEL_POLL_SECONDS=0)
    try:
        running.wait_ready()
        threads = calls_on_every_worker(running)
        if None in own:
            assert all(cpus == every for found in threads.values() for cpus in found), threads
            return
        kept = {}
        for pid, found in threads.items():
            assert len({frozenset(cpus) for cpus in found}) == 1 and len(found[0]) == 1, (pid, found)
            kept[pid] = next(iter(found[0]))
            assert os.sched_getaffinity(pid) == every, "REST's event loop must keep every CPU"
        assert sorted(kept.values()) == sorted(own), kept
        victim = next(iter(kept))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in running.worker_pids() and len(running.worker_pids()) == 2,
                   "the replacement worker")
        running.wait_ready()
        replaced = calls_on_every_worker(running)
        new = (set(replaced) - set(kept)).pop()
        assert {frozenset(cpus) for cpus in replaced[new]} == {frozenset({kept[victim]})}, replaced
    finally:
        running.stop()


def test_grpc_cpu_affinity_off_leaves_the_threads_every_cpu(tmp_path):
    import os

    running = GunicornServer(tmp_path, grpc=True, WORKERS=1, MODEL_POLL_SECONDS=0, GRPC_CPU_AFFINITY="off")
    try:
        running.wait_ready()
        threads = calls_on_every_worker(running)
        assert all(cpus == os.sched_getaffinity(0) for found in threads.values() for cpus in found), threads
    finally:
        running.stop()
    assert "its threads on CPU" not in running.log()
