"""What an answer means, served: calibrated probabilities, "none of these", its precision, and drift metrics.

Each answer says the precision that served it; the drift metrics compare served answers with what validation
measured."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.metadata import ModelMetadata
from tests.conftest import SHIPPED_STORE
from tests.helpers import encode, metric_value

# A flat red square: none of the labels, and both shipped models say so.
NOISE = encode(np.tile(np.array([255, 0, 0], np.uint8), (64, 64, 1)), "PNG")


def served_metadata(client, name: str) -> ModelMetadata:
    version = client.get(f"/v1/models/{name}").get_json()["default_version"]
    return ModelMetadata.read(SHIPPED_STORE / name / version / "metadata.json")


@pytest.mark.parametrize("name", ["convnet", "lenet"])
def test_every_answer_carries_precision_and_the_none_of_these_answer(client, name):
    answer = client.post(f"/v1/models/{name}/classify", data=NOISE, content_type="image/png").get_json()
    metadata = served_metadata(client, name)
    expected_precision = "int8" if metadata.files.model_int8 is not None else "fp32"
    assert answer["precision"] == expected_precision
    assert client.get(f"/v1/models/{name}").get_json()["precision"] == expected_precision
    prediction = answer["predictions"][0]
    assert prediction["in_domain"] == (prediction["domain_score"] >= metadata.metrics.domain.threshold)


@pytest.mark.parametrize("name", ["convnet", "lenet"])
def test_a_flat_red_square_is_none_of_the_labels(client, name):
    answer = client.post(f"/v1/models/{name}/classify", data=NOISE, content_type="image/png").get_json()
    assert answer["predictions"][0]["in_domain"] is False, answer


def test_precision_fp32_serves_the_fp32_graph(make_client, client):
    metadata = served_metadata(client, "convnet")
    assert metadata.files.model_int8 is not None, "the shipped default model serves INT8"
    fp32 = make_client(PRECISION="fp32")
    description = fp32.get("/v1/models/convnet").get_json()
    version = next(v for v in description["versions"] if v["version"] == description["default_version"])
    assert description["precision"] == version["precision"] == "fp32"
    assert version["sha256"] == metadata.files.model.sha256
    int8_answer = client.post("/v1/classify", data=NOISE, content_type="image/png").get_json()["predictions"][0]
    fp32_answer = fp32.post("/v1/classify", data=NOISE, content_type="image/png").get_json()["predictions"][0]
    assert fp32_answer["probabilities"] != int8_answer["probabilities"]  # two graphs really served
    assert abs(fp32_answer["domain_score"] - int8_answer["domain_score"]) < 0.2


def test_model_description_gives_calibration_domain_and_quantization_figures(client):
    version = client.get("/v1/models/convnet/versions/" + served_metadata(client, "convnet").version).get_json()
    figures = version["metrics"]
    metadata = served_metadata(client, "convnet").metrics
    assert figures["calibration"]["temperature"] == metadata.calibration.temperature
    assert figures["calibration"]["after"]["ece"] <= 0.03 < figures["calibration"]["before"]["ece"]
    # Every figure the service publishes is the graph's that serves (INT8 here), not FP32's.
    assert version["precision"] == "int8"
    served = metadata.quantization.int8
    assert figures["domain"] == {**json.loads(metadata.domain.model_dump_json(exclude={"candidates"})),
                                 "own_flagged": served.own_flagged, "other_flagged": served.other_flagged}
    assert figures["domain"]["own_flagged"] <= 0.05 < figures["domain"]["other_flagged"]
    assert figures["quantization"]["accepted"] and figures["quantization"]["top1_agreement"] >= 0.99
    assert figures["baselines"] == json.loads(served.baselines.model_dump_json())
    assert figures["calibration"]["after"] == json.loads(served.calibration.model_dump_json())
    assert served.baselines != metadata.baselines, "the INT8 graph's own baselines, not FP32's"
    # The default model was trained on a GPU and exported here: the description says where its epochs ran.
    stretches = version["training"]["trained_on"]
    assert stretches == [{key: s[key] for key in ("device", "hardware", "first_epoch", "last_epoch")}
                         for s in served_metadata(client, "convnet").training["trained_on"]]
    assert stretches[-1]["last_epoch"] == served_metadata(client, "convnet").training["config"]["epochs"]


def test_drift_metrics_count_served_answers_against_the_baselines(client):
    before = client.get("/metrics").get_data(as_text=True)
    metadata = served_metadata(client, "convnet")
    labels = {"model": "convnet", "version": metadata.version}
    for _ in range(3):
        assert client.post("/v1/classify", data=NOISE, content_type="image/png").status_code == 200
    after = client.get("/metrics").get_data(as_text=True)
    for name in ("convserve_confidence_count", "convserve_domain_score_count", "convserve_out_of_domain_total"):
        assert metric_value(after, name, **labels) - metric_value(before, name, **labels) == 3, name
    for quantity, value in metadata.metrics.baselines.model_dump().items():
        assert metric_value(after, "convserve_model_baseline", quantity=quantity, **labels) == pytest.approx(value)
    assert metric_value(after, "convserve_model_info", precision="int8", **labels) == 1
