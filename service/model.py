"""One model version: its typed metadata and ONNX Runtime sessions. ``load()``, ``predict(batch)``, ``ready``.

Classify runs the INT8 graph when the version has one (unless PRECISION=fp32) and it passes verification on this
machine (service.verification), else ``model.onnx``, which must pass it too; ``inspect.onnx`` (every stage by name,
FP32) is opened only on the first inspect request, so classify never pays for it; if the store cannot give it then
(a blink, a changed file), that request gets 503 store_unavailable and classify goes on. Nothing else is read from
the store after load.
"""

from __future__ import annotations

import io
import os
import statistics
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

# ONNX Runtime's telemetry would try to reach the network and aborted workers on shutdown in containers.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

from service import contract, verification
from service.errors import StoreUnavailable
from service.metadata import Baselines, MetadataError, ModelMetadata, StoredFile, sha256_of
from service.preprocessing import InputSpec, normalize
from service.verification import Tolerances, Verification, VerificationSet


class ModelLoadError(Exception):
    """The version folder cannot be served; the message says why."""




@dataclass(frozen=True)
class Outputs:
    """One ONNX Runtime call's answers, a row per image."""

    probabilities: np.ndarray  # float32 (N, labels), calibrated
    domain_score: np.ndarray  # float32 (N,): higher = more like the training images
    in_domain: np.ndarray  # bool (N,): domain_score >= the threshold chosen at export

    def split(self, sizes: list[int]) -> list[Outputs]:
        cuts = np.cumsum(sizes)[:-1]
        return [Outputs(*parts) for parts in zip(*(np.split(getattr(self, f.name), cuts) for f in fields(self)))]


# An ONNX NodeProto's op_type is field 4, length-delimited (tag 0x22), then its length: these bytes appear in a graph
# that holds the operator (in its main graph, a subgraph or a local function). Another field may hold the same bytes
# by chance; that only costs the graph the event-loop shortcut.
_CONTROL_FLOW_OPS = (b"\x22\x04Loop", b"\x22\x04Scan", b"\x22\x02If", b"\x22\x0bSequenceMap")


def has_control_flow(graph: bytes) -> bool:
    """True when the serialized ONNX model may hold an operator whose running time depends on the input's values."""
    return any(marker in graph for marker in _CONTROL_FLOW_OPS)


