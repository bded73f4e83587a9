"""The Open Inference Protocol (KServe v2 REST), as Triton, KServe and MLServer speak it.

Inputs: FP32 ``[N, 3, H, W]`` (preprocessed, named ``input``) or BYTES ``[N]`` (encoded images: base64 strings in
JSON, raw bytes with the binary tensor extension). Outputs: ``probabilities`` FP32 ``[N, labels]`` (calibrated),
``domain_score`` FP32 ``[N]`` and ``in_domain`` BOOL ``[N]`` (the "none of these" answer).
The binary tensor extension is supported both ways, so ``tritonclient.http`` works unchanged.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

import service
from service.api import encoded, reply, state
from service.api.openapi import Reply, documented
from service.api.schemas import (
    InferenceResponse,
    ModelConfigResponse,
    ModelMetadataResponse,
    ModelReady,
    ModelStatisticsList,
    RepositoryAnswer,
    RepositoryIndex,
    ServerLive,
    ServerMetadata,
    ServerReady,
)
from service.errors import InvalidJSON, NotReady
from service.inputs import request_body
from service.oip import EXTENSIONS, input_metadata, model_config, output_metadata
from service.payload import parse_json
from service.registry import describe_verification
from service.statistics import model_statistics, versions_covered

blueprint = Blueprint("v2", __name__, url_prefix="/v2")
HEADER_LENGTH = "Inference-Header-Content-Length"


@blueprint.get("")
@documented("Server metadata", "Name, version and protocol extensions.", tags=["inference"],
            responses={200: ServerMetadata})
def server_metadata():
    return reply(ServerMetadata, {"name": "convserve", "version": service.__version__,
                                  "extensions": EXTENSIONS})


@blueprint.get("/health/live")
@documented("Server liveness", "As /healthz: 200 `{\"live\": true}` while the worker answers, 503 "
            "`{\"live\": false}` once an inference outran INFERENCE_WATCHDOG_SECONDS.", tags=["inference", "health"],
            responses={200: ServerLive, 503: ServerLive})
def live():
    stuck = state().pipeline.queue.unhealthy is not None
    return reply(ServerLive, {"live": not stuck}, 503 if stuck else 200)


@blueprint.get("/health/ready")
@documented("Server readiness", "Ready as /readyz is: 200 `{\"ready\": true}`, else 503 `{\"ready\": false}`.",
            tags=["inference", "health"], responses={200: ServerReady, 503: ServerReady})
def ready():
    is_ready = state().registry.ready
    return reply(ServerReady, {"ready": is_ready}, 200 if is_ready else 503)


@blueprint.get("/models/<name>")
@blueprint.get("/models/<name>/versions/<version>")
@documented("Model metadata", "Inputs, outputs, labels and loaded versions. The inputs are FP32 [-1, 3, H, W] "
            "(preprocessed) and BYTES [-1] (encoded images); a request sends one of them. "
            "`parameters.alternative_input` repeats the BYTES one, for clients written before it was listed.",
            tags=["inference"],
            responses={200: ModelMetadataResponse}, errors=(404, 503))
def model_metadata(name: str, version: str | None = None):
    registry = state().registry
    model = registry.get(name, version)
    inputs = input_metadata(model)
    return reply(ModelMetadataResponse, dict(
        name=model.name,
        versions=registry.loaded_versions(model.name),
        platform="onnxruntime_onnx",
        inputs=inputs,
        outputs=output_metadata(model),
        parameters={"labels": model.labels, "alternative_input": inputs[1],
                    "precision": model.precision, "precision_reason": model.refusal,
                    "verification": describe_verification(model)},
    ))


@blueprint.get("/models/<name>/config")
@blueprint.get("/models/<name>/versions/<version>/config")
@documented("Model configuration", "Triton's model configuration extension, as perf_analyzer and tritonclient's "
            "`get_model_config` read it: both inputs (optional: a request sends one), the outputs, and "
            "`max_batch_size` 0 (the shapes carry their batch dimension, -1).", tags=["inference"],
            responses={200: ModelConfigResponse}, errors=(404, 503))
def model_configuration(name: str, version: str | None = None):
    return reply(ModelConfigResponse, model_config(state().registry.get(name, version)))


@blueprint.get("/models/<name>/ready")
@blueprint.get("/models/<name>/versions/<version>/ready")
@documented("Model readiness", "200 when the model (version) can serve; 503 with `ready: false` while it loads or "
            "when it failed to load; 404 with the reason once the repository API unloaded it (until a load).",
            tags=["inference", "health"], responses={200: ModelReady, 503: ModelReady}, errors=(404,))
def model_ready(name: str, version: str | None = None):
    try:
        model = state().registry.get(name, version)
    except NotReady:
        return reply(ModelReady, {"name": name, "ready": False}, 503)
    return reply(ModelReady, {"name": model.name, "ready": model.ready})


@blueprint.post("/models/<name>/infer")
@blueprint.post("/models/<name>/versions/<version>/infer")
@documented("Inference", "Runs the model on one input tensor and answers with its outputs: `probabilities` FP32 "
            "[N, labels], in the label order of the model metadata's `parameters.labels`. Works with "
            "tritonclient.http, KServe and MLServer clients, the binary tensor extension included, both ways.",
            tags=["inference"], responses={200: Reply(
                "The outputs: as JSON, or, when any was asked for as binary data, as application/octet-stream: the "
                "response JSON (its length in `Inference-Header-Content-Length`), then each binary output.",
                {"application/json": InferenceResponse, "application/octet-stream": {"type": "string"}},
                {HEADER_LENGTH: {"description": "On binary answers: the length of the JSON at the start of the body.",
                                 "schema": {"type": "integer", "minimum": 0}}})},
            errors=(400, 404, 413, 503), body="InferenceRequest", queued=True)
def infer(name: str, version: str | None = None):
    app_state = state()
    model = app_state.registry.get(name, version)
    header, binary = _split_body()
    body, blobs = app_state.pipeline.infer(model, header, binary)
    if not blobs:
        return reply(InferenceResponse, body)
    json_part = encoded(InferenceResponse, body)
    response = Response(json_part + b"".join(blobs), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(json_part))
    return response


@blueprint.get("/models/stats")
@blueprint.get("/models/<name>/stats")
@blueprint.get("/models/<name>/versions/<version>/stats")
@documented("Model statistics", "Triton's statistics extension: per model version, counts and cumulative "
            "nanoseconds of successful and failed requests, queueing, compute input (decode and preprocess), "
            "compute infer (ONNX Runtime) and compute output, per batch size too; every worker's together. Without "
            "a name, every loaded model.", tags=["inference"], responses={200: ModelStatisticsList}, errors=(404, 503))
def statistics(name: str | None = None, version: str | None = None):
    return reply(ModelStatisticsList, {"model_stats": model_statistics(versions_covered(state().registry, name,
                                                                                          version))})


@blueprint.post("/repository/index")
@documented("Model repository index", "Every model and version in the store with its state in this server: "
            "READY, LOADING or UNAVAILABLE, with the reason (a failed load, or an unload). The body may be empty, "
            "or `{\"ready\": true}` for only what is ready.", tags=["repository"],
            responses={200: RepositoryIndex}, errors=(400,), body="RepositoryIndexRequest")
def repository_index():
    body = request_body(request)
    options = parse_json(body) if body else {}
    if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
        raise InvalidJSON('The body must be empty or a JSON object such as {"ready": true}.')
    return reply(RepositoryIndex, state().repository.index(options.get("ready", False)))


@blueprint.post("/repository/models/<name>/load")
@documented("Load a model", "Every worker scans the store now and loads what it holds for this model (a model "
            "unloaded before serves again; new versions load without waiting for MODEL_POLL_SECONDS). Answers once "
            "every worker has finished: 200 when it serves in all of them, 400 with the reason when some could not "
            "load it.", tags=["repository"], responses={200: RepositoryAnswer}, errors=(400, 404, 503))
def repository_load(name: str):
    state().repository.load(name)
    return reply(RepositoryAnswer, {})


@blueprint.post("/repository/models/<name>/unload")
@documented("Unload a model", "Every worker stops serving this model (requests in flight finish) and no scan loads "
            "it again until a load call or a restart of the server; the index then says UNAVAILABLE, unloaded. "
            "Answers once every worker has applied it.", tags=["repository"], responses={200: RepositoryAnswer},
            errors=(404, 503))
def repository_unload(name: str):
    state().repository.unload(name)
    return reply(RepositoryAnswer, {})


def _split_body() -> tuple[dict, bytes]:
    body = request_body(request)
    length = request.headers.get(HEADER_LENGTH)
    if length is not None:
        try:
            split = int(length)
        except ValueError:
            split = -1
        if not 0 <= split <= len(body):
            raise InvalidJSON(f"{HEADER_LENGTH}={length!r} does not fit a body of {len(body)} bytes.")
        json_part, binary = body[:split], body[split:]
    else:
        json_part, binary = body, b""
    if not json_part:
        raise InvalidJSON("The request body is empty; send an inference request JSON.")
    header = parse_json(json_part)
    if not isinstance(header, dict):
        raise InvalidJSON("The inference request must be a JSON object.")
    return header, binary
