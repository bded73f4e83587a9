"""Export to ONNX, prove parity with PyTorch, and publish a new version into the model store.

Two graphs are written:
- ``model.onnx``: input ``input`` float32 [N,3,H,W] → ``probabilities`` (softmax in the graph) and ``logits``;
- ``inspect.onnx``: the same network, also returning every stage by name and class activation maps,
  so classify requests never pay for inspection.
A version is published by renaming a finished temporary folder, so a half-written model is never visible,
and an existing version is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ParityError(Exception):
    """ONNX Runtime disagrees with PyTorch; the model is not written."""


class Classifier(nn.Module):
    """What classify runs: logits (averaged with the mirrored image when ``tta_flip``) and their softmax."""

    def __init__(self, model: nn.Module, tta_flip: bool):
        super().__init__()
        self.model = model
        self.tta_flip = tta_flip

    def logits(self, x: torch.Tensor, stages: list | None = None) -> torch.Tensor:
        logits = stages[-1][2] if stages is not None else self.model(x)
        if self.tta_flip:
            logits = (logits + self.model(x.flip(3))) / 2
        return logits

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(x)
        return torch.softmax(logits, dim=1), logits


class Inspector(Classifier):
    """Every stage of the network by name, the classifier's probabilities, and class activation maps."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stages = self.model.forward_stages(x)
        probabilities = torch.softmax(self.logits(x, stages), dim=1)
        outputs = [value for _, _, value in stages] + [probabilities]
        if self.model.cam_stage is not None:
            features = dict((name, value) for name, _, value in stages)[self.model.cam_stage]
            # CAM_c(y, x) = sum_k w_ck * f_k(y, x): the head applied at every position before global averaging.
            outputs.append(torch.einsum("ck,nkhw->nchw", self.model.head.weight, features))
        return tuple(outputs)


def inspection_outputs(model: nn.Module, input_shape: tuple[int, int, int]) -> list[dict]:
    """Name, kind and per-image shape of each stage, as the service will describe them."""
    with torch.no_grad():
        stages = model.forward_stages(torch.zeros(1, *input_shape))
    described = [{"name": name, "kind": kind, "shape": list(value.shape[1:])} for name, kind, value in stages]
    described.append({"name": "probabilities", "kind": "softmax", "shape": [stages[-1][2].shape[1]]})
    return described


def export_graph(module: nn.Module, path: Path, output_names: list[str], input_shape: tuple[int, int, int]) -> None:
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), input_names=["input"], output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in ["input", *output_names]},
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


def check_parity(path: Path, reference: dict[str, np.ndarray], inputs: np.ndarray) -> dict:
    """Run ONNX Runtime on ``inputs``; every output must match PyTorch within 1e-4 with identical argmax."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = list(reference)
    results = dict(zip(names, session.run(names, {"input": inputs})))
    worst = 0.0
    for name in names:
        difference = float(np.abs(results[name] - reference[name]).max())
        worst = max(worst, difference)
        if difference > PARITY_TOLERANCE:
            raise ParityError(f"{path.name}: output {name!r} differs from PyTorch by {difference:.2e} "
                              f"(tolerance {PARITY_TOLERANCE:.0e}); the model was not written.")
    for name in ("probabilities",):
        if name in results and not np.array_equal(results[name].argmax(1), reference[name].argmax(1)):
            raise ParityError(f"{path.name}: ONNX Runtime and PyTorch predict different classes; not written.")
    return {"max_abs_diff": worst, "images": int(len(inputs)), "tolerance": PARITY_TOLERANCE}


def write_graphs(model: nn.Module, folder: Path, tta_flip: bool, parity_inputs: np.ndarray,
                 properties: dict[str, str]) -> dict:
    """Export both graphs into ``folder`` and check each against PyTorch on ``parity_inputs``."""
    model = model.float().cpu().eval()
    input_shape = tuple(parity_inputs.shape[1:])
    classifier = Classifier(model, tta_flip).eval()
    inspector = Inspector(model, tta_flip).eval()
    stage_names = [stage["name"] for stage in inspection_outputs(model, input_shape)[:-1]]
    inspect_names = stage_names + ["probabilities"] + (["class_maps"] if model.cam_stage else [])
    export_graph(classifier, folder / "model.onnx", ["probabilities", "logits"], input_shape)
    export_graph(inspector, folder / "inspect.onnx", inspect_names, input_shape)
    for name in ("model.onnx", "inspect.onnx"):
        annotate(folder / name, properties)
    with torch.no_grad():
        tensor = torch.from_numpy(parity_inputs)
        probabilities, logits = (t.numpy() for t in classifier(tensor))
        inspected = [t.numpy() for t in inspector(tensor)]
    return {
        "model.onnx": check_parity(folder / "model.onnx", {"probabilities": probabilities, "logits": logits},
                                   parity_inputs),
        "inspect.onnx": check_parity(folder / "inspect.onnx", dict(zip(inspect_names, inspected)), parity_inputs),
    }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def staging_folder(store: Path, name: str) -> Path:
    (store / name).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=store / name))


def publish(staging: Path, store: Path, name: str, version: int) -> Path:
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
    hardware = {"machine": platform.machine(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"python": platform.python_version(), "versions": versions, "hardware": hardware}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
