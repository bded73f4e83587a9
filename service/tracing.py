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
"""

from __future__ import annotations

import logging
import time

from service.request_context import STAGE_DESCRIPTIONS, STAGES, RequestContext
from service.settings import Settings

log = logging.getLogger("convserve")

# perf_counter (what the stages are timed with) → Unix nanoseconds (what spans carry)
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def _unix_ns(perf_seconds: float) -> int:
    return int(perf_seconds * 1e9) + _EPOCH_OFFSET_NS


class Tracing:
    """The worker's tracer, or nothing: ``enabled`` is False unless an OTLP endpoint is configured."""

    def __init__(self, settings: Settings):
        self.enabled = settings.tracing_enabled
        self.protocol = settings.otlp_traces_protocol
        self.stage_spans = settings.TRACE_STAGES == "spans"
        self._tracer = None
        if not self.enabled:
            return
        from opentelemetry import propagate
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

        import service

        attributes = {"service.version": service.__version__,
                      "service.name": settings.OTEL_SERVICE_NAME or "convserve"}
        provider = TracerProvider(resource=Resource.create(attributes))  # the sampler: OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
        self._provider = provider
        self._tracer = provider.get_tracer("convserve", service.__version__)
        self._extract, self._in_context = propagate.extract, set_span_in_context
        self._server, self._internal, self._status, self._error = SpanKind.SERVER, SpanKind.INTERNAL, Status, \
            StatusCode.ERROR
        log.info("tracing: OTLP %s to %s", self.protocol, settings.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
                 or settings.OTEL_EXPORTER_OTLP_ENDPOINT)

    def record(self, context: RequestContext, carrier, name: str, attributes: dict, error: bool,
               ended: float) -> None:
        """The request's span (a child of the caller's trace context in ``carrier``, when it has one) and a child
        span per stage it passed. ``ended``: perf_counter at its end."""
        parent = self._extract(carrier)
        span = self._tracer.start_span(name, context=parent, kind=self._server,
                                       start_time=_unix_ns(context.started))
        if not span.is_recording():
            return
        span.set_attributes({"convserve.request_id": context.id, **attributes})
        if context.model is not None:
            span.set_attributes({"convserve.model": context.model, "convserve.model_version": context.version,
                                 "convserve.precision": context.precision or "",
                                 "convserve.image_count": context.images or 0})
        if context.batch_size:
            span.set_attribute("convserve.batch_size", context.batch_size)
        if context.shed_reason:
            span.set_attribute("convserve.shed_reason", context.shed_reason)
        if error:
            span.set_status(self._status(self._error))
        if self.stage_spans:
            inside = self._in_context(span)
            for stage in STAGES:
                if stage in context.starts:
                    started = context.starts[stage]
                    child = self._tracer.start_span(stage, context=inside, kind=self._internal,
                                                    start_time=_unix_ns(started))
                    child.set_attribute("convserve.stage", STAGE_DESCRIPTIONS[stage])
                    if stage == "compute_infer" and context.batch_size:
                        child.set_attribute("convserve.batch_size", context.batch_size)
                    child.end(end_time=_unix_ns(started + context.stages[stage]))
        else:
            for stage in STAGES:
                if stage in context.starts:
                    span.add_event(stage, {"convserve.duration_ms": round(context.stages[stage] * 1000, 3)},
                                   timestamp=_unix_ns(context.starts[stage]))
        span.end(end_time=_unix_ns(ended))

    def shutdown(self) -> None:
        if self._tracer is not None:
            self._provider.shutdown()


def _exporter(settings: Settings):
    """The OTLP span exporter of the protocol, to the endpoint the settings give (the signal's URL as given, or
    the base URL with /v1/traces for http/protobuf, as the specification says); headers, timeouts, compression
    and certificates it reads from OTEL_* itself."""
    endpoint = settings.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    if settings.otlp_traces_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint or settings.OTEL_EXPORTER_OTLP_ENDPOINT)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint or settings.OTEL_EXPORTER_OTLP_ENDPOINT.rstrip("/") + "/v1/traces")
