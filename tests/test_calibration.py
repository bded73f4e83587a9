"""The export steps behind calibrated probabilities, "none of these" and INT8, on synthetic numbers and a model.

Probabilities must mean what they say; the model is a small one trained for the purpose."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from service.metadata import ModelMetadata, sha256_of
from service.model import OnnxModel
from service.verification import VerificationSet
from tests.test_training import write_tree
from training import calibration, quantize
from training.__main__ import main


# --- the arithmetic -------------------------------------------------------------------------------------------------
def test_fit_temperature_recovers_how_overconfident_the_logits_are():
    rng = np.random.default_rng(0)
    honest = rng.normal(0, 2, size=(6000, 4))
    labels = np.array([rng.choice(4, p=p) for p in calibration.softmax(honest)])
    assert calibration.fit_temperature(honest * 2.5, labels) == pytest.approx(2.5, rel=0.08)
    assert calibration.fit_temperature(honest * 0.5, labels) == pytest.approx(0.5, rel=0.08)


def test_expected_calibration_error_by_hand():
    # Two bins used: 0.95 confident and always right (gap 0.05), 0.55 confident and right half the time (gap 0.05).
    probabilities = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    labels = np.array([0, 0, 0, 0, 0, 1, 0, 1])
    bins = calibration.reliability(probabilities, labels)
    assert bins["ece"] == pytest.approx(0.05)
    assert bins["counts"].sum() == 8 and (bins["counts"] > 0).sum() == 2


def test_roc_auc_is_the_share_of_pairs_ranked_right_ties_half():
    rng = np.random.default_rng(1)
    own, other = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairs = (own[:, None] > other[None, :]).mean() + 0.5 * (own[:, None] == other[None, :]).mean()
    assert calibration.roc_auc(own, other) == pytest.approx(pairs)


def test_domain_rule_flags_at_most_the_target_share_of_the_labels_images():
    rng = np.random.default_rng(2)
    own = {"energy": rng.normal(3, 1, 2000), "label_mass": rng.normal(0, 0.2, 2000)}
    other = {"energy": rng.normal(0, 1, 3000), "label_mass": rng.normal(-2, 0.5, 3000)}
    rule, aucs = calibration.choose_domain_rule(own, other)
    assert rule.score == "label_mass" and aucs["label_mass"] > aucs["energy"]  # the better separator is chosen
    own_scores, other_scores = rule.apply(own[rule.score]), rule.apply(other[rule.score])
    assert 0 <= own_scores.min() and other_scores.max() <= 1
    figures = calibration.domain_figures(rule, own_scores, other_scores, aucs)
    assert 0.04 <= figures["own_flagged"] <= calibration.OWN_FLAGGED_TARGET
    assert figures["other_flagged"] > 0.95 and figures["roc_auc"] == pytest.approx(aucs["label_mass"])


def test_without_other_images_the_rule_still_bounds_the_labels_images_flagged():
    own = {"energy": np.random.default_rng(3).normal(5, 2, 1000)}
    rule, aucs = calibration.choose_domain_rule(own, None)
    assert aucs == {} and rule.score == "energy"
    assert (rule.apply(own["energy"]) < rule.threshold).mean() <= calibration.OWN_FLAGGED_TARGET


# --- a small trained model ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    tree = write_tree(root / "data", per_label=24)
    extra = write_tree(root / "extra", labels=["horse", "frog", "truck"], per_label=12)
    store = root / "store"
    assert main(["train", "--data", str(tree), "--extra-data", str(extra), "--store", str(store), "--preset",
                 "smoke", "--epochs", "3", "--val-fraction", "0.25", "--no-progress"]) == 0
    return store / "lenet-smoke" / "1"


def test_calibration_is_baked_into_the_graph_and_never_changes_a_prediction(small_run):
    metadata = ModelMetadata.read(small_run / "metadata.json")
    calibrated = metadata.metrics.calibration
    assert calibrated.temperature > 0 and calibrated.bins == calibration.ECE_BINS
    assert calibrated.after.log_loss <= calibrated.before.log_loss + 1e-9  # T minimises it; T = 1 was a candidate
    assert calibrated.after.accuracy == calibrated.before.accuracy == metadata.metrics.validation.accuracy
    assert (small_run / "reliability.png").stat().st_size > 5000
    import onnxruntime as ort

    session = ort.InferenceSession(str(small_run / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = np.random.default_rng(4).normal(size=(64, 3, 32, 32)).astype(np.float32)
    probabilities, logits = session.run(["probabilities", "logits"], {"input": inputs})
    assert np.array_equal(probabilities.argmax(1), logits.argmax(1))
    expected = torch.softmax(torch.from_numpy(logits) / calibrated.temperature, dim=1).numpy()
    assert np.allclose(probabilities, expected, atol=1e-5)


def test_every_answer_says_whether_the_image_looks_like_the_labels(small_run):
    metadata = ModelMetadata.read(small_run / "metadata.json")
    domain = metadata.metrics.domain
    assert domain.own_flagged <= domain.target_own_flagged == calibration.OWN_FLAGGED_TARGET
    assert domain.other_count == 9 and domain.other_flagged is not None and domain.roc_auc is not None
    assert set(domain.candidates) == {"energy"}  # lenet-smoke trained on the four labels only: no auxiliary rows
    model = OnnxModel(small_run)
    model.load()
    outputs = model.predict(np.random.default_rng(5).normal(size=(16, 3, 32, 32)).astype(np.float32))
    assert ((0 <= outputs.domain_score) & (outputs.domain_score <= 1)).all()
    assert np.array_equal(outputs.in_domain, outputs.domain_score >= domain.threshold)
    baselines = metadata.metrics.baselines
    assert baselines.out_of_domain_share == pytest.approx(domain.own_flagged)
    assert baselines.mean_confidence == pytest.approx(metadata.metrics.calibration.after.mean_confidence)


def test_int8_ships_only_when_it_agrees_with_fp32(small_run, tmp_path, monkeypatch):
    metadata = ModelMetadata.read(small_run / "metadata.json")
    checks = metadata.metrics.quantization
    assert checks.calibration_images >= 1 and checks.int8.size_bytes < checks.fp32.size_bytes
    assert (metadata.files.model_int8 is not None) == checks.accepted == (not checks.problems)
    # A bar no graph can pass: the INT8 file is refused, recorded, and the service serves FP32.
    monkeypatch.setattr(quantize, "MIN_TOP1_AGREEMENT", 1.01)
    tree = small_run.parent.parent.parent / "data"
    assert main(["train", "--data", str(tree), "--store", str(tmp_path), "--preset", "smoke", "--val-fraction",
                 "0.25", "--no-progress"]) == 0
    folder = tmp_path / "lenet-smoke" / "1"
    refused = ModelMetadata.read(folder / "metadata.json")
    assert refused.files.model_int8 is None and not (folder / "model.int8.onnx").exists()
    assert not refused.metrics.quantization.accepted
    tried = refused.metrics.quantization.recipes_tried
    assert len(tried) == len(quantize.RECIPES) and "top-1 agrees with FP32" in tried[0]
    assert refused.metrics.quantization.problems
    model = OnnxModel(folder, precision="int8")
    model.load()
    assert model.precision == "fp32"


def test_the_none_of_these_threshold_holds_for_the_int8_graph_too(small_run, tmp_path, monkeypatch):
    """The threshold is set on FP32's scores; were it too high for INT8's, export lowers it until both graphs flag
    at most the target share of the labels' own validation images, and writes both again."""
    fitted = calibration.choose_domain_rule

    def too_high(own_raw, other_raw, target=calibration.OWN_FLAGGED_TARGET):
        rule, aucs = fitted(own_raw, other_raw, target)  # flags every image but the most typical one
        return dataclasses.replace(rule, threshold=float(rule.apply(own_raw[rule.score]).max())), aucs

    monkeypatch.setattr(calibration, "choose_domain_rule", too_high)
    # The INT8 graph must ship whatever this tiny net's agreement and this machine's timing: this test is about the
    # threshold, not about whether INT8 is worth it.
    monkeypatch.setattr(quantize, "MIN_TOP1_AGREEMENT", 0.0)
    monkeypatch.setattr(quantize, "MAX_ACCURACY_DROP", 1.0)
    monkeypatch.setattr(quantize, "MAX_LABEL_ACCURACY_DROP", 1.0)
    monkeypatch.setattr(quantize, "latency_ms", lambda path, image, repeats=200: 1.0 if "int8" in path.name else 2.0)
    root = small_run.parent.parent.parent
    assert main(["train", "--data", str(root / "data"), "--extra-data", str(root / "extra"), "--store", str(tmp_path),
                 "--preset", "smoke", "--epochs", "3", "--val-fraction", "0.25", "--no-progress"]) == 0
    folder = tmp_path / "lenet-smoke" / "1"
    metadata = ModelMetadata.read(folder / "metadata.json")
    checks, domain = metadata.metrics.quantization, metadata.metrics.domain
    assert checks.accepted
    target = calibration.OWN_FLAGGED_TARGET
    assert domain.own_flagged <= target and checks.fp32.own_flagged <= target and checks.int8.own_flagged <= target
    assert checks.fp32.own_flagged == domain.own_flagged and checks.int8.other_flagged is not None
    for precision in ("int8", "fp32"):  # both graphs were written again with the lowered threshold
        model = OnnxModel(folder, precision=precision)
        model.load()
        outputs = model.predict(np.random.default_rng(6).normal(size=(16, 3, 32, 32)).astype(np.float32))
        assert model.precision == precision
        assert np.array_equal(outputs.in_domain, outputs.domain_score >= domain.threshold)


