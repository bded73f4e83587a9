"""Open Inference Protocol tensors: a request's input as numpy or encoded images, the answers as its outputs.

An inference request's input becomes a numpy batch or encoded images, and a model's answers become the response's
outputs (JSON values or the binary tensor extension, and the classification extension's "score:index:label"
strings).

Called by the inference pipeline on an inference thread; the /v2 views only split the HTTP body into its JSON and
binary parts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from service import contract
from service.errors import InvalidTensor
from service.model import Outputs
from service.payload import check_batch_size, decode_base64

DATATYPES = {"FP32": np.float32, "BYTES": object}
# What server metadata announces, over REST and gRPC alike.
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]
ENCODED_INPUT = "image"  # the BYTES input: not in the ONNX graph, so its name is the service's own
# The largest |value| an FP32 input may hold: preprocessed images lie within a few units of 0, and inputs around 1e16
# overflowed the shipped networks to NaN.
FP32_LIMIT = 1e6
OUTPUTS = {output.name: output for output in contract.OUTPUTS}


def input_tensor(request: dict, model, binary: bytes, max_images: int) -> np.ndarray | list[bytes]:
    """The request's one input: FP32 → float32 array of its shape; BYTES → the encoded images."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidTensor('Expected "inputs" with exactly one tensor: FP32 "input" [N,3,H,W] or BYTES [N].')
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidTensor(f"Input datatype {datatype!r} is not supported; use FP32 (preprocessed) or BYTES "
                            "(encoded images).")
    expected_name = model.input_name if datatype == "FP32" else ENCODED_INPUT
    if tensor.get("name") != expected_name:
        raise InvalidTensor(f"Input {tensor.get('name')!r} is not one of model {model.name!r}'s inputs: send FP32 "
                            f"{model.input_name!r} {model.input_shape} or BYTES {ENCODED_INPUT!r} [N].")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not shape
            or not all(_whole(d) and d >= 1 for d in shape)):
        raise InvalidTensor("Input shape must be a non-empty list of positive integers, starting with the batch size.")
    shape = [int(d) for d in shape]
    check_batch_size(shape[0], max_images)
    if datatype == "FP32" and shape[1:] != list(model.input_shape[1:]):  # before any size is computed from it
        raise InvalidTensor(f"Input must have shape [N, {', '.join(map(str, model.input_shape[1:]))}]; "
                            f"got {shape}.")
    binary_size = parameters(tensor).get("binary_data_size")
    if datatype == "FP32":
        return _fp32(tensor, shape, binary, binary_size)
    return _bytes_elements(tensor, shape, binary, binary_size)


def input_metadata(model) -> list[dict]:
    """The inputs a model takes, as /v2/models/{name} describes them: FP32 (preprocessed), then BYTES (encoded
    images). A request sends one of them."""
    return [{"name": model.input_name, "datatype": "FP32", "shape": model.input_shape},
            {"name": ENCODED_INPUT, "datatype": "BYTES", "shape": [-1]}]


def output_metadata(model) -> list[dict]:
    """The outputs a model answers with, as /v2/models/{name} describes them."""
    return [{"name": output.name, "datatype": output.datatype, "shape": [-1, *_per_image(output, model)]}
            for output in contract.OUTPUTS]


# The protocol's datatypes as Triton's model configuration names them.
CONFIG_TYPES = {"FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL", "BYTES": "TYPE_STRING"}


def model_config(model) -> dict:
    """Triton's model configuration extension (GET /v2/models/{name}/config, gRPC ModelConfig), which
    perf_analyzer and tritonclient's get_model_config read. ``max_batch_size`` 0: every shape carries its own batch
    dimension, -1, as in the metadata (requests waiting together still share one ONNX Runtime call). Both inputs are
    optional: a request sends one of them."""
    return dict(  # Triton's field names ("input" is the list of inputs, not the tensor of that name)
        name=model.name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=0,
        input=[{**_config_tensor(tensor), "optional": True} for tensor in input_metadata(model)],
        output=[_config_tensor(tensor) for tensor in output_metadata(model)],
    )


def _config_tensor(tensor: dict) -> dict:
    return {"name": tensor["name"], "data_type": CONFIG_TYPES[tensor["datatype"]], "dims": tensor["shape"]}


def _per_image(output: contract.Output, model) -> list[int]:
    return [len(model.labels)] if output.per_label else []


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int | None  # the classification extension: the top k as "score:index:label" strings


