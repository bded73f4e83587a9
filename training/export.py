"""Export to ONNX, prove parity with PyTorch, and rename a new version into the model store.

Two graphs are written:
- ``model.onnx``: input ``input`` float32 [N,3,H,W] → ``probabilities`` (calibrated softmax in the graph),
  ``domain_score`` and ``in_domain`` (the "none of these" answer) and the raw ``logits``;
- ``inspect.onnx``: the same network, also returning every stage by name and class activation maps,
  so classify requests never pay for inspection.
A version is published by renaming a finished temporary folder, so a half-written model is never visible,
and an existing version is never overwritten.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service import contract
from training.calibration import DomainRule
from training.models import first_conv_weight, keep_first_classes
from training.train import cpu_name

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ParityError(Exception):
    """ONNX Runtime disagrees with PyTorch; the model is not written."""


class Classifier(nn.Module):
    """What classify runs. Logits (averaged with the mirrored image when ``tta_flip``) → calibrated probabilities
    softmax(logits / T), and the "none of these" answer: domain_score and in_domain (see training/calibration.py).

    ``other_head`` holds the auxiliary classes' rows of the trained head (None when the model had none): their logits
    give the domain score's label mass, and are never part of the probabilities.
    """

    def __init__(self, model: nn.Module, tta_flip: bool, temperature: float = 1.0,
                 other_head: nn.Linear | None = None, rule: DomainRule | None = None):
        super().__init__()
        self.model = model
        self.tta_flip = tta_flip
        self.temperature = temperature
        self.other_head = other_head
        self.rule = rule or DomainRule("energy", 1.0, 0.0, 0.0)

    def with_threshold(self, threshold: float) -> Classifier:
        return Classifier(self.model, self.tta_flip, self.temperature, self.other_head,
                          replace(self.rule, threshold=threshold)).eval()

    def logits_and_features(self, x: torch.Tensor, stages: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The label logits and the head's input (for the auxiliary rows), flip-averaged when ``tta_flip``."""
        stages = stages if stages is not None else self.model.forward_stages(x)
        logits, features = stages[-1][2], stages[-2][2]
        if self.tta_flip:
            mirrored = self.model.forward_stages(x.flip(3))
            logits, features = (logits + mirrored[-1][2]) / 2, (features + mirrored[-2][2]) / 2
        return logits, features

    def raw_score(self, name: str, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``energy``: log-sum-exp of the label logits; ``label_mass``: log of the softmax mass on the labels
        among all trained classes (needs ``other_head``)."""
        labels = torch.logsumexp(logits, dim=1)
        if name == "energy":
            return labels
        return labels - torch.logsumexp(torch.cat([logits, self.other_head(features)], dim=1), dim=1)

    def raw_scores(self, logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        names = ["energy"] + (["label_mass"] if self.other_head is not None else [])
        return {name: self.raw_score(name, logits, features) for name in names}

    def raw_domain(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.raw_score(self.rule.score, logits, features)

    def answers(self, logits: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        score = torch.sigmoid(self.rule.slope * self.raw_domain(logits, features) + self.rule.offset)
        return torch.softmax(logits / self.temperature, dim=1), score, score >= self.rule.threshold

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, features = self.logits_and_features(x)
        return (*self.answers(logits, features), logits)


# What the service reads (service/contract.py, in order), then the raw logits for calibration and parity.
CLASSIFY_OUTPUTS = [*contract.OUTPUT_NAMES, contract.LOGITS]


class Inspector(Classifier):
    """Every stage of the network by name, the classifier's answers, and class activation maps."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stages = self.model.forward_stages(x)
        answers = self.answers(*self.logits_and_features(x, stages))
        outputs = [value for _, _, value in stages] + list(answers)
        if self.model.cam_stage is not None:
            features = dict((name, value) for name, _, value in stages)[self.model.cam_stage]
            # CAM_c(y, x) = sum_k w_ck * f_k(y, x): the head applied at every position before global averaging.
            outputs.append(torch.einsum("ck,nkhw->nchw", self.model.head.weight, features))
        return tuple(outputs)


def split_heads(model: nn.Module, count: int) -> nn.Linear | None:
    """Keep the head's first ``count`` rows (the labels) in the model, in place; return the auxiliary classes' rows
    as a head of their own (None when there are none). Softmax over the kept logits is exactly the trained model's
    prediction given that the image is one of the labels."""
    head: nn.Linear = model.head
    if head.out_features == count:
        return None
    others = nn.Linear(head.in_features, head.out_features - count, bias=head.bias is not None)
    with torch.no_grad():
        others.weight.copy_(head.weight[count:])
        if head.bias is not None:
            others.bias.copy_(head.bias[count:])
    keep_first_classes(model, count)
    return others.eval()


def inspection_outputs(model: nn.Module, input_shape: tuple[int, int, int]) -> list[dict]:
    """Name, kind and per-image shape of each stage, as the service will describe them."""
    with torch.no_grad():
        stages = model.forward_stages(torch.zeros(1, *input_shape))
    described = [{"name": name, "kind": kind, "shape": list(value.shape[1:])} for name, kind, value in stages]
    described.append({"name": contract.PROBABILITIES, "kind": "softmax", "shape": [stages[-1][2].shape[1]]})
    return described


def inspect_output_names(model: nn.Module, input_shape: tuple[int, int, int]) -> list[str]:
    stage_names = [stage["name"] for stage in inspection_outputs(model, input_shape)[:-1]]
    return stage_names + list(contract.OUTPUT_NAMES) + (["class_maps"] if model.cam_stage else [])


def export_graph(module: nn.Module, path: Path, output_names: list[str], input_shape: tuple[int, int, int]) -> None:
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), input_names=[contract.INPUT], output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in [contract.INPUT, *output_names]},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    onnx.checker.check_model(str(path))


