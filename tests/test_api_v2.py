"""The Open Inference Protocol (KServe v2 REST) in process: JSON and binary tensors, FP32 and BYTES inputs."""

from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest

from service.preprocessing import InputSpec, preprocess
from tests.helpers import image_bytes


@pytest.fixture()
def lenet_input(client):
    spec = InputSpec.from_metadata(client.get("/v1/models/lenet").get_json()["input"]["preprocessing"])
    return np.stack([preprocess(image_bytes(seed=s), spec) for s in (1, 2)])


def classify_v1(client, seeds):
    files = {str(s): (io.BytesIO(image_bytes(seed=s)), f"{s}.png") for s in seeds}
    predictions = client.post("/v1/models/lenet/classify", data=files, content_type="multipart/form-data")
    return np.array([list(p["probabilities"].values()) for p in predictions.get_json()["predictions"]])


def test_server_and_health(client):
    assert client.get("/v2").get_json() == {
        "name": "convserve",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"],
    }
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    assert client.get("/v2/models/lenet/ready").get_json() == {"name": "lenet", "ready": True}
    assert client.get("/v2/models/lenet/versions/3/ready").status_code == 200


def test_model_metadata(client):
    body = client.get("/v2/models/lenet").get_json()
    assert body["name"] == "lenet" and "3" in body["versions"]
    assert body["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
                              {"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]},
                               {"name": "domain_score", "datatype": "FP32", "shape": [-1]},
                               {"name": "in_domain", "datatype": "BOOL", "shape": [-1]}]
    assert client.get("/v2/models/lenet/versions/3").status_code == 200


def test_infer_fp32_json_matches_v1(client, lenet_input):
    request = {
        "id": "r1",
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(lenet_input.shape),
                "data": lenet_input.ravel().tolist(),
            }
        ],
    }
    response = client.post("/v2/models/lenet/infer", json=request)
    assert response.status_code == 200
    body = response.get_json()
    assert body["model_name"] == "lenet" and body["model_version"] == "3" and body["id"] == "r1"
    output, score, in_domain = body["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [2, 4]
    np.testing.assert_allclose(np.array(output["data"]).reshape(2, 4), classify_v1(client, (1, 2)), atol=1e-6)
    # Without "outputs" in the request every output comes back: the "none of these" answer per image too.
    assert score["name"] == "domain_score" and score["datatype"] == "FP32" and score["shape"] == [2]
    assert in_domain["name"] == "in_domain" and in_domain["datatype"] == "BOOL" and in_domain["shape"] == [2]
    assert all(isinstance(flag, bool) for flag in in_domain["data"]) and all(0 <= v <= 1 for v in score["data"])


def test_requested_outputs_come_back_alone_and_in_binary(client, lenet_input):
    request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(lenet_input.shape),
                           "data": lenet_input.ravel().tolist()}],
               "outputs": [{"name": "in_domain", "parameters": {"binary_data": True}}, {"name": "domain_score"}]}
    response = client.post("/v2/models/lenet/infer", json=request)
    assert response.status_code == 200
    header_length = int(response.headers["Inference-Header-Content-Length"])
    body = json.loads(response.data[:header_length])
    flags, score = body["outputs"]
    assert flags == {"name": "in_domain", "datatype": "BOOL", "shape": [2], "parameters": {"binary_data_size": 2}}
    assert response.data[header_length:] in (b"\x00\x00", b"\x00\x01", b"\x01\x00", b"\x01\x01")
    v1 = client.post("/v1/models/lenet/classify", data={str(s): (io.BytesIO(image_bytes(seed=s)), f"{s}.png")
                                                         for s in (1, 2)}, content_type="multipart/form-data")
    expected = [p["domain_score"] for p in v1.get_json()["predictions"]]
    np.testing.assert_allclose(score["data"], expected, atol=1e-6)
    assert list(response.data[header_length:]) == [int(p["in_domain"]) for p in v1.get_json()["predictions"]]


def test_infer_nested_data_is_accepted(client, lenet_input):
    request = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": lenet_input[:1].tolist()}]
    }
    assert client.post("/v2/models/lenet/versions/3/infer", json=request).status_code == 200


def test_infer_bytes_base64(client):
    images = [base64.b64encode(image_bytes(seed=s)).decode() for s in (1, 2)]
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": images}]}
    body = client.post("/v2/models/lenet/infer", json=request).get_json()
    np.testing.assert_allclose(
        np.array(body["outputs"][0]["data"]).reshape(2, 4), classify_v1(client, (1, 2)), atol=1e-6
    )


def binary_request(header: dict, blob: bytes) -> tuple[bytes, dict]:
    json_part = json.dumps(header).encode()
    return json_part + blob, {"Inference-Header-Content-Length": str(len(json_part))}


def test_binary_tensor_extension_both_ways(client, lenet_input):
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(lenet_input.shape),
                "parameters": {"binary_data_size": lenet_input.nbytes},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    body, headers = binary_request(header, lenet_input.astype("<f4").tobytes())
    response = client.post(
        "/v2/models/lenet/infer", data=body, headers=headers, content_type="application/octet-stream"
    )
    assert response.status_code == 200
    split = int(response.headers["Inference-Header-Content-Length"])
    payload = response.get_data()
    described = json.loads(payload[:split])
    assert described["outputs"][0]["parameters"]["binary_data_size"] == 2 * 4 * 4
    probabilities = np.frombuffer(payload[split:], dtype="<f4").reshape(2, 4)
    np.testing.assert_allclose(probabilities, classify_v1(client, (1, 2)), atol=1e-6)


