"""The Open Inference Protocol over gRPC and grpc.health.v1, on GRPC_PORT, in every gunicorn worker.

``inference.GRPCInferenceService`` as Triton, KServe and MLServer serve it, and the standard health service
(``grpc.health.v1.Health``).

Each worker runs its own gRPC server on the same port (SO_REUSEPORT: the kernel spreads connections over the
workers), beside its HTTP server, sharing everything with REST: the models, the inference queue (batching and
shedding), API keys, metrics and the drain. Why in each worker rather than a worker type of its own: the queue, the
models and the readiness are per worker, so sharing them needs no copy and no hop between processes; README
"gRPC" has the measurements.

A call runs on one of the server's GRPC_MAX_CALLS threads (more get RESOURCE_EXHAUSTED from gRPC itself, at once).
Its inference waits in the worker's inference queue with REST's requests (service/inference_queue.py), batched with
them; when its turn comes the gRPC thread runs the batch itself, which saves the hand-over to the event loop and its
thread pool that REST needs. A full queue answers RESOURCE_EXHAUSTED with ``retry-after`` and ``grpc-retry-pushback-ms``
trailers; a call waits at most 40 % of what its deadline leaves. Messages are parsed here, not by gRPC, so a message
that is not the protocol's answers INVALID_ARGUMENT rather than an internal error. Errors map from the service's
typed errors (service/errors.py) by HTTP status.

Where the workers have CPUs to themselves (GRPC_CPU_AFFINITY), a worker's call threads and the server's polling thread
keep to the worker's own CPU: a call passes between three or four threads (polling thread, call thread, the batch's
leader), and a wake-up on the same CPU is a context switch where one on another CPU is an inter-processor interrupt,
costly in a VM. REST's threads stay free: its event loop and inference thread gain from running on two CPUs at once.
README "REST and gRPC" has the measurements.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import os
import threading
import time

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import service
from service import logs, metrics, oip, request_context
from service.errors import InvalidTensor, Overloaded, ServiceError, Unauthorized
from service.logs import ACCESS_LOGGER
from service.proto import inference_pb2 as pb
from service.request_context import REQUEST_ID_METADATA
from service.statistics import model_statistics, versions_covered

log = logging.getLogger("convserve")
access_log = logging.getLogger(ACCESS_LOGGER)

SERVICE = "inference.GRPCInferenceService"  # the protocol's name for it, whatever the .proto's package
# Health service names a probe may ask for: "" and the inference service are readiness, "liveness" liveness.
LIVENESS, READINESS = "liveness", "readiness"
HEALTH_REFRESH_SECONDS = 0.5  # how fresh Watch streams are; Check is computed on each call
DEADLINE_SHARE_FOR_QUEUEING = 0.4
CALL_THREAD_NAME = b"grpc-call"  # the OS name of the threads that run calls (at most 15 bytes)
PR_SET_NAME = 15  # prctl(2)
# gRPC code for each HTTP status the service's errors carry; the metric's status label stays the HTTP one.
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
         408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         415: grpc.StatusCode.INVALID_ARGUMENT, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}


class GrpcServer:
    """The worker's gRPC server, over the worker's AppState (service/__init__.py)."""

    def __init__(self, state):
        self.state = state
        self.settings = state.settings
        self.health = _Health(self)
        self.server: grpc.Server | None = None
        self.port = 0
        self._refresh_stop = threading.Event()
        self._methods = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live, False),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready, False),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready, True),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata, True),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata, True),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config, True),
            "ModelInfer": (pb.ModelInferRequest, self.model_infer, True),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics, True),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index, True),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.repository_load, True),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.repository_unload, True),
        }

    # lifecycle -----------------------------------------------------------------------------------------------------
    def start(self, host: str, port: int, cpu: int | None = None) -> int:
        """Serve on ``port``; ``cpu``: the CPU this worker's gRPC threads keep to (GRPC_CPU_AFFINITY), or None."""
        settings = self.settings
        calls = settings.GRPC_MAX_CALLS
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._handler(name, *entry))
                    for name, entry in self._methods.items()}
        self.server = grpc.server(
            _RealThreadPool(max_workers=calls, thread_name_prefix="grpc", initializer=_call_thread, initargs=(cpu,)),
            handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
            maximum_concurrent_rpcs=calls,
            options=[("grpc.so_reuseport", 1),
                     ("grpc.max_receive_message_length", settings.MAX_UPLOAD_BYTES),
                     ("grpc.max_send_message_length", 64 * 1024 * 1024),
                     # An idle connection is closed, as REST's keep-alive is, so idle clients cost nothing for long.
                     ("grpc.max_connection_idle_ms", 300_000),
                     ("grpc.http2.max_pings_without_data", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if cpu is None:
            self.server.start()
        else:  # from a thread kept to the CPU: the server's polling thread, started there, inherits it
            failed: list[BaseException] = []
            starter = threading.Thread(target=_kept_to, args=(cpu, self.server.start, failed), name="grpc-start")
            starter.start()
            starter.join()
            if failed:
                raise failed[0]
        threading.Thread(target=self._refresh_health, name="grpc-health", daemon=True).start()
        log.info("gRPC (Open Inference Protocol, grpc.health.v1) on %s%s", address,
                 "" if cpu is None else f", its threads on CPU {cpu}")
        return self.port

    def stop(self, grace: float) -> threading.Event:
        """Refuse new calls, let those in flight finish for ``grace`` seconds; the event is set once stopped."""
        self._refresh_stop.set()
        self.health.enter_graceful_shutdown()
        return self.server.stop(grace)

    def _refresh_health(self) -> None:
        while not self._refresh_stop.wait(HEALTH_REFRESH_SECONDS):
            for name in ("", SERVICE, READINESS, LIVENESS):
                self.health.set(name, self.health.status_of(name))

    # one call ------------------------------------------------------------------------------------------------------
    def _handler(self, name: str, message_type, method, protected: bool):
        route = f"/{SERVICE}/{name}"

        def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
            status, code = 200, grpc.StatusCode.OK
            metadata = _Metadata(context.invocation_metadata())
            call = request_context.begin(metadata.get(REQUEST_ID_METADATA))
            context.set_trailing_metadata(((REQUEST_ID_METADATA, call.id),))  # with the status: no extra frame
            metrics.IN_FLIGHT.inc()
            try:
                if protected:
                    self.state.api_keys.require(metadata)
                try:
                    request = message_type.FromString(raw)
                except DecodeError:
                    raise InvalidTensor(f"The message is not a {name} request of the Open Inference "
                                        "Protocol.") from None
                answer = method(request, len(raw), context)
                began = time.perf_counter()
                encoded = answer.SerializeToString()
                call.add("encode", time.perf_counter() - began, began)
                return encoded
            except ServiceError as error:
                status, code = error.status, _code_of(error)
                if isinstance(error, Overloaded):
                    call.shed_reason = error.reason
                _abort(context, error, call.id)
            except Exception:
                status, code = 500, grpc.StatusCode.INTERNAL
                log.exception("unhandled error in gRPC %s", name)
                context.abort(grpc.StatusCode.INTERNAL, "Internal error; the server log has the details.")
            finally:
                total = call.elapsed()
                metrics.IN_FLIGHT.dec()
                count, latency = metrics.request_series(route, "POST", status, "grpc")
                count.inc()
                latency.observe(total)
                if call.model is not None and "encode" in call.stages:
                    metrics.version_series(call.model, call.version).stages["encode"].observe(call.stages["encode"])
                if self.state.tracing.enabled:
                    self.state.tracing.record(call, metadata.pairs, route.lstrip("/"), {
                        "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": name,
                        "rpc.grpc.status_code": code.value[0]}, status >= 500, time.perf_counter())
                if access_log.isEnabledFor(logging.INFO):
                    summary, peer, extra = call.summary(), context.peer(), {"request_id": call.id}
                    if logs.structured():
                        extra.update(protocol="grpc", method=name, path=route, status=status,
                                     total_ms=round(total * 1000, 3), remote=peer, **call.fields())
                    access_log.info("%s gRPC %s %d %.2fms%s", peer, name, status, total * 1000,
                                    f" {summary}" if summary else "", extra=extra)
                request_context.end()

        return handle

    # the methods ---------------------------------------------------------------------------------------------------
    def server_live(self, request, size: int, context):
        return pb.ServerLiveResponse(live=self.state.pipeline.queue.unhealthy is None)

    def server_ready(self, request, size: int, context):
        return pb.ServerReadyResponse(ready=self.state.registry.ready)

    def model_ready(self, request, size: int, context):
        try:
            model = self.state.registry.get(_required(request.name, "name"), request.version or None)
        except ServiceError as error:
            if error.status == 503 or error.code == "model_unloaded":
                return pb.ModelReadyResponse(ready=False)
            raise
        return pb.ModelReadyResponse(ready=model.ready)

    def server_metadata(self, request, size: int, context):
        return pb.ServerMetadataResponse(name="convserve", version=service.__version__, extensions=oip.EXTENSIONS)

    def model_metadata(self, request, size: int, context):
        registry = self.state.registry
        model = registry.get(_required(request.name, "name"), request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=registry.loaded_versions(model.name), platform="onnxruntime_onnx",
            inputs=[tensor(**tensor_input) for tensor_input in oip.input_metadata(model)],
            outputs=[tensor(**output) for output in oip.output_metadata(model)])

    def model_config(self, request, size: int, context):
        model = self.state.registry.get(_required(request.name, "name"), request.version or None)
        return pb.ModelConfigResponse(config=json_format.ParseDict(oip.model_config(model), pb.ModelConfig()))

    def model_infer(self, request, size: int, context):
        state = self.state
        model = state.registry.get(_required(request.model_name, "model_name"), request.model_version or None)
        header, binary = infer_request(request)
        queue = state.pipeline.queue
        held = 0
        try:
            queue.admit()
            held = queue.hold_bytes(size)
            body, blobs = state.pipeline.infer(model, header, binary, _patience(context))
        finally:
            if held:
                queue.release_bytes(held)
        return infer_response(body, blobs)

    def model_statistics(self, request, size: int, context):
        versions = versions_covered(self.state.registry, request.name or None, request.version or None)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(entry) for entry in model_statistics(versions)])

    def repository_index(self, request, size: int, context):
        entries = self.state.repository.index(request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    def repository_load(self, request, size: int, context):
        self.state.repository.load(_required(request.model_name, "model_name"))
        return pb.RepositoryModelLoadResponse()

    def repository_unload(self, request, size: int, context):
        self.state.repository.unload(_required(request.model_name, "model_name"))
        return pb.RepositoryModelUnloadResponse()


def _call_thread(cpu: int | None) -> None:
    """A call thread starts: named for ``top -H`` and /proc/<pid>/task/<tid>/comm, and kept to ``cpu``."""
    _name_thread(CALL_THREAD_NAME)
    if cpu is not None:
        _set_affinity({cpu})


def _kept_to(cpu: int, then, failed: list) -> None:
    _set_affinity({cpu})
    try:
        then()
    except BaseException as error:  # noqa: BLE001 - raised again by the thread that waits for this one
        failed.append(error)


def _set_affinity(cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)  # 0: the calling thread
    except OSError as exc:  # a CPU taken away since the worker started: unpinned is still correct
        log.warning("gRPC thread not kept to CPU %s: %s", sorted(cpus), exc)


def _name_thread(name: bytes) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):  # not on Linux
        pass


class _RealThreadPool(concurrent.futures.ThreadPoolExecutor):
    """A thread pool whose work queue is a real one: the gevent worker patches the queue module (not threads), and
    gevent's queue blocks forever when a real thread waits on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            from gevent import monkey

            self._work_queue = monkey.get_original("queue", "SimpleQueue")()
        except ImportError:
            pass


class _Health(health.HealthServicer):
    """grpc.health.v1: Check answers from the worker's state at the moment; Watch streams it (refreshed every
    HEALTH_REFRESH_SECONDS)."""

    def __init__(self, owner: GrpcServer):
        super().__init__()
        self.owner = owner

    def status_of(self, name: str):
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        state = self.owner.state
        if name == LIVENESS:
            return serving if state.pipeline.queue.unhealthy is None else not_serving
        if name in ("", SERVICE, READINESS):
            return serving if state.registry.ready else not_serving
        return None

    def Check(self, request, context):  # noqa: N802 - the protocol's name
        status = self.status_of(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Unknown service {request.service[:100]!r}: ask for '' or "
                                                     f"{SERVICE!r} (readiness), or 'liveness'.")
        return health_pb2.HealthCheckResponse(status=status)


class _Metadata:
    """gRPC metadata as the API key check reads headers (names are lower-case in gRPC)."""

    def __init__(self, pairs):
        self.pairs = {key.lower(): value for key, value in (pairs or ()) if isinstance(value, str)}

    def get(self, name: str, default: str = "") -> str:
        return self.pairs.get(name.lower(), default)


# the protocol's messages ↔ the service's requests (service/oip.py reads and answers both protocols) ---------------
def infer_request(message) -> tuple[dict, bytes]:
    """A ModelInferRequest as /v2's JSON request and binary part: raw contents, or typed contents made raw."""
    if len(message.inputs) != 1:
        raise InvalidTensor("Expected exactly one input tensor: FP32 \"input\" [N,3,H,W] or BYTES \"image\" [N].")
    if message.raw_input_contents and len(message.raw_input_contents) != len(message.inputs):
        raise InvalidTensor("raw_input_contents must hold one entry per input.")
    tensor = message.inputs[0]
    if message.raw_input_contents:
        binary = message.raw_input_contents[0]
    elif tensor.datatype == "FP32":
        binary = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
    elif tensor.datatype == "BYTES":
        binary = oip.bytes_tensor(tensor.contents.bytes_contents)
    else:
        binary = b""
    entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
             "parameters": {"binary_data_size": len(binary)}}
    request = {"inputs": [entry], "parameters": {"binary_data_output": True}}
    if message.outputs:
        request["outputs"] = [{"name": output.name, "parameters": {
            "binary_data": True, **{key: _value(value) for key, value in output.parameters.items()
                                    if key == "classification"}}} for output in message.outputs]
    if message.id:
        request["id"] = message.id
    return request, binary


