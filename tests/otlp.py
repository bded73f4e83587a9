"""Real OTLP trace receivers, over HTTP and over gRPC, that decode the spans the service exports.

They are what a collector listens on: HTTP (protobuf, POST /v1/traces) and gRPC
(opentelemetry.proto.collector.trace.v1.TraceService/Export). Used by the tracing tests and by the benchmark's tracing
case."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.helpers import free_port


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Spans:
    """Spans received so far, each as a dict: name, trace_id and span_id (hex), parent (hex or ""), trace_state,
    attributes, resource (the resource's attributes), start and end (Unix ns)."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        self.requests = 0

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append({"name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                  "parent": span.parent_span_id.hex(), "trace_state": span.trace_state,
                                  "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                                  "resource": resource, "start": span.start_time_unix_nano,
                                  "end": span.end_time_unix_nano, "kind": span.kind,
                                  "events": [(event.name, {kv.key: _value(kv.value) for kv in event.attributes})
                                             for event in span.events]})
        with self.lock:
            self.spans.extend(found)
            self.requests += 1

    def wait_for(self, predicate, timeout: float = 15.0) -> list[dict]:
        """The spans once ``predicate(spans)`` holds; AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans not received within {timeout} s; got {[s['name'] for s in spans]}")
            time.sleep(0.05)


class OtlpHttpReceiver(Spans):
    """OTLP/HTTP with protobuf bodies on a free port of 127.0.0.1; ``endpoint`` is its base URL. With
    ``decode=False`` it only counts the export requests and their bytes (as a collector on another machine would
    cost this one nothing, the benchmark's receiver should cost little)."""

    def __init__(self, decode: bool = True):
        super().__init__()
        self.received_bytes = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                if decode:
                    receiver.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                else:
                    with receiver.lock:
                        receiver.requests += 1
                        receiver.received_bytes += len(body)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class OtlpGrpcReceiver(Spans):
    """OTLP/gRPC (insecure) on a free port of 127.0.0.1; ``endpoint`` is its URL."""

    def __init__(self):
        super().__init__()
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the protocol's name
                receiver.add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)
