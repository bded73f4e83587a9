"""OpenTelemetry tracing: a span per request, with a child span per stage, exported over OTLP.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (and OTEL_SDK_DISABLED is not
true); off, a request costs one attribute check and nothing is imported. On, each worker (after fork: the SDK's
export thread does not survive one) has its own tracer provider and batch span processor. The standard variables
choose the rest: OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL (``http/protobuf``, the default, or ``grpc``), OTEL_SERVICE_NAME
(default ``convserve``), and, read by the SDK itself, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG],
OTEL_BSP_*, OTEL_EXPORTER_OTLP[_TRACES]_HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE and OTEL_PROPAGATORS.

A client's W3C ``traceparent`` and ``tracestate`` (HTTP headers, gRPC metadata) make the request's span a child of
the caller's, tracestate kept. The spans are made when the request ends, from the timings its context recorded
(service/request_context.py): the stages ran on other threads, often in a batch with other requests, so they are
placed by their recorded start and length rather than opened around the code.

The spans are not SDK span objects: measured here, those cost about 190 µs a request to make and 40-70 µs a span to
encode for export, half a millisecond for a request and its six stages. A request queues each of its spans as a
tuple (about 10 µs in all), and the export thread writes them as OTLP wire bytes (service/otlp_wire.py, about
30 µs a request); ``make bench`` prints both. Everything else is the SDK's: the propagators, the sampler, the
resource, the batch span processor (which queues each tuple as a span, so OTEL_BSP_* count spans) and the
exporters with their settings and retries.
"""

from __future__ import annotations

import logging
import time
from random import getrandbits

from service import otlp_wire
from service.request_context import STAGE_DESCRIPTIONS, STAGES, RequestContext
from service.settings import Settings

log = logging.getLogger("convserve")

# perf_counter (what the stages are timed with) → Unix nanoseconds (what spans carry)
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def _unix_ns(perf_seconds: float) -> int:
    return int(perf_seconds * 1e9) + _EPOCH_OFFSET_NS


class _Span(tuple):
    """One finished span, queued in the SDK's batch span processor and written as OTLP wire bytes
    (service/otlp_wire.py) by its export thread, off the request's path: (trace ID, span ID, parent span ID or 0,
    tracestate, name, kind, start and end as perf_counter seconds, attributes (a dict, or already written),
    events, error, remote parent).
    The processor asks only whether a span is sampled; every span queued here is."""

    __slots__ = ()
    context = None  # set to a sampled SpanContext when tracing starts

    def wire(self) -> bytes:
        (trace_id, span_id, parent_id, trace_state, name, kind, started, ended, attributes, events, error,
         remote_parent) = self
        return otlp_wire.span(
            trace_id.to_bytes(16, "big"), span_id.to_bytes(8, "big"), parent_id.to_bytes(8, "big") if parent_id
            else None, trace_state, name, kind, _unix_ns(started), _unix_ns(ended),
            attributes if attributes.__class__ is bytes else otlp_wire.attributes(attributes),
            b"".join([otlp_wire.event(_unix_ns(at), stage, fields) for at, stage, fields in events]), error,
            remote_parent)


def _written(spans) -> list[bytes]:
    return [span.wire() for span in spans]


