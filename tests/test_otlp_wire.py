"""The spans' own OTLP bytes (service/otlp_wire.py) are what the OpenTelemetry SDK's encoder makes of the same spans.

Parsed with the official generated messages, and byte for byte. Then a request's recorded spans have the shape of a
trace, and the SDK's sampler decides which are recorded."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from service import otlp_wire
from service.request_context import STAGES, RequestContext
from service.settings import Settings
from service.tracing import Tracing, _written

RESOURCE = Resource({"service.name": "convserve", "service.version": "1.0", "deployment.environment": "test"})
SCOPE = InstrumentationScope("convserve", "1.0")
TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
ATTRIBUTES = {"convserve.request_id": "r-1", "http.response.status_code": 200, "convserve.batch_size": 3,
              "url.path": "/v1/models/" + "é" * 90 + "/classify",  # over 127 bytes: a two-byte length
              "big": 2**40, "negative": -5, "flag": True, "off": False, "ratio": 0.25}


def sdk_span(span_id: int, parent: SpanContext | None, kind: SpanKind, attributes: dict, events=(),
             error: bool = False, trace_state: TraceState | None = None) -> ReadableSpan:
    context = SpanContext(TRACE, span_id, is_remote=False, trace_flags=TraceFlags(1), trace_state=trace_state)
    return ReadableSpan("POST /v1/models/<name>/classify" if kind == SpanKind.SERVER else "compute_infer",
                        context=context, parent=parent, resource=RESOURCE, attributes=attributes, events=events,
                        kind=kind, status=Status(StatusCode.ERROR if error else StatusCode.UNSET),
                        start_time=1_700_000_000_123_456_789, end_time=1_700_000_000_124_456_789,
                        instrumentation_scope=SCOPE)


def wire_span(span_id: int, parent_id: int | None, kind: int, attributes: dict, events: bytes = b"",
              error: bool = False, trace_state: str = "", remote_parent: bool = False) -> bytes:
    return otlp_wire.span(TRACE.to_bytes(16, "big"), span_id.to_bytes(8, "big"),
                          parent_id.to_bytes(8, "big") if parent_id else None, trace_state,
                          "POST /v1/models/<name>/classify" if kind == otlp_wire.SPAN_KIND_SERVER else "compute_infer",
                          kind, 1_700_000_000_123_456_789, 1_700_000_000_124_456_789,
                          otlp_wire.attributes(attributes), events, error, remote_parent)


def parsed(spans: list[bytes]) -> ExportTraceServiceRequest:
    envelope = otlp_wire.Envelope(dict(RESOURCE.attributes), SCOPE.name, SCOPE.version)
    return ExportTraceServiceRequest.FromString(envelope.request(spans))


def test_the_wire_bytes_are_what_the_sdk_encodes():
    caller = SpanContext(TRACE, 0x00F067AA0BA902B7, is_remote=True, trace_flags=TraceFlags(1))
    request = SpanContext(TRACE, 0x1111, is_remote=False, trace_flags=TraceFlags(1))
    state = TraceState([("vendor", "opaque"), ("other", "x")])
    expected = encode_spans([
        sdk_span(0x1111, caller, SpanKind.SERVER, ATTRIBUTES, error=True, trace_state=state),
        sdk_span(0x2222, request, SpanKind.INTERNAL, {"convserve.stage": "the ONNX Runtime call it ran in"}),
        sdk_span(0x3333, None, SpanKind.SERVER, {"convserve.request_id": "root"},
                 events=[Event("queue", {"convserve.duration_ms": 0.125}, timestamp=1_700_000_000_123_500_000)]),
    ])
    written = parsed([
        wire_span(0x1111, 0x00F067AA0BA902B7, otlp_wire.SPAN_KIND_SERVER, ATTRIBUTES, error=True,
                  trace_state="vendor=opaque,other=x", remote_parent=True),
        wire_span(0x2222, 0x1111, otlp_wire.SPAN_KIND_INTERNAL, {"convserve.stage": "the ONNX Runtime call it ran in"}),
        wire_span(0x3333, None, otlp_wire.SPAN_KIND_SERVER, {"convserve.request_id": "root"},
                  events=otlp_wire.event(1_700_000_000_123_500_000, "queue", {"convserve.duration_ms": 0.125})),
    ])
    assert written == expected
    assert written.SerializeToString() == expected.SerializeToString()


def test_a_value_the_protocol_cannot_carry_is_dropped_as_the_sdk_drops_it():
    kept = {"convserve.model": "lenet"}
    assert otlp_wire.attributes({**kept, "convserve.version": None, "convserve.shape": (1, 2)}) \
        == otlp_wire.attributes(kept)
    assert otlp_wire.attributes({"convserve.cached": 1}) != otlp_wire.attributes({"convserve.cached": True}), \
        "1 == True, but an int and a bool are different values"


class Captured:
    """Stands in for the batch span processor: keeps what it is handed."""

    def __init__(self):
        self.spans: list[bytes] = []

    def on_end(self, span) -> None:
        assert span.context.trace_flags.sampled, "the SDK's batch processor drops what is not sampled"
        self.spans.append(span)

    def shutdown(self) -> None:
        pass


def recorded(monkeypatch, environment: dict, carrier: dict, stage_spans: bool = True) -> list:
    """The spans of one request's record, with ``environment`` set (the SDK reads it from os.environ)."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                                  "TRACE_STAGES": "spans" if stage_spans else "events"})
    tracing = Tracing(settings)
    tracing._processor.shutdown()
    captured = tracing._processor = Captured()
    context = RequestContext("r-7")
    context.model, context.version, context.precision, context.images, context.batch_size = \
        "lenet", "1", "fp32", 1, 4
    for offset, stage in enumerate(STAGES):
        context.add(stage, 0.001, context.started + offset * 0.001)
    tracing.record(context, carrier, "POST /v1/models/<name>/classify", {"http.response.status_code": 200},
                   False, context.started + 0.01)
    if not captured.spans:
        return []
    envelope = otlp_wire.Envelope({"service.name": "convserve"}, "convserve", "test")
    request = ExportTraceServiceRequest.FromString(envelope.request(_written(captured.spans)))
    return list(request.resource_spans[0].scope_spans[0].spans)