def test_precision_setting_chooses_the_graph(small_run, tmp_path):
    folder = tmp_path / "lenet-smoke" / "1"
    shutil.copytree(small_run, folder)
    metadata = json.loads((folder / "metadata.json").read_text())
    if metadata["files"]["model_int8"] is None:  # refused for this tiny model: stand the FP32 graph in for it
        shutil.copy(folder / "model.onnx", folder / "model.int8.onnx")
        digest = hashlib.sha256((folder / "model.int8.onnx").read_bytes()).hexdigest()
        metadata["files"]["model_int8"] = {"path": "model.int8.onnx", "sha256": digest}
        checks = VerificationSet.read((folder / "verification.npz").read_bytes())  # ... and its answers too
        VerificationSet(checks.images, checks.labels, {**checks.answers, "int8": checks.answers["fp32"]}).write(
            folder / "verification.npz")
        metadata["files"]["verification"]["sha256"] = sha256_of(folder / "verification.npz")
        (folder / "metadata.json").write_text(json.dumps(metadata))
    served = {}
    for precision in ("int8", "fp32"):
        model = OnnxModel(folder, precision=precision)
        model.load()
        served[precision] = (model.precision, model.served_file.path)
    assert served == {"int8": ("int8", "model.int8.onnx"), "fp32": ("fp32", "model.onnx")}
