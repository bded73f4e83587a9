"""Seeing inside a request: request IDs, Server-Timing stages, JSON logs, and the event-loop shortcut for small work.

Request IDs are on every answer and in its log lines, the Server-Timing stages agree with the stage histogram, and the
event-loop shortcut must answer exactly as a thread."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

from bench.overhead import breakdown, server_timing
from service.model import has_control_flow
from service.request_context import STAGES
from tests.conftest import SHIPPED_STORE
from tests.helpers import GunicornServer, encode, image_bytes, pattern

GENERATED = re.compile(r"[0-9a-f]{32}")
INFERENCE_STAGES = ["read_body", "queue", "compute_input", "compute_infer", "compute_output", "encode"]


# ---- request IDs, Flask test client -------------------------------------------------------------------------------

def test_every_answer_has_a_request_id_and_a_good_one_is_kept(client):
    answers = [
        client.post("/v1/models/lenet/classify", data=image_bytes(), content_type="image/png"),
        client.post("/v1/models/lenet/classify", data=b"not an image", content_type="image/png"),  # 400
        client.get("/v1/models/nosuch"),  # 404
        client.get("/healthz"),
        client.post("/v2/models/lenet/infer", data=b"{", content_type="application/json"),  # 400, /v2's shape
    ]
    assert [answer.status_code for answer in answers] == [200, 400, 404, 200, 400]
    ids = [answer.headers["X-Request-ID"] for answer in answers]
    assert all(GENERATED.fullmatch(value) for value in ids) and len(set(ids)) == len(ids)
    kept = client.get("/v1/models", headers={"X-Request-ID": "ingress-7f3a:01"})
    assert kept.headers["X-Request-ID"] == "ingress-7f3a:01"


@pytest.mark.parametrize("supplied", ["x" * 129, "two words", "bad\u00e9id", "a;b", ""])
def test_a_request_id_that_is_not_a_plain_token_is_replaced(client, supplied):
    answer = client.get("/v1/models", headers={"X-Request-ID": supplied})
    assert GENERATED.fullmatch(answer.headers["X-Request-ID"])


def test_server_timing_names_each_stage_of_an_inference(client):
    answer = client.post("/v1/models/lenet/classify", data=image_bytes(), content_type="image/png")
    header = answer.headers["Server-Timing"]
    stages = server_timing(header)
    assert list(stages) == [*INFERENCE_STAGES, "total"]
    assert 'compute_infer;dur=' in header and 'desc="batch of 1"' in header
    assert all(value >= 0 for value in stages.values())
    assert sum(stages[stage] for stage in INFERENCE_STAGES) <= stages["total"] + 0.01
    assert list(STAGES) == INFERENCE_STAGES  # one list of names for the header, the log and the metric
    plain = client.get("/healthz").headers["Server-Timing"]
    assert list(server_timing(plain)) == ["encode", "total"], "no inference stages where nothing was inferred"


# ---- the event-loop shortcut ---------------------------------------------------------------------------------------

def test_graphs_with_control_flow_never_count_as_fixed_cost():
    from tests.test_faults import stalling_graph

    shipped = sorted((SHIPPED_STORE / "lenet").iterdir(), key=lambda p: int(p.name))[-1] / "model.onnx"
    graph = shipped.read_bytes()
    assert not has_control_flow(graph), "the shipped graph is a plain feed-forward one"
    assert has_control_flow(stalling_graph(graph)), "a Loop makes the cost depend on the input's values"


@pytest.mark.slow
def test_small_work_on_the_event_loop_answers_as_a_thread_does(tmp_path):
    """As shipped (INLINE_WORK_SECONDS), a 32x32 image through lenet runs on the event loop; with 0 it goes to a
    thread. Both answer the same bytes but for the request ID and timings, for several images at once too."""
    images = [encode(pattern(32, 32, seed=seed), "JPEG", quality=90) for seed in range(4)]
    servers = [GunicornServer(tmp_path, WORKERS=1), GunicornServer(tmp_path, WORKERS=1, INLINE_WORK_SECONDS=0)]
    try:
        for server in servers:
            server.wait_ready()
        answers = []
        for server in servers:
            one = [requests.post(f"{server.url}/v1/models/lenet/classify", data=image, timeout=10,
                                 headers={"Content-Type": "image/jpeg"}).json() for image in images]
            several = requests.post(f"{server.url}/v1/models/lenet/classify", timeout=10,
                                    files=[("image", (f"{i}.jpg", image, "image/jpeg")) for i, image in
                                           enumerate(images)]).json()
            answers.append((one, several))
        assert answers[0] == answers[1]
    finally:
        for server in servers:
            server.stop()


# ---- the real server: stages agree, logs carry the ID --------------------------------------------------------------

@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    server = GunicornServer(tmp_path_factory.mktemp("json-logs"), grpc=True, WORKERS=1, LOG_FORMAT="json",
                            MAX_QUEUE=1, INFERENCE_THREADS=1, SHED_BACKOFF=0)
    server.wait_ready()
    yield server
    server.stop()


def json_lines(server) -> list[dict]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.mark.slow
def test_server_timing_and_the_stage_histogram_agree(json_server):
    image = encode(pattern(32, 32, seed=3), "JPEG", quality=90)
    measured = breakdown(json_server, "lenet", image, requests_count=40)
    assert measured["requests"] == 40
    for stage in INFERENCE_STAGES:
        header, histogram = measured["mean_ms_header"][stage], measured["mean_ms_histogram"][stage]
        # The same numbers: the header rounds each to a microsecond.
        assert histogram == pytest.approx(header, abs=0.002), stage


@pytest.mark.slow
def test_json_logs_carry_the_request_id_model_status_and_stages(json_server):
    answer = requests.post(f"{json_server.url}/v1/models/lenet/classify", data=image_bytes(), timeout=10,
                           headers={"Content-Type": "image/png", "X-Request-ID": "trace-json-1"})
    bad = requests.post(f"{json_server.url}/v1/models/lenet/classify", data=b"garbage", timeout=10,
                        headers={"Content-Type": "image/png", "X-Request-ID": "trace-json-2"})
    assert (answer.status_code, bad.status_code) == (200, 400)
    assert answer.headers["X-Request-ID"] == "trace-json-1"
    lines = json_lines(json_server)
    assert lines and all({"time", "level", "logger", "pid", "message"} <= set(line) for line in lines)
    (access,) = [line for line in lines if line.get("request_id") == "trace-json-1"]
    assert access["logger"] == "convserve.access" and access["status"] == 200 and access["protocol"] == "http"
    assert (access["model"], access["method"], access["path"]) == ("lenet", "POST", "/v1/models/lenet/classify")
    assert set(access["stages_ms"]) == set(INFERENCE_STAGES) and access["batch_size"] == 1
    failed = [line for line in lines if line.get("request_id") == "trace-json-2"]
    assert {line["logger"] for line in failed} == {"convserve", "convserve.access"}, \
        "the error's own log line carries the request's ID too"
    assert any("invalid_image" in line["message"] for line in failed)


@pytest.mark.slow
def test_a_shed_request_has_an_id_and_its_log_line_says_why(json_server):
    large = encode(np.asarray(Image.fromarray(pattern(96, 54, seed=1)).resize((1920, 1080))), "JPEG", quality=90)

    def send(index: int):
        connection = http.client.HTTPConnection("127.0.0.1", json_server.port, timeout=20)
        try:
            connection.request("POST", "/v1/models/convnet/classify", body=large,
                               headers={"Content-Type": "image/jpeg", "X-Request-ID": f"flood-{index}"})
            response = connection.getresponse()
            response.read()
            return response.status, response.getheader("X-Request-ID")
        finally:
            connection.close()

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(send, range(48)))
    shed = [request_id for status, request_id in answers if status == 503]
    assert shed, "MAX_QUEUE=1 with one thread sheds part of 24 at once"
    assert all(request_id == f"flood-{index}" for index, (_, request_id) in enumerate(answers))
    lines = {line["request_id"]: line for line in json_lines(json_server) if line.get("logger") == "convserve.access"}
    assert all(lines[request_id]["shed_reason"] in ("queue_full", "queue_timeout") for request_id in shed)
    assert all(lines[request_id]["status"] == 503 for request_id in shed)


@pytest.mark.slow
def test_grpc_calls_return_their_request_id_and_log_it(json_server):
    from service.proto import inference_pb2 as pb

    channel = grpc.insecure_channel(json_server.grpc_target)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                               request_serializer=pb.ModelMetadataRequest.SerializeToString,
                               response_deserializer=pb.ModelMetadataResponse.FromString)
    try:
        _, outcome = call.with_call(pb.ModelMetadataRequest(name="lenet"), metadata=(("x-request-id", "grpc-1"),),
                                    timeout=10)
        assert dict(outcome.trailing_metadata())["x-request-id"] == "grpc-1"
        with pytest.raises(grpc.RpcError) as failed:
            call.with_call(pb.ModelMetadataRequest(name="nosuch"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert GENERATED.fullmatch(dict(failed.value.trailing_metadata())["x-request-id"])
    finally:
        channel.close()
    (line,) = [line for line in json_lines(json_server) if line.get("request_id") == "grpc-1"]
    assert (line["protocol"], line["method"], line["status"]) == ("grpc", "ModelMetadata", 200)


@pytest.mark.slow
def test_text_logs_put_the_request_id_on_the_lines_of_that_request(tmp_path):
    server = GunicornServer(tmp_path, WORKERS=1)
    try:
        server.wait_ready()
        requests.post(f"{server.url}/v1/models/lenet/classify", data=b"garbage", timeout=10,
                      headers={"Content-Type": "image/png", "X-Request-ID": "text-1"})
        lines = [line for line in server.log().splitlines() if "request_id=text-1" in line]
    finally:
        server.stop()
    assert len(lines) == 2, lines  # the error's line and the access line
    assert any("invalid_image" in line for line in lines)
    assert any("convserve.access" in line and " 400 " in line and "model=lenet/" in line for line in lines)


def test_the_text_formats_time_is_loggings_own_one_strftime_a_second():
    """TextFormatter keeps the last second's text: the stamp must still be logging's, millisecond and all."""
    import logging

    from service.logs import TextFormatter

    formatter, stock = TextFormatter(), logging.Formatter()
    record = logging.LogRecord("convserve.access", logging.INFO, None, 0, "line", (), None)
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25, 1_800_000_123.0409):
        record.created, record.msecs = created, (created - int(created)) * 1000 // 1
        assert formatter.formatTime(record) == stock.formatTime(record), created
    assert formatter.formatTime(record, "%H") == stock.formatTime(record, "%H")
