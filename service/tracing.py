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
encode for export, half a millisecond for a request and its six stages. A request queues one tuple with what its
spans need, and the export thread writes them as OTLP wire bytes (service/otlp_wire.py); ``make bench`` times both.
Everything else is the SDK's: the propagators, the sampler, the resource, the batch span processor and the
exporters with their settings and retries. The processor queues a request (its span and its stage spans) as one
item, so OTEL_BSP_MAX_QUEUE_SIZE and OTEL_BSP_MAX_EXPORT_BATCH_SIZE count requests: an export holds up to seven
times as many spans. Measured in a serving worker, queueing a span at a time cost 23 µs of a request's 50 µs.
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


class _Trace(tuple):
    """One traced request, queued in the SDK's batch span processor as one item and written as its span and stage
    spans, in OTLP wire bytes (service/otlp_wire.py), by the export thread, off the request's path: (trace ID, span
    ID, parent span ID or 0, tracestate, name, start and end as perf_counter seconds, attributes, error, remote
    parent, the stages passed: (stage, start, seconds) each, whether they are child spans or events, batch size).
    The processor asks only whether an item is sampled; every item queued here is."""

    __slots__ = ()
    context = None  # set to a sampled SpanContext when tracing starts

    def wire(self) -> list[bytes]:
        (trace_id, span_id, parent_id, trace_state, name, started, ended, attributes, error, remote_parent,
         passed, as_spans, batch_size) = self
        trace = trace_id.to_bytes(16, "big")
        span = span_id.to_bytes(8, "big")
        events = b"" if as_spans else b"".join([
            otlp_wire.event(_unix_ns(at), stage, {"convserve.duration_ms": round(seconds * 1000, 3)})
            for stage, at, seconds in passed])
        written = [otlp_wire.span(
            trace, span, parent_id.to_bytes(8, "big") if parent_id else None, trace_state, name,
            otlp_wire.SPAN_KIND_SERVER, _unix_ns(started), _unix_ns(ended), otlp_wire.attributes(attributes), events,
            error, remote_parent)]
        for stage, at, seconds in passed if as_spans else ():
            stage_attributes = _STAGE_ATTRIBUTES[stage]
            if stage == "compute_infer" and batch_size:
                stage_attributes = otlp_wire.attributes({"convserve.stage": STAGE_DESCRIPTIONS[stage],
                                                         "convserve.batch_size": batch_size})
            written.append(otlp_wire.span(
                trace, (getrandbits(64) or 1).to_bytes(8, "big"), span, trace_state, stage,
                otlp_wire.SPAN_KIND_INTERNAL, _unix_ns(at), _unix_ns(at + seconds), stage_attributes))
        return written


def _written(traces) -> list[bytes]:
    return [span for trace in traces for span in trace.wire()]


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
        from opentelemetry.sdk.trace import TracerProvider, sampling
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, get_current_span

        import service

        attributes = {"service.version": service.__version__,
                      "service.name": settings.OTEL_SERVICE_NAME or "convserve"}
        # the provider reads the sampler and the resource from the standard variables; its tracer is not used
        provider = TracerProvider(resource=Resource.create(attributes))
        self._sampler = provider.sampler
        # a request without a caller's context is always sampled by these two (the first is the default): no need
        # to ask the sampler for each such request
        self._samples_every_root = self._sampler.get_description() in (sampling.ALWAYS_ON.get_description(),
                                                                        sampling.DEFAULT_ON.get_description())
        envelope = otlp_wire.Envelope(dict(provider.resource.attributes), "convserve", service.__version__,
                                      provider.resource.schema_url)
        _Trace.context = SpanContext(1, 1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        self._processor = BatchSpanProcessor(_exporter(settings, envelope))
        self._extract, self._parent_of, self._server = propagate.extract, get_current_span, SpanKind.SERVER
        self._fields = tuple(propagate.get_global_textmap().fields)  # the headers OTEL_PROPAGATORS read
        log.info("tracing: OTLP %s to %s", self.protocol, settings.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
                 or settings.OTEL_EXPORTER_OTLP_ENDPOINT)

    def record(self, context: RequestContext, carrier, name: str, attributes: dict, error: bool,
               ended: float) -> None:
        """The request's span (a child of the caller's trace context in ``carrier``, when it has one) and a child
        span per stage it passed, or an event per stage. ``ended``: perf_counter at its end."""
        # the propagators' work only when the caller sent one of their headers (most requests send none)
        parent_context = self._extract(carrier) if any(carrier.get(field) for field in self._fields) else None
        parent = self._parent_of(parent_context).get_span_context()
        trace_id = parent.trace_id if parent.is_valid else getrandbits(128) or 1
        trace_state, sampler_attributes = "", None
        if parent_context is not None or not self._samples_every_root:
            sampling = self._sampler.should_sample(parent_context, trace_id, name, self._server, attributes)
            if not sampling.decision.is_sampled():
                return
            sampler_attributes = sampling.attributes
            if sampling.trace_state:
                trace_state = ",".join(f"{key}={value}" for key, value in sampling.trace_state.items())
        span_attributes = {"convserve.request_id": context.id, **attributes}
        if context.model is not None:
            span_attributes.update({"convserve.model": context.model, "convserve.model_version": context.version,
                                    "convserve.precision": context.precision or "",
                                    "convserve.image_count": context.images or 0})
        if context.batch_size:
            span_attributes["convserve.batch_size"] = context.batch_size
        if context.shed_reason:
            span_attributes["convserve.shed_reason"] = context.shed_reason
        if sampler_attributes:
            span_attributes.update(sampler_attributes)
        starts, stages = context.starts, context.stages
        self._processor.on_end(_Trace((
            trace_id, getrandbits(64) or 1, parent.span_id if parent.is_valid else 0, trace_state, name,
            context.started, ended, span_attributes, error, parent.is_remote,
            [(stage, starts[stage], stages[stage]) for stage in STAGES if stage in starts], self.stage_spans,
            context.batch_size)))

    def shutdown(self) -> None:
        if self._processor is not None:
            self._processor.shutdown()


_STAGE_ATTRIBUTES = {stage: otlp_wire.attributes({"convserve.stage": description})
                     for stage, description in STAGE_DESCRIPTIONS.items()}


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
