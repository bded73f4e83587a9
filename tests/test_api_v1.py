"""The /v1 contract at the HTTP level: request forms, response shape, every error code with its exact body."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from service import create_app
from service.metadata import ModelMetadata
from service.preprocessing import preprocess
from service.settings import Settings
from tests.conftest import SHIPPED_STORE, wait_ready
from tests.fakes import ExplodingModel, NeverReadyModel
from tests.helpers import encode, image_bytes, pattern

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif",
        "TIFF": "image/tiff"}


def labels_of(client, name):
    return client.get(f"/v1/models/{name}").get_json()["labels"]


def assert_prediction_contract(prediction, labels):
    assert set(prediction) >= {"label", "confidence", "probabilities", "in_domain", "domain_score"}
    assert isinstance(prediction["in_domain"], bool) and 0 <= prediction["domain_score"] <= 1
    assert list(prediction["probabilities"]) == labels  # the model's label order
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
    assert prediction["confidence"] == prediction["probabilities"][prediction["label"]]


def error_body(response):
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert "Traceback" not in response.get_data(as_text=True)
    return body["error"]


# --- request forms -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(MIME))
def test_classify_raw_body_of_each_format(client, fmt):
    response = client.post("/v1/classify", data=image_bytes(fmt), content_type=MIME[fmt])
    assert response.status_code == 200
    body = response.get_json()
    assert body["model"] == "convnet" and body["version"].isdigit()
    assert len(body["predictions"]) == 1
    assert_prediction_contract(body["predictions"][0], labels_of(client, "convnet"))


def test_multipart_batch_keeps_order(client):
    images = [image_bytes("PNG", 40, 40, seed=s) for s in (1, 2, 3)]
    singles = [client.post("/v1/models/lenet/classify", data=i, content_type="image/png").get_json()["predictions"][0]
               for i in images]
    files = {f"image{n}": (io.BytesIO(i), f"{n}.png") for n, i in enumerate(images)}
    response = client.post("/v1/models/lenet/classify", data=files, content_type="multipart/form-data")
    assert response.status_code == 200
    assert response.get_json()["predictions"] == singles


def test_multipart_with_repeated_field_name(client):
    data = {"image": [(io.BytesIO(image_bytes(seed=1)), "a.png"), (io.BytesIO(image_bytes(seed=2)), "b.png")]}
    response = client.post("/v1/models/lenet/classify", data=data, content_type="multipart/form-data")
    assert response.status_code == 200 and len(response.get_json()["predictions"]) == 2


def test_json_base64_and_data_urls(client):
    png = image_bytes("PNG", seed=5)
    plain = base64.b64encode(png).decode()
    url_safe = base64.urlsafe_b64encode(png).decode().rstrip("=")
    data_url = "data:image/png;base64," + plain
    response = client.post("/v1/models/lenet/classify", json={"images": [plain, data_url, url_safe]})
    assert response.status_code == 200
    predictions = response.get_json()["predictions"]
    assert predictions[0] == predictions[1] == predictions[2]


def test_octet_stream_is_sniffed(client):
    response = client.post("/v1/models/lenet/classify", data=image_bytes("JPEG"),
                           content_type="application/octet-stream")
    assert response.status_code == 200


def test_versioned_route(client):
    response = client.post("/v1/models/lenet/versions/3/classify", data=image_bytes(), content_type="image/png")
    assert response.status_code == 200 and response.get_json()["version"] == "3"


@pytest.mark.parametrize(("query", "expected"), [("top_k=2", 2), ("top_k=4", 4), ("top_k=99", 4), ("top_k=1", 1)])
def test_top_k_is_sorted_and_clamped(client, query, expected):
    response = client.post(f"/v1/models/lenet/classify?{query}", data=image_bytes(), content_type="image/png")
    assert response.status_code == 200
    prediction = response.get_json()["predictions"][0]
    top = prediction["top_k"]
    assert len(top) == expected
    assert [t["confidence"] for t in top] == sorted((t["confidence"] for t in top), reverse=True)
    assert top[0]["label"] == prediction["label"]


def test_without_top_k_there_is_no_top_k_field(client):
    response = client.post("/v1/models/lenet/classify", data=image_bytes(), content_type="image/png")
    assert "top_k" not in response.get_json()["predictions"][0]


def test_api_answers_as_shared_preprocessing_and_onnx_runtime_do(client):
    """The service's probabilities equal service.preprocessing (which training uses too) followed by ONNX Runtime run
    directly on the graph the service says it serves."""
    photos = [image_bytes("JPEG", 1920, 1080, seed=9), image_bytes("PNG", 32, 32, seed=2),
              encode(pattern(70, 50), "PNG", mode="LA")]
    for name in ("lenet", "convnet"):
        described = client.get(f"/v1/models/{name}").get_json()
        folder = SHIPPED_STORE / name / described["default_version"]
        metadata = ModelMetadata.read(folder / "metadata.json")
        graph = metadata.files.model_int8 if described["precision"] == "int8" else metadata.files.model
        session = ort.InferenceSession(str(folder / graph.path), providers=["CPUExecutionProvider"])
        batch = np.stack([preprocess(photo, metadata.input.preprocessing) for photo in photos])
        (expected,) = session.run(["probabilities"], {metadata.input.name: batch})
        files = {f"f{i}": (io.BytesIO(p), f"{i}") for i, p in enumerate(photos)}
        served = client.post(f"/v1/models/{name}/classify", data=files, content_type="multipart/form-data")
        got = np.array([[p["probabilities"][label] for label in metadata.labels]
                        for p in served.get_json()["predictions"]])
        assert np.abs(got - expected).max() <= 1e-5


# --- metadata ----------------------------------------------------------------------------------------------------

def test_models_list(client):
    body = client.get("/v1/models").get_json()
    assert body["default_model"] == "convnet"
    names = [m["name"] for m in body["models"]]
    assert {"lenet", "convnet"} <= set(names)
    for model in body["models"]:
        metadata = json.loads((SHIPPED_STORE / model["name"] / model["default_version"] / "metadata.json").read_text())
        assert model["labels"] == metadata["labels"] == ["dog", "cat", "boat", "bird"]
        assert model["input"]["preprocessing"]["height"] == 32
        version = next(v for v in model["versions"] if v["version"] == model["default_version"])
        assert version["state"] == "ready"
        served = metadata["files"]["model_int8" if version["precision"] == "int8" else "model"]
        assert version["sha256"] == served["sha256"] and model["precision"] == version["precision"]
        assert version["metrics"]["validation_accuracy"] == metadata["metrics"]["validation"]["accuracy"]
        stages = model["inspection"]["stages"]
        assert [s["name"] for s in stages] == [s["name"] for s in metadata["inspection"]["stages"]]
    inspection = {m["name"]: m["inspection"] for m in body["models"]}
    # A global-pooling + linear head has class activation maps; LeNet's flatten + FC head has none.
    assert inspection["convnet"]["class_activation_maps"] and not inspection["lenet"]["class_activation_maps"]
    assert inspection["lenet"]["stages"][0] == {"name": "conv1", "kind": "conv", "shape": [6, 28, 28]}


def test_model_and_version_metadata(client):
    model = client.get("/v1/models/lenet")
    assert model.status_code == 200 and model.get_json()["name"] == "lenet"
    version = client.get("/v1/models/lenet/versions/3")
    assert version.status_code == 200 and version.get_json()["state"] == "ready"


# --- errors --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"data": b"definitely not an image", "content_type": "image/png"}, 400, "invalid_image"),
    ({"data": image_bytes("JPEG")[:200], "content_type": "image/jpeg"}, 400, "invalid_image"),
    ({"data": b"", "content_type": "image/png"}, 400, "empty_body"),
    ({"data": b""}, 400, "empty_body"),
    ({"data": b"{not json", "content_type": "application/json"}, 400, "invalid_json"),
    ({"json": {"pictures": []}}, 400, "invalid_json"),
    ({"json": {"images": []}}, 400, "invalid_json"),
    ({"json": {"images": [42]}}, 400, "invalid_json"),
    ({"json": ["a"]}, 400, "invalid_json"),
    ({"json": {"images": ["!!!not base64!!!"]}}, 400, "invalid_base64"),
    ({"json": {"images": ["data:image/png,rawtext"]}}, 400, "invalid_base64"),
    ({"json": {"images": [base64.b64encode(b"text, not pixels").decode()]}}, 400, "invalid_image"),
    ({"data": {"field": "no files"}, "content_type": "multipart/form-data"}, 400, "empty_body"),
    ({"data": b"hello", "content_type": "text/plain"}, 415, "unsupported_media_type"),
    ({"data": b"<x/>", "content_type": "application/xml"}, 415, "unsupported_media_type"),
])
def test_bad_input_gets_a_clear_4xx(client, kwargs, status, code):
    response = client.post("/v1/models/lenet/classify", **kwargs)
    assert response.status_code == status
    error = error_body(response)
    assert error["code"] == code and error["message"]


def test_bad_image_in_a_batch_is_named_by_position(client):
    files = {"a": (io.BytesIO(image_bytes()), "a.png"), "b": (io.BytesIO(b"junk"), "b.png")}
    response = client.post("/v1/models/lenet/classify", data=files, content_type="multipart/form-data")
    assert response.status_code == 400
    assert error_body(response)["message"].startswith("Image 1 of 2:")


@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5", ""])
def test_bad_top_k(client, value):
    response = client.post(f"/v1/models/lenet/classify?top_k={value}", data=image_bytes(), content_type="image/png")
    assert response.status_code == 400
    assert error_body(response) == {"code": "invalid_parameter",
                                    "message": f"top_k must be a whole number >= 1; got {value!r}."}


def test_unknown_model_version_and_route(client):
    response = client.post("/v1/models/resnet/classify", data=image_bytes(), content_type="image/png")
    assert response.status_code == 404 and error_body(response)["code"] == "model_not_found"
    response = client.post("/v1/models/lenet/versions/99/classify", data=image_bytes(), content_type="image/png")
    assert response.status_code == 404 and error_body(response)["code"] == "version_not_found"
    assert client.get("/v1/models/resnet").status_code == 404
    response = client.get("/v1/nothing/here")
    assert response.status_code == 404
    assert error_body(response) == {"code": "not_found",
                                    "message": "No route /v1/nothing/here. See GET /openapi.json for the API."}


def test_wrong_method(client):
    response = client.get("/v1/classify")
    assert response.status_code == 405
    assert error_body(response)["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]
    assert client.delete("/v1/models").status_code == 405


def test_limits_give_413(make_client):
    client = make_client(MODEL_STORE=SHIPPED_STORE, MAX_UPLOAD_BYTES=20_000, MAX_IMAGES_PER_REQUEST=2,
                         MAX_IMAGE_PIXELS=100_000, DEFAULT_MODEL="lenet")
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    response = client.post("/v1/classify", data=encode(big, "PNG"), content_type="image/png")
    assert response.status_code == 413 and error_body(response)["code"] == "payload_too_large"
    files = {str(i): (io.BytesIO(image_bytes("PNG", 8, 8)), f"{i}.png") for i in range(3)}
    response = client.post("/v1/classify", data=files, content_type="multipart/form-data")
    assert response.status_code == 413
    assert error_body(response) == {"code": "too_many_images",
                                    "message": "3 images in one request; the limit is 2. Split the batch."}
    bomb = encode(np.zeros((1000, 1000, 3), np.uint8), "PNG")  # 1 MP of zeros compresses to ~3 kB
    response = client.post("/v1/classify", data=bomb, content_type="image/png")
    assert response.status_code == 413 and error_body(response)["code"] == "image_too_large"


def test_server_faults_are_500_json_without_details(lenet_store):
    settings = Settings.from_env({}, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet")
    from service.registry import ModelRegistry

    app = create_app(settings, registry=ModelRegistry(settings, model_factory=ExplodingModel))
    wait_ready(app)
    response = app.test_client().post("/v1/classify", data=image_bytes(), content_type="image/png")
    assert response.status_code == 500
    assert error_body(response) == {"code": "internal", "message": "Internal error; the server log has the details."}
    assert "/srv/internal" not in response.get_data(as_text=True)


# --- health and model loading ---------------------------------------------------------------------------------------

def test_liveness_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "alive"}
    assert client.get("/readyz").get_json() == {"status": "ready"}


def test_not_ready_while_loading(lenet_store):
    from service.registry import ModelRegistry

    settings = Settings.from_env({}, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet")
    app = create_app(settings, registry=ModelRegistry(settings, model_factory=NeverReadyModel))
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503 and response.get_json()["reason"] == "models are loading"
    response = client.post("/v1/classify", data=image_bytes(), content_type="image/png")
    assert response.status_code == 503 and error_body(response)["code"] == "not_ready"
    assert client.get("/v2/health/ready").status_code == 503


def test_readiness_drops_when_shutdown_begins(make_client, lenet_store):
    client = make_client(MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet")
    assert client.get("/readyz").status_code == 200
    client.application.extensions["convserve"].registry.begin_shutdown()
    response = client.get("/readyz")
    assert response.status_code == 503 and response.get_json()["reason"] == "shutting down"
    assert client.post("/v1/classify", data=image_bytes(), content_type="image/png").status_code == 200


def test_a_broken_version_is_reported_and_the_rest_serve(make_client, lenet_store):
    shutil.copytree(lenet_store / "lenet" / "1", lenet_store / "lenet" / "2")
    (lenet_store / "lenet" / "2" / "model.onnx").write_bytes(b"tampered")
    client = make_client(MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet")
    assert client.get("/readyz").status_code == 200
    model = client.get("/v1/models/lenet").get_json()
    assert model["default_version"] == "1"
    broken = next(v for v in model["versions"] if v["version"] == "2")
    assert broken["state"] == "failed" and "sha256 of model.onnx" in broken["error"]
    assert client.post("/v1/classify", data=image_bytes(), content_type="image/png").get_json()["version"] == "1"
    response = client.post("/v1/models/lenet/versions/2/classify", data=image_bytes(), content_type="image/png")
    assert response.status_code == 503 and error_body(response)["code"] == "model_unavailable"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'convserve_model_load_failures_total{model="lenet",version="2"}' in metrics
    assert 'convserve_model_loaded{model="lenet",version="2"} 0.0' in metrics


@pytest.mark.parametrize("setup", ["empty", "missing", "all broken"])
def test_no_loadable_model_means_not_ready_with_a_reason(make_client, tmp_path, lenet_store, setup):
    store = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "all broken": lenet_store}[setup]
    if setup == "empty":
        store.mkdir()
    if setup == "all broken":
        (lenet_store / "lenet" / "1" / "metadata.json").write_text("{}")
    client = make_client(MODEL_STORE=store, DEFAULT_MODEL="lenet")
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    reason = response.get_json()["reason"]
    expected = {"empty": "has no models", "missing": "model store (MODEL_STORE) is missing", "all broken": "lenet v1"}
    assert expected[setup] in reason and str(tmp_path) not in reason, "the reason names no path of this machine"


def test_cors_is_off_by_default_and_configurable(client, make_client):
    response = client.post("/v1/models/lenet/classify", data=image_bytes(), content_type="image/png",
                           headers={"Origin": "https://example.org"})
    assert "Access-Control-Allow-Origin" not in response.headers
    cors_client = make_client(MODEL_STORE=SHIPPED_STORE, CORS_ORIGINS="https://example.org")
    response = cors_client.post("/v1/models/lenet/classify", data=image_bytes(), content_type="image/png",
                                headers={"Origin": "https://example.org"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://example.org"
    response = cors_client.post("/v1/models/lenet/classify", data=image_bytes(), content_type="image/png",
                                headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers
