"""The Open Inference Protocol (KServe v2 REST), as Triton, KServe and MLServer speak it.

Inputs: FP32 ``[N, 3, H, W]`` (preprocessed, named ``input``) or BYTES ``[N]`` (encoded images: base64 strings in
JSON, raw bytes with the binary tensor extension). Output: ``probabilities`` FP32 ``[N, labels]``.
The binary tensor extension is supported both ways, so ``tritonclient.http`` works unchanged.
"""

from __future__ import annotations

import json

from flask import Blueprint, Response, jsonify, request

import service
from service.api import state
from service.errors import InvalidJSON, NotReady
from service.inputs import parse_json
from service.oip import ENCODED_INPUT, OUTPUT

blueprint = Blueprint("v2", __name__, url_prefix="/v2")
HEADER_LENGTH = "Inference-Header-Content-Length"


@blueprint.get("")
def server_metadata():
    return jsonify(name="convserve", version=service.__version__, extensions=["binary_tensor_data"])


@blueprint.get("/health/live")
def live():
    return jsonify(live=True)


@blueprint.get("/health/ready")
def ready():
    is_ready = state().registry.ready
    return jsonify(ready=is_ready), 200 if is_ready else 503


@blueprint.get("/models/<name>")
@blueprint.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None):
    registry = state().registry
    model = registry.get(name, version)
    return jsonify(
        name=model.name,
        versions=registry.loaded_versions(model.name),
        platform="onnxruntime_onnx",
        inputs=[{"name": model.input_name, "datatype": "FP32", "shape": model.input_shape}],
        outputs=[{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(model.labels)]}],
        parameters={"labels": model.labels, "alternative_input": {"name": ENCODED_INPUT, "datatype": "BYTES",
                                                                  "shape": [-1]}},
    )


@blueprint.get("/models/<name>/ready")
@blueprint.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None):
    try:
        model = state().registry.get(name, version)
    except NotReady:
        return jsonify(name=name, ready=False), 503
    return jsonify(name=model.name, ready=model.ready)


@blueprint.post("/models/<name>/infer")
@blueprint.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None):
    app = state()
    model = app.registry.get(name, version)
    header, binary = _split_body()
    body, blobs = app.pipeline.infer(model, header, binary)
    if not blobs:
        return jsonify(body)
    json_part = json.dumps(body).encode()
    response = Response(json_part + b"".join(blobs), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(json_part))
    return response


def _split_body() -> tuple[dict, bytes]:
    body = request.get_data(cache=False)
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
