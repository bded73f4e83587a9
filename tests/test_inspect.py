"""What the network sees: every stage over the API, checked against plain numpy recomputations."""

from __future__ import annotations

import base64
import io

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from service.model import OnnxModel
from service.preprocessing import preprocess
from tests.conftest import SHIPPED_STORE, wait_ready
from tests.helpers import image_bytes

LENET_SHAPES = {"conv1": [6, 28, 28], "relu1": [6, 28, 28], "pool1": [6, 14, 14], "conv2": [16, 10, 10],
                "relu2": [16, 10, 10], "pool2": [16, 5, 5], "fc1": [120], "relu3": [120], "fc2": [100],
                "relu4": [100], "fc3": [4], "probabilities": [4]}


def png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


def stored(name: str) -> OnnxModel:
    versions = sorted((p for p in (SHIPPED_STORE / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    model = OnnxModel(versions[-1])
    model.load()
    return model


def graph_weights(model: OnnxModel, op_type: str, which: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                             dict]:
    """The weights of the ``which``-th ``op_type`` node with constant weights (of ``rows`` outputs, when given: the
    auxiliary classes' head is a Gemm too)."""
    graph = onnx.load(str(model.folder / "inspect.onnx")).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == op_type and n.input[1] in initializers
             and (rows is None or rows in initializers[n.input[1]].shape)]
    node = nodes[which]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bias = initializers[node.input[2]] if len(node.input) > 2 else None
    return initializers[node.input[1]], bias, attributes


@pytest.mark.parametrize("name", ["lenet", "convnet"])
def test_inspect_returns_every_stage_and_the_same_softmax_as_classify(client, name):
    photo = image_bytes("JPEG", 200, 150, seed=11)
    response = client.post(f"/v1/models/{name}/inspect", data=photo, content_type="image/jpeg")
    assert response.status_code == 200
    body = response.get_json()
    metadata_stages = client.get(f"/v1/models/{name}").get_json()
    version = metadata_stages["default_version"]
    expected = OnnxModel(SHIPPED_STORE / name / version)
    expected.load()
    assert [(s["name"], s["kind"], s["shape"]) for s in body["stages"]] == \
        [(s.name, s.kind, s.shape) for s in expected.metadata.inspection.stages]
    kinds = {s["kind"] for s in body["stages"]}
    assert {"conv", "relu", "pool", "fc", "softmax"} <= kinds
    config = expected.metadata.training["config"]
    residual = config["arch"] == "convnet" and bool(config.get("residual"))
    assert ("add" in kinds) == residual, "a residual block shows as an 'add' stage"
    # Inspection runs the FP32 graph; classify serves INT8 where the version has it, so they agree to rounding.
    classify = client.post(f"/v1/models/{name}/classify", data=photo, content_type="image/jpeg").get_json()
    assert body["prediction"]["label"] == classify["predictions"][0]["label"]
    softmax = body["stages"][-1]
    tolerance = 1e-6 if classify["precision"] == "fp32" else 0.05
    for label, value in zip(expected.labels, softmax["values"]):
        assert value == pytest.approx(classify["predictions"][0]["probabilities"][label], abs=tolerance)
    fp32 = OnnxModel(SHIPPED_STORE / name / version, precision="fp32")
    fp32.load()
    exact = fp32.predict(preprocess(photo, fp32.spec)[None]).probabilities[0]
    np.testing.assert_allclose(softmax["values"], exact, atol=1e-6)
    picture = png(body["input"]["png"])
    assert picture.shape == (32, 32, 3)
    for stage in body["stages"]:
        if "maps" in stage:
            grid = stage["maps"]
            height, width = grid["tile"]
            assert [grid["rows"] * grid["columns"] >= stage["shape"][0], grid["tile"]] == [True, stage["shape"][1:]]
            assert png(grid["png"]).shape == (grid["rows"] * (height + 1) - 1, grid["columns"] * (width + 1) - 1, 3)
            assert grid["range"][0] <= grid["range"][1]
        else:
            assert len(stage["values"]) == stage["shape"][0]


def test_lenet_shapes_are_the_textbook_ones(client):
    body = client.post("/v1/models/lenet/inspect", data=image_bytes(), content_type="image/png").get_json()
    assert {s["name"]: s["shape"] for s in body["stages"]} == LENET_SHAPES
    assert body["cam"] is None  # flatten + FC head: no class activation map


def test_lenet_stages_match_a_numpy_recomputation():
    model = stored("lenet")
    x = preprocess(image_bytes(seed=3), model.spec)[None]
    out = model.inspect(x)
    weights, bias, _ = graph_weights(model, "Conv", 0)
    windows = np.lib.stride_tricks.sliding_window_view(x[0], (5, 5), axis=(1, 2))  # (3, 28, 28, 5, 5)
    conv1 = np.einsum("chwij,ocij->ohw", windows, weights) + bias[:, None, None]
    np.testing.assert_allclose(out["conv1"][0], conv1, atol=1e-4)
    np.testing.assert_array_equal(out["relu1"], np.maximum(out["conv1"], 0))
    pooled = out["relu1"][0].reshape(6, 14, 2, 14, 2).max(axis=(2, 4))
    np.testing.assert_array_equal(out["pool1"][0], pooled)
    fc_weights, fc_bias, attributes = graph_weights(model, "Gemm", 0)
    matrix = fc_weights if attributes.get("transB", 0) else fc_weights.T
    np.testing.assert_allclose(out["fc1"][0], matrix @ out["pool2"][0].ravel() + fc_bias, atol=1e-4)
    softmax = np.exp(out["fc3"][0] - out["fc3"][0].max())
    if not model.metadata.architecture.tta_flip:
        np.testing.assert_allclose(out["probabilities"][0], softmax / softmax.sum(), atol=1e-6)


def test_class_activation_maps_are_the_head_applied_to_the_last_feature_maps():
    model = stored("convnet")
    x = preprocess(image_bytes(seed=4), model.spec)[None]
    out = model.inspect(x)
    features = out[model.metadata.inspection.cam_stage][0]  # (K, h, w)
    head, head_bias, attributes = graph_weights(model, "Gemm", -1, rows=len(model.labels))
    matrix = head if attributes.get("transB", 0) else head.T  # (classes, K)
    np.testing.assert_allclose(out["class_maps"][0], np.einsum("ck,khw->chw", matrix, features), atol=1e-4)
    # Global average pooling then the linear head is the mean of each class map plus its bias: the logits.
    np.testing.assert_allclose(out["class_maps"][0].mean(axis=(1, 2)) + head_bias, out["fc"][0], atol=1e-4)
    np.testing.assert_allclose(out["global_pool"][0], features.mean(axis=(1, 2)), atol=1e-5)


def test_cam_follows_the_requested_class(client):
    default = client.post("/v1/models/convnet/inspect", data=image_bytes(), content_type="image/png").get_json()
    assert default["cam"]["label"] == default["prediction"]["label"]
    assert png(default["cam"]["png"]).shape == (128, 128, 3)
    chosen = client.post("/v1/models/convnet/inspect?class=cat", data=image_bytes(),
                         content_type="image/png").get_json()
    assert chosen["cam"]["label"] == "cat"
    bad = client.post("/v1/models/convnet/inspect?class=horse", data=image_bytes(), content_type="image/png")
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalid_parameter"


def test_inspect_takes_one_image_and_the_usual_errors(client):
    files = {"a": (io.BytesIO(image_bytes()), "a.png"), "b": (io.BytesIO(image_bytes()), "b.png")}
    response = client.post("/v1/models/lenet/inspect", data=files, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"] == {"code": "invalid_parameter",
                                            "message": "inspect takes exactly one image; got 2."}
    assert client.post("/v1/models/lenet/inspect", data=b"x", content_type="image/png").status_code == 400
    assert client.post("/v1/models/zzz/inspect", data=image_bytes(), content_type="image/png").status_code == 404
    assert client.post("/v1/inspect", data=image_bytes(), content_type="image/png").status_code == 200


@pytest.mark.parametrize(("name", "shape"), [("lenet", [6, 3, 5, 5]), ("convnet", None)])
def test_first_layer_filters(client, name, shape):
    body = client.get(f"/v1/models/{name}/filters").get_json()
    if shape:
        assert body["shape"] == shape
    out_channels, _, height, width = body["shape"]
    grid = body["filters"]
    image = png(grid["png"])
    assert image.shape == (grid["rows"] * (height + 1) - 1, grid["columns"] * (width + 1) - 1, 3)
    assert grid["rows"] * grid["columns"] >= out_channels


def test_classify_never_opens_the_inspection_graph(make_client):
    client = make_client(MODEL_STORE=SHIPPED_STORE)
    client.post("/v1/models/lenet/classify", data=image_bytes(), content_type="image/png")
    registry = client.application.extensions["convserve"].registry
    wait_ready(client.application)
    assert registry.get("lenet")._inspect_session is None
