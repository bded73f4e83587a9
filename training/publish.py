"""From a trained network to a published version in the store, step by step (``publish_model`` runs them).

Calibrate, set the "none of these" rule, export both graphs, quantize, measure what ships, plot, write the typed
metadata, and publish atomically. Each step is a function below.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from service import contract
from service.metadata import Files, ModelMetadata, Quantization, StoredFile
from service.preprocessing import InputSpec
from service.verification import Answers, VerificationSet, choose
from training import calibration, quantize
from training.evaluate import classification_metrics, plot_confusion, plot_curves
from training.export import (
    CLASSIFY_OUTPUTS,
    Classifier,
    discard,
    environment,
    inspection_outputs,
    next_version,
    rename_into_store,
    save_filters,
    split_heads,
    staging_folder,
    utc_now,
    write_graphs,
)
from training.models import parameter_count

PARITY_IMAGES = 256
VERIFICATION_PER_LABEL = 128  # 512 images for four labels: the service runs a prefix of them (VERIFY_IMAGES)


@dataclass
class Release:
    """Everything a published version is made from."""

    name: str
    labels: list[str]
    spec: InputSpec
    val_images: np.ndarray  # uint8 (N, H, W, 3), as decoded: the verification set is drawn from them
    val_inputs: np.ndarray
    val_labels: np.ndarray
    other_inputs: np.ndarray | None  # held-out images of other classes, or None without --extra-data
    calibration_inputs: np.ndarray  # training images, for INT8 activation ranges
    record: dict = field(default_factory=dict)  # architecture, training and data, as metadata keeps them


@torch.no_grad()
def network_outputs(classifier: Classifier, inputs: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Label logits and every candidate raw domain score, from PyTorch (before export)."""
    logits, raw = [], {}
    for start in range(0, len(inputs), batch_size):
        batch_logits, features = classifier.logits_and_features(torch.from_numpy(inputs[start:start + batch_size]))
        logits.append(batch_logits.numpy())
        for name, value in classifier.raw_scores(batch_logits, features).items():
            raw.setdefault(name, []).append(value.numpy())
    return {contract.LOGITS: np.concatenate(logits), **{name: np.concatenate(parts) for name, parts in raw.items()}}


def fit_answers(model: nn.Module, tta_flip: bool, release: Release) -> tuple[Classifier, dict]:
    """The temperature and the domain rule, both fitted on validation; returns the classifier to export."""
    other_head = split_heads(model, len(release.labels))
    classifier = Classifier(model.float().cpu().eval(), tta_flip, 1.0, other_head).eval()
    own = network_outputs(classifier, release.val_inputs)
    other = network_outputs(classifier, release.other_inputs) if release.other_inputs is not None else None
    temperature = calibration.fit_temperature(own[contract.LOGITS], release.val_labels)
    candidates = [name for name in own if name != contract.LOGITS]
    rule, aucs = calibration.choose_domain_rule({n: own[n] for n in candidates},
                                                {n: other[n] for n in candidates} if other else None)
    return Classifier(classifier.model, tta_flip, temperature, other_head, rule).eval(), aucs