def annotate(path: Path, properties: dict[str, str]) -> None:
    """Store labels and the like in the ONNX file too, for tools that only see the file."""
    proto = onnx.load(str(path))
    for key, value in properties.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def check_parity(path: Path, reference: dict[str, np.ndarray], inputs: np.ndarray,
                 tolerances: dict[str, float] | None = None) -> dict:
    """Run ONNX Runtime on ``inputs``; every float output must match PyTorch within 1e-4 with identical argmax, and
    in_domain may differ only where the score sits within the tolerance of the threshold."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [name for name in reference if name != contract.IN_DOMAIN]
    results = dict(zip(names, session.run(names, {contract.INPUT: inputs})))
    worst = 0.0
    for name in names:
        difference = float(np.abs(results[name] - reference[name]).max())
        worst = max(worst, difference)
        tolerance = (tolerances or {}).get(name, PARITY_TOLERANCE)
        if difference > tolerance:
            raise ParityError(f"{path.name}: output {name!r} differs from PyTorch by {difference:.2e} "
                              f"(tolerance {tolerance:.0e}); the model was not written.")
    if not np.array_equal(results[contract.PROBABILITIES].argmax(1), reference[contract.PROBABILITIES].argmax(1)):
        raise ParityError(f"{path.name}: ONNX Runtime and PyTorch predict different classes; not written.")
    return {"max_abs_diff": worst, "images": int(len(inputs)), "tolerance": PARITY_TOLERANCE}


def write_graphs(classifier: Classifier, folder: Path, parity_inputs: np.ndarray, properties: dict[str, str]) -> dict:
    """Export both graphs into ``folder`` and check each against PyTorch on ``parity_inputs``."""
    classifier = classifier.float().cpu().eval()
    model = classifier.model
    input_shape = tuple(parity_inputs.shape[1:])
    inspector = Inspector(model, classifier.tta_flip, classifier.temperature, classifier.other_head,
                          classifier.rule).eval()
    inspect_names = inspect_output_names(model, input_shape)
    export_graph(classifier, folder / "model.onnx", CLASSIFY_OUTPUTS, input_shape)
    export_graph(inspector, folder / "inspect.onnx", inspect_names, input_shape)
    for name in ("model.onnx", "inspect.onnx"):
        annotate(folder / name, properties)
    with torch.no_grad():
        tensor = torch.from_numpy(parity_inputs)
        classified = [t.numpy() for t in classifier(tensor)]
        inspected = [t.numpy() for t in inspector(tensor)]
    # The domain score is a sigmoid of slope x raw score: the logits' float rounding, scaled by at most slope / 2.
    tolerances = {contract.DOMAIN_SCORE: PARITY_TOLERANCE * max(1.0, abs(classifier.rule.slope) / 2)}
    return {
        "model.onnx": check_parity(folder / "model.onnx", dict(zip(CLASSIFY_OUTPUTS, classified)), parity_inputs,
                                   tolerances),
        "inspect.onnx": check_parity(folder / "inspect.onnx", dict(zip(inspect_names, inspected)), parity_inputs,
                                     tolerances),
    }


def save_filters(model: nn.Module, path: Path) -> None:
    """The first convolution's weights (out, in, kh, kw) as .npy: the service shows them without an ONNX parser."""
    with torch.no_grad():
        np.save(path, first_conv_weight(model).float().cpu().numpy(), allow_pickle=False)


def staging_folder(store: Path, name: str) -> Path:
    (store / name).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=store / name))


def rename_into_store(staging: Path, store: Path, name: str, version: int) -> Path:
    """Rename the staged folder to ``<store>/<name>/<version>``; refuses to overwrite an existing version."""
    target = store / name / str(version)
    staging.chmod(0o755)  # mkdtemp makes it private; a model store is read by other users (the container's)
    try:
        os.rename(staging, target)  # atomic; fails when the target exists and is not empty
    except OSError as exc:
        raise FileExistsError(f"{target} appeared while this run trained; rerun to write the next version.") from exc
    return target


def next_version(store: Path, name: str) -> int:
    folder = store / name
    if not folder.is_dir():
        return 1
    return max((int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), default=0) + 1


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def environment() -> dict:
    versions = {}
    for package in ("torch", "onnx", "onnxruntime", "numpy", "pillow"):
        try:
            versions[package] = package_metadata.version(package)
        except package_metadata.PackageNotFoundError:
            versions[package] = None
    # cpu_count: the machine's CPUs, a fact about the hardware like its processor; not service.settings'
    # available_cpus(), which sizes the service's threads to its affinity and quota. Training's share: torch_threads.
    hardware = {"machine": platform.machine(), "processor": cpu_name(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"python": platform.python_version(), "versions": versions, "hardware": hardware}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