def infer_response(body: dict, blobs: list[bytes]):
    tensor = pb.ModelInferResponse.InferOutputTensor
    response = pb.ModelInferResponse(
        model_name=body["model_name"], model_version=body["model_version"], id=body.get("id", ""),
        outputs=[tensor(name=o["name"], datatype=o["datatype"], shape=o["shape"]) for o in body["outputs"]])
    response.raw_output_contents.extend(blobs)
    return response


def _value(parameter):
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def _statistics(entry: dict):
    stats = entry["inference_stats"]
    return pb.ModelStatistics(
        name=entry["name"], version=entry["version"], last_inference=entry["last_inference"],
        inference_count=entry["inference_count"], execution_count=entry["execution_count"],
        inference_stats=pb.InferStatistics(**{k: pb.StatisticDuration(**v) for k, v in stats.items()}),
        batch_stats=[pb.InferBatchStatistics(batch_size=b["batch_size"], **{
            k: pb.StatisticDuration(**b[k]) for k in ("compute_input", "compute_infer", "compute_output")})
            for b in entry["batch_stats"]])


def _patience(context) -> float | None:
    """How long the call may wait in the queue: 40 % of what its deadline leaves (the rest is for the work, the
    answer and a busy machine), so a busy server answers RESOURCE_EXHAUSTED before the client gives up."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e6 else max(0.0, remaining * DEADLINE_SHARE_FOR_QUEUEING)


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidTensor(f"{field} is required: name a model (GET /v1/models lists them).")
    return value


def _code_of(error: ServiceError) -> grpc.StatusCode:
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(error, Overloaded) else CODES.get(
        error.status, grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.UNAVAILABLE)


def _abort(context: grpc.ServicerContext, error: ServiceError, request_id: str) -> None:
    code = _code_of(error)
    if error.retry_after is not None:
        context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id), ("retry-after", str(error.retry_after)),
                                       ("grpc-retry-pushback-ms", str(int(error.retry_after * 1000)))))
    if isinstance(error, Unauthorized):
        log.info("gRPC call refused: %s", error.message)
    context.abort(code, error.message)
