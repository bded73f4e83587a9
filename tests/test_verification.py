"""Verified where it serves: every version's graph is re-checked on this machine's CPU before it serves.

These run real ONNX Runtime on whatever CPU the tests run on: the shipped models must verify here, and their served
answers must match export's figures here, so a test run on a CPU where the served graph is off fails.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from service.metadata import ModelMetadata, sha256_of
from service.model import OnnxModel
from service.preprocessing import normalize
from service.verification import Tolerances, VerificationSet, choose, cpu, figures, problems_of
from tests.conftest import SHIPPED_MODELS, SHIPPED_STORE
from tests.helpers import metric_value

TOLERANCE = 0.005  # half a point: the bar the served answers must meet against export's figures


def latest(name: str) -> Path:
    return max((SHIPPED_STORE / name).iterdir(), key=lambda path: int(path.name))


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_the_shipped_models_verify_on_this_cpu_within_half_a_point(name):
    """What export promised for the served graph holds here: accuracy on the whole set within half a point of
    export's figure for that graph and of the FP32 reference, and at most 5.5 % of the labels' own images flagged."""
    model = OnnxModel(latest(name), precision="int8")
    model.load()
    checks = VerificationSet.read((model.folder / model.metadata.files.verification.path).read_bytes())
    every_image = model.predict(normalize(checks.images, model.spec))
    served = figures(every_image, checks.answers["fp32"], checks.labels)
    exported = figures(checks.answers[model.precision], checks.answers["fp32"], checks.labels)
    fp32 = figures(checks.answers["fp32"], checks.answers["fp32"], checks.labels)
    assert served["accuracy"] >= exported["accuracy"] - TOLERANCE, (served, exported, cpu())
    assert served["accuracy"] >= fp32["accuracy"] - TOLERANCE, (served, fp32, cpu())
    assert served["own_flagged"] <= 0.055, (served, cpu())
    check = model.verifications[model.precision]
    assert check.passed and not check.problems, check
    assert model.refusal is None, f"{model.refusal} on {cpu()}"
    if model.metadata.files.model_int8 is not None:
        assert model.precision == "int8", "INT8 serves by default where it holds"


def test_every_shipped_int8_graph_is_saturation_free():
    """Weights within 7 bits: the integer kernels of CPUs without VNNI compute the same numbers as those with."""
    from training.quantize import saturation_problem

    graphs = [latest(name) / "model.int8.onnx" for name in SHIPPED_MODELS
              if (latest(name) / "model.int8.onnx").exists()]
    assert graphs, "the default model ships an INT8 graph"
    for graph in graphs:
        assert saturation_problem(graph) is None, graph


def test_a_full_range_int8_graph_is_called_saturating(tmp_path):
    from training import quantize

    source = latest("lenet")
    checks = VerificationSet.read((source / "verification.npz").read_bytes())
    spec = ModelMetadata.read(source / "metadata.json").input.preprocessing
    calibration = normalize(checks.images[:64], spec)
    full, seven_bit = tmp_path / "full.onnx", tmp_path / "seven.onnx"
    quantize.quantize(source / "model.onnx", full, calibration, quantize.Recipe("minmax"))
    quantize.quantize(source / "model.onnx", seven_bit, calibration, quantize.Recipe("minmax-7bit", reduce_range=True))
    assert "saturate" in quantize.saturation_problem(full)
    assert quantize.saturation_problem(seven_bit) is None


def test_the_verification_set_is_stratified_in_every_prefix():
    labels = np.repeat(np.arange(4), 50)
    index = choose(labels, 4, 10)
    assert len(index) == 40 and len(set(index)) == 40
    for prefix in (4, 8, 40):
        assert np.bincount(labels[index[:prefix]], minlength=4).tolist() == [prefix // 4] * 4


def test_each_figure_beyond_its_tolerance_is_a_problem():
    exported = {"accuracy": 0.9, "top1_agreement": 0.99, "in_domain_agreement": 0.99, "own_flagged": 0.05,
                "max_probability_difference": 0.1}
    tolerances = Tolerances()
    assert problems_of(dict(exported), exported, tolerances) == []
    edge = {**exported, "accuracy": 0.895, "top1_agreement": 0.985, "own_flagged": 0.055}
    assert problems_of(edge, exported, tolerances) == []
    for key, value in (("accuracy", 0.89), ("top1_agreement", 0.98), ("in_domain_agreement", 0.98),
                       ("own_flagged", 0.06), ("max_probability_difference", 0.13)):
        assert len(problems_of({**exported, key: value}, exported, tolerances)) == 1, key


# Broken graphs ------------------------------------------------------------------------------------------------------
def rewrite_checksum(folder: Path, role: str) -> None:
    """Re-record a changed file's sha256, as a broken export would have: the checksum passes, the numbers don't."""
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["files"][role]["sha256"] = sha256_of(folder / metadata["files"][role]["path"])
    (folder / "metadata.json").write_text(json.dumps(metadata))


def perturb_int8_scales(path: Path, factor: float = 1.6) -> None:
    """Scale every convolution weight's dequantization scales: what a bad calibration or a saturating kernel does."""
    proto = onnx.load(str(path))
    initializers = {init.name: init for init in proto.graph.initializer}
    scales = {node.input[1] for node in proto.graph.node if node.op_type == "DequantizeLinear"
              and node.input[0] in initializers and len(initializers[node.input[0]].dims) == 4}
    assert scales, "the INT8 graph has quantized convolution weights"
    for name in scales:
        initializers[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(initializers[name]) * factor, name))
    onnx.save(proto, str(path))