def image_count(request: dict, max_images: int) -> int:
    """How many images the request's input holds, as far as its shape says (for batching; checked properly later)."""
    try:
        count = int(request["inputs"][0]["shape"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return 1
    return min(max(count, 1), max_images)


def requested_outputs(request: dict, model) -> list[RequestedOutput]:
    """The outputs to answer with, each as JSON values or binary data, optionally as classification strings.
    Without ``outputs`` in the request, every output is returned."""
    requested = request.get("outputs") or [{"name": name} for name in OUTPUTS]
    if not isinstance(requested, list):
        raise InvalidTensor(f'"outputs" must be a list of {{"name": ...}} with names from {", ".join(OUTPUTS)}.')
    binary_default = parameters(request).get("binary_data_output", False)
    plan = []
    for output in requested:
        if not isinstance(output, dict) or output.get("name") not in OUTPUTS:
            raise InvalidTensor(f"Outputs are named {', '.join(map(repr, OUTPUTS))}.")
        settings = parameters(output)
        count = settings.get("classification")
        if count is not None:
            if output["name"] != contract.CLASSIFIED_OUTPUT:
                raise InvalidTensor(f"The classification extension applies to {contract.CLASSIFIED_OUTPUT!r} only.")
            if not _whole(count) or not 1 <= count <= len(model.labels):
                raise InvalidTensor(f"classification must be a whole number from 1 to {len(model.labels)} (the "
                                    f"labels of {model.name}); got {count!r}.")
            count = int(count)
        plan.append(RequestedOutput(output["name"], bool(settings.get("binary_data", binary_default)), count))
    return plan


def response(request: dict, model, answers: Outputs, plan: list[RequestedOutput]) -> tuple[dict, list[bytes]]:
    """The response JSON and the binary blobs that follow it (empty unless binary output was asked for)."""
    outputs, blobs = [], []
    for output in plan:
        if output.classification is not None:
            datatype, value = "BYTES", classified(answers.probabilities, model.labels, output.classification)
        else:
            spec = OUTPUTS[output.name]
            datatype, value = spec.datatype, np.asarray(getattr(answers, output.name)).astype(spec.numpy_dtype)
        described = {"name": output.name, "datatype": datatype, "shape": list(value.shape)}
        if output.binary:
            blob = bytes_tensor(value.ravel()) if datatype == "BYTES" else np.ascontiguousarray(value).tobytes()
            described["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            described["data"] = value.ravel().tolist()
        outputs.append(described)
    body = {"model_name": model.name, "model_version": model.version, "outputs": outputs}
    if "id" in request:
        body["id"] = request["id"]
    return body, blobs


def classified(probabilities: np.ndarray, labels: list[str], count: int) -> np.ndarray:
    """The classification extension's answer, as Triton gives it: per image, the ``count`` most probable labels,
    highest first, each "score:index:label"; an object array of shape [N, count]."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :count]
    return np.array([[f"{row[i]:f}:{i}:{labels[i]}" for i in chosen] for row, chosen in zip(probabilities, order)],
                    dtype=object).reshape(len(probabilities), count)


def bytes_tensor(elements) -> bytes:
    """BYTES elements in the binary layout of both protocols: each as a 4-byte little-endian length, then itself."""
    parts = []
    for element in elements:
        data = element.encode() if isinstance(element, str) else bytes(element)
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def _whole(value) -> bool:
    """A JSON integer: 3, and 3.0 too (JSON numbers have no separate integer type)."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def parameters(holder: dict) -> dict:
    value = holder.get("parameters")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidTensor('"parameters" must be a JSON object.')
    return value


def _fp32(tensor: dict, shape: list[int], binary: bytes, binary_size) -> np.ndarray:
    expected = int(np.prod(shape))
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(binary) or binary_size != expected * 4:
            raise InvalidTensor(f"binary_data_size must be {expected * 4} bytes for FP32 {shape}; the body carries "
                                f"{len(binary)}.")
        array = np.frombuffer(binary, dtype="<f4").reshape(shape)
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise InvalidTensor("FP32 data must be a list of numbers (flat, or nested as the shape says).")
        try:
            array = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidTensor(f"Input data is not a list of numbers ({str(exc)[:200]}).") from exc
        if array.size != expected:
            raise InvalidTensor(f"Input data has {array.size} values; shape {shape} needs {expected}.")
        array = array.reshape(shape)
    if not (np.abs(array) <= FP32_LIMIT).all():  # NaN fails the comparison too
        raise InvalidTensor(f"Input data holds NaN, infinite values or numbers beyond ±{FP32_LIMIT:g}; preprocessed "
                            "images lie within a few units of 0 (GET /v1/models/{name}, input.preprocessing).")
    return array


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
