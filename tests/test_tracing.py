"""OpenTelemetry: spans received over real OTLP (HTTP and gRPC) from a real gunicorn, and the OTEL_* variables.

The spans are children of the caller's W3C trace context, carry the request's ID, model, version and batch size, and
have a child span per stage; the standard OTEL_* variables are honoured."""

from __future__ import annotations

import grpc
import pytest
import requests

from service.request_context import STAGES
from service.settings import Settings
from tests.helpers import GunicornServer, encode, image_bytes, pattern
from tests.otlp import OtlpGrpcReceiver, OtlpHttpReceiver

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
INFERENCE_STAGES = list(STAGES)


def traced_server(tmp_path, receiver, **settings) -> GunicornServer:
    server = GunicornServer(tmp_path, WORKERS=1, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                            OTEL_BSP_SCHEDULE_DELAY=50, **settings)
    server.wait_ready()
    return server


def children_of(spans: list[dict], span: dict) -> dict[str, dict]:
    return {child["name"]: child for child in spans if child["parent"] == span["span_id"]}


def test_tracing_is_off_unless_an_endpoint_is_set():
    assert not Settings.from_env({}).tracing_enabled
    assert Settings.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}).tracing_enabled
    assert not Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                                  "OTEL_SDK_DISABLED": "true"}).tracing_enabled
    assert Settings.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                              "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}).otlp_traces_protocol \
        == "http/protobuf"


def test_spans_over_otlp_http_continue_the_callers_trace(tmp_path):
    receiver = OtlpHttpReceiver()
    server = traced_server(tmp_path, receiver, OTEL_SERVICE_NAME="convserve-under-test")
    try:
        answer = requests.post(f"{server.url}/v1/models/lenet/classify", data=image_bytes(), timeout=10, headers={
            "Content-Type": "image/png", "X-Request-ID": "traced-1", "tracestate": "vendor=opaque",
            "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
        assert answer.status_code == 200
        spans = receiver.wait_for(lambda found: any(s["parent"] == CALLER_SPAN for s in found)
                                  and len(found) >= 1 + len(INFERENCE_STAGES))
    finally:
        server.stop()
        receiver.close()
    (request_span,) = [span for span in spans if span["parent"] == CALLER_SPAN]
    assert request_span["trace_id"] == TRACE_ID and request_span["trace_state"] == "vendor=opaque"
    assert request_span["name"] == "POST /v1/models/<name>/classify"
    attributes = request_span["attributes"]
    assert attributes["convserve.request_id"] == "traced-1" == answer.headers["X-Request-ID"]
    assert (attributes["convserve.model"], attributes["convserve.batch_size"], attributes["convserve.image_count"]) \
        == ("lenet", 1, 1)
    assert attributes["convserve.model_version"] == answer.json()["version"]
    assert attributes["convserve.precision"] == answer.json()["precision"]
    assert attributes["http.response.status_code"] == 200
    assert request_span["resource"]["service.name"] == "convserve-under-test"
    stages = children_of(spans, request_span)
    assert list(stages) == INFERENCE_STAGES, "a child span per stage, in the order they ran"
    for stage in stages.values():
        assert request_span["start"] <= stage["start"] <= stage["end"] <= request_span["end"]
        assert stage["trace_id"] == TRACE_ID
    assert stages["compute_infer"]["attributes"]["convserve.batch_size"] == 1


def test_spans_over_otlp_grpc_for_rest_and_grpc_calls_and_errors(tmp_path):
    import numpy as np
    from tritonclient import grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    receiver = OtlpGrpcReceiver()
    server = GunicornServer(tmp_path, grpc=True, WORKERS=1, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                            OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_BSP_SCHEDULE_DELAY=50)
    try:
        server.wait_ready()
        image = encode(pattern(32, 32, seed=4), "PNG")
        client = triton_grpc.InferenceServerClient(server.grpc_target)
        tensor = triton_grpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=object))
        client.infer("lenet", [tensor], headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01",
                                                 "x-request-id": "grpc-traced"})
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("nosuch")
        refused = requests.post(f"{server.url}/v1/models/lenet/classify", data=b"garbage", timeout=10,
                                headers={"Content-Type": "image/png"})
        assert refused.status_code == 400
        spans = receiver.wait_for(lambda found: {"inference.GRPCInferenceService/ModelInfer",
                                                 "inference.GRPCInferenceService/ModelMetadata",
                                                 "POST /v1/models/<name>/classify"} <= {s["name"] for s in found})
    finally:
        server.stop()
        receiver.close()
    (infer,) = [span for span in spans if span["name"].endswith("ModelInfer")]
    assert (infer["trace_id"], infer["parent"]) == (TRACE_ID, CALLER_SPAN)
    assert infer["attributes"]["convserve.request_id"] == "grpc-traced"
    assert infer["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert infer["resource"]["service.name"] == "convserve"
    assert {"queue", "compute_input", "compute_infer", "compute_output", "encode"} <= set(children_of(spans, infer))
    (missing,) = [span for span in spans if span["name"].endswith("ModelMetadata")]
    assert missing["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    (bad,) = [span for span in spans if span["name"].startswith("POST")]
    assert bad["attributes"]["http.response.status_code"] == 400 and bad["parent"] == "", "a new trace of its own"
    assert bad["attributes"]["convserve.request_id"] == refused.headers["X-Request-ID"]


def test_stages_as_events_put_them_on_the_request_span(tmp_path):
    receiver = OtlpHttpReceiver()
    server = traced_server(tmp_path, receiver, TRACE_STAGES="events")
    try:
        requests.post(f"{server.url}/v1/models/lenet/classify", data=image_bytes(), timeout=10,
                      headers={"Content-Type": "image/png", "X-Request-ID": "evented"})
        spans = receiver.wait_for(lambda found: any(s["attributes"].get("convserve.request_id") == "evented"
                                                    for s in found))
    finally:
        server.stop()
        receiver.close()
    (span,) = [s for s in spans if s["attributes"].get("convserve.request_id") == "evented"]
    assert [name for name, _ in span["events"]] == INFERENCE_STAGES
    assert all(attributes["convserve.duration_ms"] >= 0 for _, attributes in span["events"])
    assert not children_of(spans, span), "no child spans in this mode"


def test_the_sampler_from_the_environment_is_honoured(tmp_path):
    """parentbased_always_off: a caller's sampled trace is followed, a request without one is not traced."""
    receiver = OtlpHttpReceiver()
    server = traced_server(tmp_path, receiver, OTEL_TRACES_SAMPLER="parentbased_always_off")
    try:
        for _ in range(3):
            requests.get(f"{server.url}/v1/models", timeout=10, headers={"X-Request-ID": "not-sampled"})
        requests.get(f"{server.url}/v1/models", timeout=10, headers={
            "X-Request-ID": "sampled", "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
        spans = receiver.wait_for(lambda found: any(s["parent"] == CALLER_SPAN for s in found))
    finally:
        server.stop()
        receiver.close()
    ids = {span["attributes"].get("convserve.request_id") for span in spans if span["parent"] in ("", CALLER_SPAN)}
    assert ids == {"sampled"}, "the unsampled requests sent first were never exported"