def test_a_request_is_a_server_span_with_a_child_per_stage_inside_it(monkeypatch):
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    spans = recorded(monkeypatch, {}, {"traceparent": caller, "tracestate": "vendor=opaque"})
    (request,) = [span for span in spans if span.kind == span.SPAN_KIND_SERVER]
    children = [span for span in spans if span.parent_span_id == request.span_id]
    assert request.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert request.parent_span_id.hex() == "00f067aa0ba902b7" and request.flags == 0x300
    assert [child.name for child in children] == list(STAGES) and len(spans) == 1 + len(STAGES)
    assert len({span.span_id for span in spans}) == len(spans)
    for child in children:
        assert child.trace_id == request.trace_id and child.trace_state == request.trace_state == "vendor=opaque"
        assert request.start_time_unix_nano <= child.start_time_unix_nano < child.end_time_unix_nano \
            <= request.end_time_unix_nano
        assert child.end_time_unix_nano - child.start_time_unix_nano == pytest.approx(1_000_000, abs=1_000)
    attributes = {pair.key: pair.value for pair in request.attributes}
    assert attributes["convserve.request_id"].string_value == "r-7"
    assert attributes["convserve.batch_size"].int_value == 4
    (infer,) = [child for child in children if child.name == "compute_infer"]
    assert {pair.key: pair.value.int_value for pair in infer.attributes}["convserve.batch_size"] == 4


def test_stages_as_events_and_a_new_trace_without_a_caller(monkeypatch):
    (span,) = recorded(monkeypatch, {}, {}, stage_spans=False)
    assert span.parent_span_id == b"" and span.flags == 0x100 and len(span.trace_id) == 16
    assert [event.name for event in span.events] == list(STAGES)


def test_the_sdks_sampler_decides(monkeypatch):
    caller_sampled_out = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    assert recorded(monkeypatch, {}, {"traceparent": caller_sampled_out}) == [], \
        "parentbased: the caller's decision stands"
    assert recorded(monkeypatch, {"OTEL_TRACES_SAMPLER": "always_off"}, {}) == []
    assert len(recorded(monkeypatch, {"OTEL_TRACES_SAMPLER": "always_on"}, {"traceparent": caller_sampled_out})) == 7
    assert len(recorded(monkeypatch, {}, {})) == 7, "the default samples a request without a caller"
    assert recorded(monkeypatch, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                  "OTEL_TRACES_SAMPLER_ARG": "0"}, {}) == [], "a ratio of 0 samples no root"
    assert recorded(monkeypatch, {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
                    {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) == [], \
        "a sampler that is not parent-based decides alone"
