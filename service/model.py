"""One model version: its metadata and ONNX Runtime sessions. ``load()``, ``predict(batch)``, ``ready``.

``model.onnx`` serves classify; ``inspect.onnx`` (every stage by name) is opened only on the first inspect request,
so classify never pays for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

# ONNX Runtime's telemetry would try to reach the network and aborted workers on shutdown in containers.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

from service.errors import InvalidTensor
from service.preprocessing import InputSpec


class ModelLoadError(Exception):
    """The version folder cannot be served; the message says why."""


class OnnxModel:
    def __init__(self, folder: Path, intra_op_threads: int = 1):
        self.folder = folder
        self.intra_op_threads = intra_op_threads
        self.metadata: dict = {}
        self.spec: InputSpec | None = None
        self.session: ort.InferenceSession | None = None
        self._inspect_session: ort.InferenceSession | None = None
        self._inspect_lock = threading.Lock()
        self.ready = False

    @property
    def name(self) -> str:
        return self.folder.parent.name  # the store layout, not metadata, decides what a model is called

    @property
    def version(self) -> str:
        return self.folder.name

    @property
    def labels(self) -> list[str]:
        return self.metadata["labels"]

    @property
    def input_name(self) -> str:
        return self.metadata["input"]["name"]

    @property
    def input_shape(self) -> list[int]:
        return self.metadata["input"]["shape"]

    def load(self) -> None:
        """Read metadata, verify the checksum, open the session and warm it up."""
        try:
            self.metadata = json.loads((self.folder / "metadata.json").read_text())
            self.spec = InputSpec.from_metadata(self.metadata["input"]["preprocessing"])
            model_file = self.folder / self.metadata["files"]["model"]
            _verify(model_file, self.metadata["sha256"])
            self.session = self._open(model_file)
        except ModelLoadError:
            raise
        except FileNotFoundError as exc:
            raise ModelLoadError(f"missing file {exc.filename}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"metadata.json is incomplete or invalid: {exc!r}") from exc
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"ONNX Runtime could not load the model: {exc}") from exc
        self.predict(np.zeros((1, *self.input_shape[1:]), dtype=np.float32))  # warm-up: first run allocates
        self.ready = True

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 3, H, W) → probabilities (N, labels)."""
        return self.session.run(["probabilities"], {self.input_name: batch})[0]

    def check_tensor(self, batch: np.ndarray) -> None:
        expected = self.input_shape[1:]
        if batch.ndim != 4 or list(batch.shape[1:]) != expected:
            raise InvalidTensor(f"Input must have shape [N, {', '.join(map(str, expected))}]; "
                                f"got {list(batch.shape)}.")

    def inspect(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every stage's output by name (plus probabilities and class_maps when the model has them)."""
        with self._inspect_lock:
            if self._inspect_session is None:
                inspect_file = self.folder / self.metadata["files"]["inspect"]
                _verify(inspect_file, self.metadata["inspect_sha256"])
                self._inspect_session = self._open(inspect_file)
        names = [output.name for output in self._inspect_session.get_outputs()]
        return dict(zip(names, self._inspect_session.run(names, {self.input_name: batch})))

    def first_conv_filters(self) -> np.ndarray:
        """The first convolution's weights (out, in, kh, kw), read from the exported graph."""
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(self.folder / self.metadata["files"]["model"])).graph
        weights = {tensor.name: tensor for tensor in graph.initializer}
        for node in graph.node:
            if node.op_type == "Conv" and node.input[1] in weights:
                return numpy_helper.to_array(weights[node.input[1]])
        raise ModelLoadError("the graph has no convolution with constant weights")

    def _open(self, path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _verify(path: Path, expected: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise ModelLoadError(f"sha256 of {path.name} is {digest[:12]}…, metadata.json says {expected[:12]}…: "
                             "the file was changed or corrupted; re-export it")
