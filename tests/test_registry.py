"""The model registry: loading survives any failure; a failing version is marked failed, the others load and serve."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.registry import ModelRegistry
from service.settings import Settings
from tests.helpers import image_bytes


def fails_at_warm_up(folder: Path) -> None:
    """Replace a version's graph with one that ONNX Runtime loads but cannot run: a reshape of 3×32×32 values into
    rows of 7 only fails when the first batch arrives (the registry's warm-up)."""
    metadata = json.loads((folder / "metadata.json").read_text())
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "rows_of_seven"], ["probabilities"]),
         helper.make_node("ReduceMean", ["input"], ["domain_score"], axes=[1, 2, 3], keepdims=0),
         helper.make_node("Greater", ["domain_score", "zero"], ["in_domain"])], "fails_at_warm_up",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["rows", 7]),
         helper.make_tensor_value_info("domain_score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("in_domain", TensorProto.BOOL, ["N"])],
        [helper.make_tensor("rows_of_seven", TensorProto.INT64, [2], [-1, 7]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = folder / metadata["files"]["model"]["path"]
    onnx.save(model, str(path))
    metadata["files"]["model"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (folder / "metadata.json").write_text(json.dumps(metadata))


def test_a_version_failing_at_warm_up_is_marked_failed_and_later_versions_load(lenet_store):
    for version in ("2", "3"):
        shutil.copytree(lenet_store / "lenet" / "1", lenet_store / "lenet" / version)
    fails_at_warm_up(lenet_store / "lenet" / "2")
    settings = Settings.from_env({}, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet")
    registry = ModelRegistry(settings)
    registry.load_all()
    failure = registry.failure("lenet", "2")
    assert failure is not None and "reshape" in failure.reason.lower(), failure
    assert registry.loaded_versions("lenet") == ["1", "3"]
    assert registry.served("lenet").version == "3"
    assert registry.ready and registry.readiness_problem() is None
    assert registry.describe_version("lenet", "2")["state"] == "failed"
    outputs = registry.served("lenet").predict(np.zeros((1, 3, 32, 32), np.float32))
    assert outputs.probabilities.shape == (1, 4)


def test_the_app_serves_when_one_version_fails_at_warm_up(make_client, lenet_store):
    shutil.copytree(lenet_store / "lenet" / "1", lenet_store / "lenet" / "2")
    fails_at_warm_up(lenet_store / "lenet" / "2")
    client = make_client(MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet")
    assert client.get("/readyz").status_code == 200
    versions = {v["version"]: v for v in client.get("/v1/models/lenet").get_json()["versions"]}
    assert versions["1"]["state"] == "ready" and versions["2"]["state"] == "failed"
    response = client.post("/v1/models/lenet/versions/2/classify", data=image_bytes(), content_type="image/png")
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "model_unavailable"
    assert client.post("/v1/models/lenet/versions/1/classify", data=image_bytes(),
                       content_type="image/png").status_code == 200