class Tracing:
    """The worker's tracer, or nothing: ``enabled`` is False unless an OTLP endpoint is configured.

    The OpenTelemetry SDK decides, exports and reads the standard variables: its propagators read the caller's
    context, its sampler (OTEL_TRACES_SAMPLER) samples, its resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES)
    names the service, its BatchSpanProcessor (OTEL_BSP_*) batches and its OTLP exporters send. Only the spans are
    this service's own: tuples written as wire bytes at export, instead of SDK span objects, which cost ten times
    as much."""

    def __init__(self, settings: Settings):
        self.enabled = settings.tracing_enabled
        self.protocol = settings.otlp_traces_protocol
        self.stage_spans = settings.TRACE_STAGES == "spans"
        self._processor = None
        if not self.enabled:
            return
        from opentelemetry import propagate
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, get_current_span

        import service

        attributes = {"service.version": service.__version__,
                      "service.name": settings.OTEL_SERVICE_NAME or "convserve"}
        # the provider reads the sampler and the resource from the standard variables; its tracer is not used
        provider = TracerProvider(resource=Resource.create(attributes))
        self._sampler = provider.sampler
        envelope = otlp_wire.Envelope(dict(provider.resource.attributes), "convserve", service.__version__,
                                      provider.resource.schema_url)
        _Span.context = SpanContext(1, 1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        self._processor = BatchSpanProcessor(_exporter(settings, envelope))
        self._extract, self._parent_of, self._server = propagate.extract, get_current_span, SpanKind.SERVER
        log.info("tracing: OTLP %s to %s", self.protocol, settings.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
                 or settings.OTEL_EXPORTER_OTLP_ENDPOINT)

    def record(self, context: RequestContext, carrier, name: str, attributes: dict, error: bool,
               ended: float) -> None:
        """The request's span (a child of the caller's trace context in ``carrier``, when it has one) and a child
        span per stage it passed, or an event per stage. ``ended``: perf_counter at its end."""
        parent_context = self._extract(carrier)
        parent = self._parent_of(parent_context).get_span_context()
        trace_id = parent.trace_id if parent.is_valid else getrandbits(128) or 1
        sampling = self._sampler.should_sample(parent_context, trace_id, name, self._server, attributes)
        if not sampling.decision.is_sampled():
            return
        span_attributes = {"convserve.request_id": context.id, **attributes}
        if context.model is not None:
            span_attributes.update({"convserve.model": context.model, "convserve.model_version": context.version,
                                    "convserve.precision": context.precision or "",
                                    "convserve.image_count": context.images or 0})
        if context.batch_size:
            span_attributes["convserve.batch_size"] = context.batch_size
        if context.shed_reason:
            span_attributes["convserve.shed_reason"] = context.shed_reason
        if sampling.attributes:
            span_attributes.update(sampling.attributes)
        trace_state = ",".join(f"{key}={value}" for key, value in sampling.trace_state.items()) \
            if sampling.trace_state else ""
        span_id = getrandbits(64) or 1
        starts, stages = context.starts, context.stages
        events = ()
        emit = self._processor.on_end
        if self.stage_spans:
            for stage in STAGES:
                if stage in starts:
                    started = starts[stage]
                    stage_attributes = _STAGE_ATTRIBUTES[stage]
                    if stage == "compute_infer" and context.batch_size:
                        stage_attributes = {"convserve.stage": STAGE_DESCRIPTIONS[stage],
                                            "convserve.batch_size": context.batch_size}
                    emit(_Span((trace_id, getrandbits(64) or 1, span_id, trace_state, stage, _INTERNAL, started,
                                started + stages[stage], stage_attributes, (), False, False)))
        else:
            events = [(starts[stage], stage, {"convserve.duration_ms": round(stages[stage] * 1000, 3)})
                      for stage in STAGES if stage in starts]
        emit(_Span((trace_id, span_id, parent.span_id if parent.is_valid else 0, trace_state, name, _SERVER,
                    context.started, ended, span_attributes, events, error, parent.is_remote)))

    def shutdown(self) -> None:
        if self._processor is not None:
            self._processor.shutdown()


_STAGE_ATTRIBUTES = {stage: otlp_wire.attributes({"convserve.stage": description})
                     for stage, description in STAGE_DESCRIPTIONS.items()}
_SERVER, _INTERNAL = otlp_wire.SPAN_KIND_SERVER, otlp_wire.SPAN_KIND_INTERNAL


def _exporter(settings: Settings, envelope: otlp_wire.Envelope):
    """The SDK's OTLP span exporter of the protocol, to the endpoint the settings give (the signal's URL as given,
    or the base URL with /v1/traces for http/protobuf, as the specification says), sending the spans' own bytes
    framed by ``envelope``; headers, timeouts, compression, retries and certificates stay the SDK's, read from
    OTEL_* by it."""
    endpoint = settings.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    if settings.otlp_traces_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        class WireGrpcExporter(GrpcExporter):
            def _translate_data(self, data):  # the hook the gRPC exporter builds its request message in
                return ExportTraceServiceRequest.FromString(envelope.request(_written(data)))

        return WireGrpcExporter(endpoint=endpoint or settings.OTEL_EXPORTER_OTLP_ENDPOINT)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class WireHttpExporter(HttpExporter):
        def export(self, spans) -> SpanExportResult:  # the SDK's, with its encoder replaced
            if self._shutdown:
                return SpanExportResult.FAILURE
            with self._metrics.export_operation(len(spans)) as result:
                sent = self._client.export(envelope.request(_written(spans)))
                if not sent.success:
                    result.error = sent.error
                    return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    return WireHttpExporter(endpoint=endpoint or settings.OTEL_EXPORTER_OTLP_ENDPOINT.rstrip("/") + "/v1/traces")