def run_graph(path: Path, inputs: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [session.run(CLASSIFY_OUTPUTS, {contract.INPUT: inputs[start:start + batch_size]})
             for start in range(0, len(inputs), batch_size)]
    return {name: np.concatenate([part[i] for part in parts]) for i, name in enumerate(CLASSIFY_OUTPUTS)}


def measure(staging: Path, classifier: Classifier, aucs: dict, release: Release) -> dict:
    """What ships is what is measured: the exported graph's answers on validation images."""
    own = run_graph(staging / "model.onnx", release.val_inputs)
    other = run_graph(staging / "model.onnx", release.other_inputs) if release.other_inputs is not None else None
    before = calibration.softmax(own[contract.LOGITS])
    metrics = classification_metrics(own[contract.PROBABILITIES], release.val_labels, release.labels)
    domain = calibration.domain_figures(classifier.rule, own[contract.DOMAIN_SCORE],
                                        None if other is None else other[contract.DOMAIN_SCORE], aucs)
    return {
        "metrics": metrics,
        "before": before,
        "after": own[contract.PROBABILITIES],
        "own_domain_scores": own[contract.DOMAIN_SCORE],
        "calibration": {"method": "temperature", "temperature": classifier.temperature,
                        "bins": calibration.ECE_BINS,
                        "before": calibration.figures(before, release.val_labels),
                        "after": calibration.figures(own[contract.PROBABILITIES], release.val_labels)},
        "domain": domain,
        "baselines": baselines(own),
    }


def baselines(own: dict[str, np.ndarray]) -> dict:
    """What a graph's answers on the labels' own validation images look like, for drift alerts."""
    return {"mean_confidence": float(own[contract.PROBABILITIES].max(1).mean()),
            "out_of_domain_share": float((~own[contract.IN_DOMAIN]).mean()),
            "mean_domain_score": float(own[contract.DOMAIN_SCORE].mean())}


def served_figures(path: Path, release: Release) -> dict:
    """The figures the service publishes for a graph, measured through that graph: "none of these" at the threshold
    in the graph, the drift baselines and calibration."""
    own = run_graph(path, release.val_inputs)
    other = run_graph(path, release.other_inputs)[contract.IN_DOMAIN] if release.other_inputs is not None else None
    return {"own_flagged": float((~own[contract.IN_DOMAIN]).mean()),
            "other_flagged": None if other is None else float((~other).mean()),
            "baselines": baselines(own),
            "calibration": calibration.figures(own[contract.PROBABILITIES], release.val_labels)}


def write_verification_set(staging: Path, release: Release, int8: bool) -> None:
    """verification.npz: validation images, stratified and interleaved, with each graph's answers on them."""
    index = choose(release.val_labels, len(release.labels), VERIFICATION_PER_LABEL)
    answers = {}
    for precision, name in ((contract.FP32, "model.onnx"), (contract.INT8, "model.int8.onnx"))[:2 if int8 else 1]:
        outputs = run_graph(staging / name, release.val_inputs[index])
        answers[precision] = Answers(*(outputs[name] for name in contract.OUTPUT_NAMES))
    VerificationSet(release.val_images[index], release.val_labels[index], answers).write(staging / "verification.npz")


def plot_all(staging: Path, measured: dict, history: list[dict], release: Release, title: str) -> None:
    plot_confusion(measured["metrics"], staging / "confusion_matrix.png", f"{title} validation")
    plot_curves(history, staging / "training_curves.png", title)
    calibration.plot_reliability(measured["before"], measured["after"], release.val_labels,
                                 staging / "reliability.png", f"{title}: reliability on validation",
                                 measured["calibration"]["temperature"])


def build_metadata(staging: Path, version: int, classifier: Classifier, measured: dict, quantization: dict,
                   parity: dict, release: Release) -> ModelMetadata:
    spec, labels = release.spec, release.labels
    input_shape = (3, spec.height, spec.width)
    stages = inspection_outputs(classifier.model, input_shape)
    metrics = measured["metrics"]
    return ModelMetadata(
        name=release.name, version=str(version), created_at=utc_now(), labels=labels,
        input={"name": contract.INPUT, "dtype": "float32", "shape": [-1, *input_shape],
               "preprocessing": spec},
        outputs=[{"name": contract.PROBABILITIES, "dtype": "float32", "shape": [-1, len(labels)]},
                 {"name": contract.DOMAIN_SCORE, "dtype": "float32", "shape": [-1]},
                 {"name": contract.IN_DOMAIN, "dtype": "bool", "shape": [-1]},
                 {"name": contract.LOGITS, "dtype": "float32", "shape": [-1, len(labels)]}],
        files=Files(model=StoredFile.of(staging, "model.onnx"), inspect=StoredFile.of(staging, "inspect.onnx"),
                    filters=StoredFile.of(staging, "filters.npy"),
                    model_int8=StoredFile.of(staging, "model.int8.onnx") if quantization["accepted"] else None,
                    verification=StoredFile.of(staging, "verification.npz")),
        inspection={"stages": stages, "class_maps": "class_maps" if classifier.model.cam_stage else None,
                    "cam_stage": classifier.model.cam_stage,
                    "first_conv": next(s["name"] for s in stages if s["kind"] == "conv")},
        architecture={**release.record["architecture"], "parameters": parameter_count(classifier.model)},
        training=release.record["training"],
        data=release.record["data"],
        metrics={"validation": {k: metrics[k] for k in ("accuracy", "loss", "count", "per_class")},
                 "confusion_matrix": metrics["confusion_matrix"], "calibration": measured["calibration"],
                 "domain": measured["domain"], "baselines": measured["baselines"], "quantization": quantization},
        parity=parity,
    )


def export_and_quantize(classifier: Classifier, aucs: dict, staging: Path, properties: dict, release: Release,
                        progress=print) -> tuple[Classifier, dict, dict, dict]:
    """Both graphs, measured, and the INT8 graph checked against FP32. The "none of these" threshold must hold for
    whichever graph serves: when either graph's domain scores (INT8's are a little off FP32's) would flag more than
    the target share of the labels' own validation images, the threshold is lowered to what both meet, and the
    graphs are written again."""
    save_filters(classifier.model, staging / "filters.npy")
    while True:
        progress("exporting to ONNX and checking parity with PyTorch")
        parity = write_graphs(classifier, staging, release.val_inputs[:PARITY_IMAGES], properties)
        measured = measure(staging, classifier, aucs, release)
        progress("quantizing to INT8 and comparing with FP32")
        quantization = quantize.quantize_and_check(staging / "model.onnx", staging / "model.int8.onnx",
                                                   release.calibration_inputs, release.val_inputs,
                                                   release.val_labels, release.labels, progress)
        if not quantization["accepted"]:
            return classifier, parity, measured, quantization
        own = {"FP32": measured["own_domain_scores"],
               "INT8": run_graph(staging / "model.int8.onnx", release.val_inputs)[contract.DOMAIN_SCORE]}
        threshold = min(calibration.own_threshold(scores) for scores in own.values())
        if threshold >= classifier.rule.threshold:
            for precision, name in ((contract.FP32, "model.onnx"), (contract.INT8, "model.int8.onnx")):
                quantization[precision].update(served_figures(staging / name, release))
            return classifier, parity, measured, quantization
        flagged = {precision: float((scores < classifier.rule.threshold).mean()) for precision, scores in own.items()}
        progress(f"the graphs would flag {flagged['FP32']:.1%} (FP32) and {flagged['INT8']:.1%} (INT8) of the "
                 f"labels' own images: lowering the domain threshold from {classifier.rule.threshold:.4f} to "
                 f"{threshold:.4f}")
        classifier = classifier.with_threshold(threshold)


def publish_model(model: nn.Module, tta_flip: bool, history: list[dict], release: Release, store: Path,
                  progress=print) -> tuple[Path, ModelMetadata]:
    """Calibrate, export, quantize, measure and publish ``model`` as the next version of ``release.name``."""
    version = next_version(store, release.name)
    title = f"{release.name} v{version}"
    staging = staging_folder(store, release.name)
    try:
        progress("fitting the temperature and the domain rule on validation")
        classifier, aucs = fit_answers(model, tta_flip, release)
        properties = {"labels": json.dumps(release.labels), "name": release.name, "version": str(version)}
        classifier, parity, measured, quantization = export_and_quantize(classifier, aucs, staging, properties,
                                                                          release, progress)
        write_verification_set(staging, release, quantization["accepted"])
        plot_all(staging, measured, history, release, title)
        (staging / "metrics.json").write_text(json.dumps({"validation": measured["metrics"], "history": history},
                                                         indent=2) + "\n")
        metadata = build_metadata(staging, version, classifier, measured, quantization, parity, release)
        metadata.write(staging / "metadata.json")
        return rename_into_store(staging, store, release.name, version), metadata
    except BaseException:
        discard(staging)
        raise


def release_record(config, preset: str, run_info: dict, total_wall_time_s: float, summary: dict,
                   description: str) -> dict:
    """Architecture, training and data, as the metadata keeps them (the whole hyperparameter block included)."""
    return {
        "architecture": {"name": config.arch, "tta_flip": config.tta_flip, "description": description},
        # trained_on (in run_info): where the epochs ran; exported_on: the machine and libraries that exported.
        "training": {"config": config.to_dict(), "preset": preset, **run_info,
                     "total_wall_time_s": total_wall_time_s, "exported_on": environment()},
        "data": summary,
    }


COPIED_FILES = ("model.onnx", "inspect.onnx", "filters.npy", "metrics.json", "confusion_matrix.png",
                "training_curves.png", "reliability.png")


def requantize(source: Path, release: Release, store: Path, progress=print) -> tuple[Path, ModelMetadata]:
    """Publish the next version of ``source``'s model from its FP32 graphs, unchanged, with the INT8 graph
    quantized anew (every recipe measured here), a verification set, and each precision's figures; no training.
    Refuses when the FP32 graph does not reproduce the version's validation accuracy (other data, or another
    split)."""
    import onnx

    metadata = ModelMetadata.read(source / "metadata.json")
    version = next_version(store, metadata.name)
    staging = staging_folder(store, metadata.name)
    try:
        for name in COPIED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        for name in ("model.onnx", "inspect.onnx"):  # the files say which version they are
            proto = onnx.load(str(staging / name))
            for entry in proto.metadata_props:
                if entry.key == "version":
                    entry.value = str(version)
            onnx.save(proto, str(staging / name))
        fp32 = run_graph(staging / "model.onnx", release.val_inputs)
        accuracy = float((fp32[contract.PROBABILITIES].argmax(1) == release.val_labels).mean())
        if abs(accuracy - metadata.metrics.validation.accuracy) > 1e-9:
            raise ValueError(f"the FP32 graph scores {accuracy:.2%} on this validation split, the metadata says "
                             f"{metadata.metrics.validation.accuracy:.2%}: pass the data it was trained on")
        progress(f"requantizing {metadata.name} v{metadata.version} as v{version}: every INT8 recipe, measured here")
        quantization = quantize.quantize_and_check(staging / "model.onnx", staging / "model.int8.onnx",
                                                   release.calibration_inputs, release.val_inputs,
                                                   release.val_labels, release.labels, progress)
        quantization[contract.FP32].update(served_figures(staging / "model.onnx", release))
        if quantization["accepted"]:
            quantization[contract.INT8].update(served_figures(staging / "model.int8.onnx", release))
            target = metadata.metrics.domain.target_own_flagged
            # The threshold is in both graphs: re-export to move it.
            if quantization[contract.INT8]["own_flagged"] > target:
                quantization.update(accepted=False, problems=[
                    f"flags {quantization[contract.INT8]['own_flagged']:.2%} of the labels' own images at the FP32 "
                    f"graph's threshold (at most {target:.0%}): export from the checkpoint to lower it"])
                (staging / "model.int8.onnx").unlink()
        write_verification_set(staging, release, quantization["accepted"])
        files = Files(model=StoredFile.of(staging, "model.onnx"), inspect=StoredFile.of(staging, "inspect.onnx"),
                      filters=StoredFile.of(staging, "filters.npy"),
                      model_int8=StoredFile.of(staging, "model.int8.onnx") if quantization["accepted"] else None,
                      verification=StoredFile.of(staging, "verification.npz"))
        training = {**metadata.training,
                    "requantized": {"from_version": metadata.version, "at": utc_now(), "on": environment()}}
        republished = metadata.model_copy(update={
            "version": str(version), "created_at": utc_now(), "files": files, "training": training,
            "metrics": metadata.metrics.model_copy(update={"quantization": Quantization.model_validate(
                quantization)})})
        republished = ModelMetadata.model_validate(republished.model_dump())
        republished.write(staging / "metadata.json")
        return rename_into_store(staging, store, metadata.name, version), republished
    except BaseException:
        discard(staging)
        raise