class OnnxModel:
    def __init__(self, folder: Path, intra_op_threads: int = 1, precision: str = contract.INT8,
                 tolerances: Tolerances = Tolerances()):
        self.folder = folder
        # The store layout, not metadata, decides what a model is called (read once: it is on every request's path).
        self.name: str = folder.parent.name
        self.version: str = folder.name
        self.intra_op_threads = intra_op_threads
        self.wanted_precision = precision
        self.tolerances = tolerances
        self.metadata: ModelMetadata | None = None
        self.precision: str | None = None  # what serves: INT8 when wanted, present and verified here, else FP32
        # Each graph checked on this machine, by precision; refusal: why the INT8 graph does not serve here (or None).
        self.verifications: dict[str, Verification] = {}
        self.refusal: str | None = None
        self.served_file: StoredFile | None = None
        self.spec: InputSpec | None = None
        self.session: ort.InferenceSession | None = None
        self._inspect_session: ort.InferenceSession | None = None
        self._filters: np.ndarray | None = None
        self._inspect_lock = threading.Lock()
        # Whether one image's cost is fixed by the input's shape (no Loop, Scan or If in the graph), and what it is.
        self.fixed_cost = False
        self.image_seconds = float("inf")
        self.ready = False

    @property
    def labels(self) -> list[str]:
        return self.metadata.labels

    @property
    def input_name(self) -> str:
        return self.metadata.input.name

    @property
    def input_shape(self) -> list[int]:
        return self.metadata.input.shape

    @property
    def baselines(self) -> Baselines:
        """What validation measured through the graph that serves (drift alerts compare with these)."""
        quantization = self.metadata.metrics.quantization
        served = getattr(quantization, self.precision, None) if quantization else None
        return served.baselines if served is not None and served.baselines is not None \
            else self.metadata.metrics.baselines

    def load(self) -> None:
        """Read and validate metadata, check the checksums, open the graph to serve and verify it on this machine
        (an INT8 graph that fails gives way to FP32; an FP32 graph that fails fails the version), then warm up."""
        try:
            self.metadata = ModelMetadata.read(self.folder / "metadata.json")
            self.spec = self.metadata.input.preprocessing
            files = self.metadata.files
            checks = (VerificationSet.read(self._verified(files.verification).read_bytes())
                      if files.verification is not None else None)
            self._filters = np.load(io.BytesIO(self._verified(files.filters).read_bytes()), allow_pickle=False)
            if self.wanted_precision == contract.INT8 and files.model_int8 is not None:
                self._serve(contract.INT8, files.model_int8, checks)
                if checks is not None and not self.verifications[contract.INT8].passed:
                    self.refusal = ("the INT8 graph failed verification on this CPU: "
                                    f"{self.verifications[contract.INT8].summary()}; FP32 serves")
            if self.precision is None or self.refusal:
                self._serve(contract.FP32, files.model, checks)
                failed = self.verifications.get(contract.FP32)
                if failed is not None and not failed.passed:
                    raise ModelLoadError(f"the FP32 graph failed verification on this CPU ({failed.summary()}): "
                                         "this ONNX Runtime build or CPU gives other answers than export measured")
        except (ModelLoadError, MetadataError) as exc:
            raise ModelLoadError(str(exc)) from exc
        except FileNotFoundError as exc:
            raise ModelLoadError(f"missing file {exc.filename}") from exc
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"ONNX Runtime could not load the model: {exc}") from exc
        self.image_seconds = self.time_one_image(5)
        self.ready = True

    def time_one_image(self, runs: int, warm_runs: int = 1) -> float:
        """Median seconds of one image through the served graph, after ``warm_runs`` (the first run allocates). At
        load, what one image costs here decides whether a request is small enough to run on the event loop
        (service/pipeline.py); the benchmark reports it."""
        image = np.zeros((1, *self.input_shape[1:]), dtype=np.float32)
        for _ in range(warm_runs):
            self.predict(image)
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            self.predict(image)
            timings.append(time.perf_counter() - started)
        return statistics.median(timings)

    def _serve(self, precision: str, stored: StoredFile, checks: VerificationSet | None) -> None:
        """Open ``stored`` as the graph that serves, and verify it when the version has a verification set."""
        self.precision, self.served_file = precision, stored
        path = self._verified(stored)
        self.fixed_cost = not has_control_flow(path.read_bytes())
        self.session = self._open(path)
        if checks is not None:
            self.verifications[precision] = verification.verify(
                precision, self.predict, lambda images: normalize(images, self.spec), checks, self.tolerances)

    def predict(self, batch: np.ndarray) -> Outputs:
        """float32 (N, 3, H, W) → calibrated probabilities, domain scores and in-domain flags."""
        return Outputs(*self.session.run(list(contract.OUTPUT_NAMES), {self.input_name: batch}))

    def inspect(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every stage's output by name (plus probabilities and class_maps when the model has them); FP32."""
        with self._inspect_lock:
            if self._inspect_session is None:
                try:
                    self._inspect_session = self._open(self._verified(self.metadata.files.inspect))
                except (OSError, ModelLoadError) as exc:
                    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    raise StoreUnavailable(f"The inspection graph of {self.name} v{self.version} cannot be read from "
                                           f"the model store now ({detail}); classify still serves. Retry in a "
                                           "moment; if it persists, check the store.") from None
        names = [output.name for output in self._inspect_session.get_outputs()]
        return dict(zip(names, self._inspect_session.run(names, {self.input_name: batch})))

    def first_conv_filters(self) -> np.ndarray:
        """The first convolution's weights (out, in, kh, kw), saved at export and read at load."""
        return self._filters

    def _verified(self, stored: StoredFile) -> Path:
        path = self.folder / stored.path
        digest = sha256_of(path)
        if digest != stored.sha256:
            raise ModelLoadError(f"sha256 of {path.name} is {digest[:12]}…, metadata.json says "
                                 f"{stored.sha256[:12]}…: the file was changed or corrupted; re-export it")
        return path

    def _open(self, path: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