def test_binary_bytes_input(client):
    blob = b"".join(struct.pack("<I", len(i)) + i for i in (image_bytes(seed=1), image_bytes(seed=2)))
    header = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(blob)}}]
    }
    body, headers = binary_request(header, blob)
    response = client.post("/v2/models/lenet/infer", data=body, headers=headers)
    assert response.status_code == 200 and response.get_json()["outputs"][0]["shape"] == [2, 4]


def one_tensor(name: str | None, datatype: str, shape, data) -> bytes:
    tensor = {"datatype": datatype, "shape": shape, "data": data}
    if name is not None:
        tensor["name"] = name
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize(
    ("request_body", "status", "fragment"),
    [
        (b"", 400, "empty"),
        (b"{bad", 400, "not valid JSON"),
        (b"[]", 400, "JSON object"),
        (json.dumps({"inputs": []}).encode(), 400, "exactly one tensor"),
        (one_tensor("x", "FP32", [1], [1]), 400, "'x' is not one of model 'lenet'"),
        (one_tensor(None, "FP32", [1], [1]), 400, "None is not one of model 'lenet'"),
        (one_tensor("input", "BYTES", [1], []), 400, "or BYTES 'image' [N]"),
        (one_tensor("input", "INT8", [1], [1]), 400, "INT8"),
        (one_tensor("input", "FP32", [1, 3, 32, 32], [0.0] * 5), 400, "needs 3072"),
        (one_tensor("input", "FP32", [1, 3, 8, 8], [0.0] * 192), 400, "shape [N, 3, 32, 32]"),
        (one_tensor("input", "FP32", "big", []), 400, "shape must be"),
        (one_tensor("input", "FP32", [1, 3, 32, 32], ["x"] * 3072), 400, "not a list of numbers"),
        (one_tensor("image", "BYTES", [1], ["%%%"]), 400, "base64"),
        (one_tensor("image", "BYTES", [1], ["aGVsbG8="]), 400, "not a readable image"),
        (one_tensor("image", "BYTES", [2, 2], []), 400, "shape [N]"),
        (one_tensor("image", "BYTES", [1], []), 400, "holds 0"),
        (one_tensor("image", "BYTES", [500], []), 413, "limit is 64"),
    ],
)
def test_bad_requests_get_v2_error_bodies(client, request_body, status, fragment):
    response = client.post("/v2/models/lenet/infer", data=request_body, content_type="application/json")
    assert response.status_code == status
    body = response.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and fragment in body["error"], body


def test_bad_binary_header(client):
    response = client.post("/v2/models/lenet/infer", data=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert response.status_code == 400 and "does not fit" in response.get_json()["error"]


def test_unknown_model_and_output(client, lenet_input):
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/nope").get_json()["error"].startswith("No model named 'nope'")
    request = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": lenet_input[:1].ravel().tolist()}
        ],
        "outputs": [{"name": "features"}],
    }
    response = client.post("/v2/models/lenet/infer", json=request)
    assert response.status_code == 400 and "Outputs are named 'probabilities', 'domain_score', 'in_domain'" in \
        response.get_json()["error"]


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "input", "datatype": "FP32", "shape": [], "data": []},
        {"name": "input", "datatype": "FP32", "shape": [0, 3, 32, 32], "data": []},
        {"name": "input", "datatype": "FP32", "shape": [True, 3, 32, 32], "data": [0.0] * 3072},
        {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072, "parameters": "x"},
    ],
)
def test_malformed_tensors_are_400_not_500(client, tensor):
    response = client.post("/v2/models/lenet/infer", json={"inputs": [tensor]})
    assert response.status_code == 400, response.get_json()


@pytest.mark.parametrize(
    "extra",
    [{"parameters": "x"}, {"outputs": "probabilities"}, {"outputs": [{"name": "probabilities", "parameters": 3}]}],
)
def test_malformed_request_parameters_are_400(client, lenet_input, extra):
    request = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": lenet_input[:1].ravel().tolist()}
        ],
        **extra,
    }
    assert client.post("/v2/models/lenet/infer", json=request).status_code == 400


def test_v1_classify_and_v2_infer_share_one_batch_key_and_one_call(app, monkeypatch):
    """Both kinds of request for one version queue under the same batch key; a batch holding both makes one ONNX
    Runtime call over their inputs together, and each gets the answer it gets alone."""
    state = app.extensions["convserve"]
    pipeline, model = state.pipeline, state.registry.get("lenet")
    tensor = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    v2_request = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32],
                              "data": tensor.ravel().tolist()}], "outputs": [{"name": "probabilities"}]}
    images = [image_bytes(seed=5), image_bytes(seed=6), image_bytes(seed=7)]
    alone_v1 = pipeline.classify(model, images, None)
    alone_v2, _ = pipeline.infer(model, v2_request, b"")

    queued = []
    monkeypatch.setattr(pipeline.queue, "run_batched",
                        lambda key, work, *args, size, patience=None, inline=False: queued.append((key, work, args)))
    pipeline.classify(model, images, None)
    pipeline.infer(model, v2_request, b"")
    assert queued[0][0] == queued[1][0], "one batch key for both"
    calls = []
    predict = model.predict
    monkeypatch.setattr(model, "predict", lambda batch: calls.append(len(batch)) or predict(batch))
    v1_answer, (v2_answer, _) = queued[0][1]([queued[0][2], queued[1][2]])
    assert calls == [5]  # three images and two tensors in one call
    for got, want in zip(v1_answer["predictions"], alone_v1["predictions"], strict=True):
        assert got["label"] == want["label"]
        assert list(got["probabilities"].values()) == pytest.approx(list(want["probabilities"].values()), abs=1e-6)
    assert v2_answer["outputs"][0]["data"] == pytest.approx(alone_v2["outputs"][0]["data"], abs=1e-6)
