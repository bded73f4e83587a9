"""The Open Inference Protocol (KServe v2 REST), as Triton, KServe and MLServer speak it.

Inputs: FP32 ``[N, 3, H, W]`` (preprocessed, named ``input``) or BYTES ``[N]`` (encoded images: base64 strings in
JSON, raw bytes with the binary tensor extension). Output: ``probabilities`` FP32 ``[N, labels]``.
The binary tensor extension is supported both ways, so ``tritonclient.http`` works unchanged.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from flask import Blueprint, Response, jsonify, request

import service
from service.api import state
from service.errors import InvalidJSON, InvalidTensor, NotReady, TooManyImages
from service.inputs import decode_base64

blueprint = Blueprint("v2", __name__, url_prefix="/v2")
HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {"FP32": np.float32, "BYTES": object}
ENCODED_INPUT = "image"  # the BYTES input: not in the ONNX graph, so its name is the service's own


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
    model = state().registry.get(name, version)
    registry = state().registry
    return jsonify(
        name=model.name,
        versions=[v for v in registry.versions(model.name) if v in registry.models.get(model.name, {})],
        platform="onnxruntime_onnx",
        inputs=[{"name": model.input_name, "datatype": "FP32", "shape": model.input_shape}],
        outputs=[{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.labels)]}],
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
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidTensor('Expected "inputs" with exactly one tensor: FP32 "input" [N,3,H,W] or BYTES [N].')
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidTensor(f"Input datatype {datatype!r} is not supported; use FP32 (preprocessed) or BYTES "
                            "(encoded images).")
    expected_name = model.input_name if datatype == "FP32" else ENCODED_INPUT
    if tensor.get("name") != expected_name:
        raise InvalidTensor(f"Input {tensor.get('name')!r} is not one of model {model.name!r}'s inputs: send FP32 "
                            f"{model.input_name!r} {model.input_shape} or BYTES {ENCODED_INPUT!r} [N].")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise InvalidTensor("Input shape must be a non-empty list of positive integers, starting with the batch size.")
    if shape[0] > app.settings.MAX_BATCH_IMAGES:
        raise TooManyImages(f"{shape[0]} images in one request; the limit is {app.settings.MAX_BATCH_IMAGES}.")
    binary_size = _parameters(tensor).get("binary_data_size")
    if datatype == "FP32":
        array = _fp32(tensor, shape, binary, binary_size)
        probabilities = app.runtime.infer_tensor(model, array)
    else:
        images = _bytes_elements(tensor, shape, binary, binary_size)
        probabilities = app.runtime.infer_encoded(model, images)
    return _respond(header, model, probabilities)


def _parameters(holder: dict) -> dict:
    parameters = holder.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidTensor('"parameters" must be a JSON object.')
    return parameters


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
    try:
        header = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"The inference request is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise InvalidJSON("The inference request must be a JSON object.")
    return header, binary


def _fp32(tensor: dict, shape: list[int], binary: bytes, binary_size) -> np.ndarray:
    expected = int(np.prod(shape))
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(binary) or binary_size != expected * 4:
            raise InvalidTensor(f"binary_data_size must be {expected * 4} bytes for FP32 {shape}; the body carries "
                                f"{len(binary)}.")
        return np.frombuffer(binary, dtype="<f4").reshape(shape)
    try:
        array = np.asarray(tensor.get("data"), dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidTensor(f"Input data is not a list of numbers ({exc}).") from exc
    if array.size != expected:
        raise InvalidTensor(f"Input data has {array.size} values; shape {shape} needs {expected}.")
    return array.reshape(shape)


def _bytes_elements(tensor: dict, shape: list[int], binary: bytes, binary_size) -> list[bytes]:
    if len(shape) != 1:
        raise InvalidTensor(f"A BYTES input has shape [N] (one encoded image each); got {shape}.")
    if binary_size is not None:
        if binary_size != len(binary):
            raise InvalidTensor(f"binary_data_size {binary_size} does not match the {len(binary)} bytes sent.")
        elements, offset = [], 0
        while offset < len(binary):
            if offset + 4 > len(binary):
                raise InvalidTensor("Truncated BYTES element length.")
            (size,) = struct.unpack_from("<I", binary, offset)
            elements.append(binary[offset + 4:offset + 4 + size])
            offset += 4 + size
            if offset > len(binary):
                raise InvalidTensor("Truncated BYTES element.")
    else:
        data = tensor.get("data")
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise InvalidTensor("BYTES data must be a list of base64 strings, one encoded image each.")
        elements = [decode_base64(text, index) for index, text in enumerate(data)]
    if len(elements) != shape[0]:
        raise InvalidTensor(f"Shape says {shape[0]} images; the data holds {len(elements)}.")
    return elements


def _respond(header: dict, model, probabilities: np.ndarray) -> Response:
    requested = header.get("outputs") or [{"name": "probabilities"}]
    if not isinstance(requested, list):
        raise InvalidTensor('"outputs" must be a list of {"name": "probabilities"}.')
    parameters = _parameters(header)
    outputs, blobs = [], []
    for output in requested:
        if not isinstance(output, dict) or output.get("name") != "probabilities":
            raise InvalidTensor("The only output is 'probabilities'.")
        binary = _parameters(output).get("binary_data", parameters.get("binary_data_output", False))
        described = {"name": "probabilities", "datatype": "FP32", "shape": list(probabilities.shape)}
        if binary:
            blob = np.ascontiguousarray(probabilities, dtype="<f4").tobytes()
            described["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            described["data"] = probabilities.astype(np.float32).ravel().tolist()
        outputs.append(described)
    body = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if "id" in header:
        body["id"] = header["id"]
    if not blobs:
        return jsonify(body)
    json_part = json.dumps(body).encode()
    response = Response(json_part + b"".join(blobs), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(json_part))
    return response