def test_a_broken_int8_graph_is_refused_and_fp32_serves(make_client, tmp_path):
    store = tmp_path / "store"
    folder = store / "convnet" / "1"
    shutil.copytree(latest("convnet"), folder, ignore=shutil.ignore_patterns("*.png"))
    perturb_int8_scales(folder / "model.int8.onnx")
    rewrite_checksum(folder, "model_int8")
    lines = LogLines()
    logging.getLogger("convserve").addHandler(lines)
    try:
        client = make_client(MODEL_STORE=store)
    finally:
        logging.getLogger("convserve").removeHandler(lines)
    described = client.get("/v1/models/convnet").get_json()
    assert described["precision"] == "fp32"
    assert "INT8 graph failed verification on this CPU" in described["precision_reason"]
    graphs = described["verification"]["graphs"]
    assert not graphs["int8"]["passed"] and graphs["int8"]["problems"] and graphs["fp32"]["passed"]
    assert graphs["int8"]["measured"]["accuracy"] < graphs["int8"]["exported"]["accuracy"] - TOLERANCE
    assert described["verification"]["on"]["onnxruntime"] and "features" in described["verification"]["on"]
    version = described["versions"][0]
    assert version["state"] == "ready" and version["precision"] == "fp32" and version["precision_reason"]
    refusals = [record for record in lines.records if "failed verification" in record.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING, lines.records
    answer = client.post("/v1/classify", data=_png(), content_type="image/png").get_json()
    assert answer["precision"] == "fp32"
    v2 = client.get("/v2/models/convnet").get_json()["parameters"]
    assert v2["precision"] == "fp32" and "failed verification" in v2["precision_reason"]
    exposition = client.get("/metrics").get_data(as_text=True)
    assert metric_value(exposition, "convserve_model_verification_passed", model="convnet", version="1",
                        precision="int8") == 0
    assert metric_value(exposition, "convserve_model_verification_passed", model="convnet", version="1",
                        precision="fp32") == 1
    assert metric_value(exposition, "convserve_model_info", model="convnet", version="1",
                        sha256=version["sha256"], precision="fp32") == 1


def test_an_fp32_graph_that_disagrees_fails_its_version_and_the_previous_one_serves(make_client, tmp_path):
    store = tmp_path / "store"
    for version in ("1", "2"):
        shutil.copytree(latest("lenet"), store / "lenet" / version, ignore=shutil.ignore_patterns("*.png"))
    broken = store / "lenet" / "2"
    proto = onnx.load(str(broken / "model.onnx"))
    weight = next(init for init in proto.graph.initializer if len(init.dims) == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(proto, str(broken / "model.onnx"))
    rewrite_checksum(broken, "model")
    client = make_client(MODEL_STORE=store, DEFAULT_MODEL="lenet")
    described = client.get("/v1/models/lenet").get_json()
    assert described["default_version"] == "1" and described["precision"] == "fp32"
    failed = {v["version"]: v for v in described["versions"]}["2"]
    assert failed["state"] == "failed" and "FP32 graph failed verification on this CPU" in failed["error"]
    assert client.post("/v1/classify", data=_png(), content_type="image/png").get_json()["version"] == "1"
    assert client.get("/readyz").status_code == 200


class LogLines(logging.Handler):
    """The service logger's records, whatever handlers the app set up."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _png() -> bytes:
    from tests.helpers import image_bytes

    return image_bytes("PNG", 32, 32)
