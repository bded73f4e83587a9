"""metadata.json as one typed schema: export writes a ``ModelMetadata``, the service reads one.

A version whose metadata misses or mistypes a field fails to load with the field's name. The JSON Schema is published
at ``GET /schemas/metadata.json`` and in ``model_store/metadata.schema.json`` (written by
``python -m service.metadata``, checked by the tests).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service import contract
from service.preprocessing import InputSpec

SCHEMA_VERSION = 2
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "model_store" / "metadata.schema.json"
Share = Annotated[float, Field(ge=0.0, le=1.0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ForwardCompatible(BaseModel):
    """Fields are checked; fields this version does not know are kept (a newer exporter may add some)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class TensorSpec(ForwardCompatible):
    name: str = Field(min_length=1)
    dtype: Literal["float32", "bool"]
    shape: list[int]


class InputTensor(TensorSpec):
    dtype: Literal["float32"] = "float32"
    preprocessing: InputSpec  # service/preprocessing.py: the one type, validated here as everywhere

    @model_validator(mode="after")
    def _shape_matches_preprocessing(self) -> InputTensor:
        expected = [-1, 3, self.preprocessing.height, self.preprocessing.width]
        if self.shape != expected:
            raise ValueError(f"shape {self.shape} does not match preprocessing (expected {expected})")
        return self


class StoredFile(ForwardCompatible):
    path: str = Field(min_length=1, pattern=r"^[^/\\]+$")  # a file in the version folder, never elsewhere
    sha256: Sha256

    @classmethod
    def of(cls, folder: Path, filename: str) -> StoredFile:
        """A file of the version folder with its checksum, as export records it."""
        return cls(path=filename, sha256=sha256_of(folder / filename))


def sha256_of(path: Path) -> str:
    """A file's SHA-256 (hex): what export records in ``StoredFile.sha256`` and the service checks at load."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class Files(ForwardCompatible):
    model: StoredFile  # FP32 classify graph
    inspect: StoredFile  # every stage by name, for /v1/inspect
    filters: StoredFile  # first-layer weights (.npy): the service needs no ONNX parser to show them
    model_int8: StoredFile | None = None  # statically quantized classify graph, when it passed its checks
    # Validation images with each graph's answers at export; the service re-checks the graph it serves with them.
    verification: StoredFile | None = None

    def stored(self) -> list[StoredFile]:
        """Every file the version names, with its checksum."""
        return [stored for stored in (getattr(self, name) for name in type(self).model_fields)
                if isinstance(stored, StoredFile)]


class Stage(ForwardCompatible):
    name: str
    kind: str
    shape: list[int]


class Inspection(ForwardCompatible):
    stages: list[Stage] = Field(min_length=1)
    class_maps: str | None = None
    cam_stage: str | None = None
    first_conv: str


class Architecture(ForwardCompatible):
    name: str
    parameters: int = Field(ge=1)
    tta_flip: bool
    description: str = ""


class ClassMetrics(ForwardCompatible):
    accuracy: Share
    precision: Share
    support: int = Field(ge=0)


class Validation(ForwardCompatible):
    accuracy: Share
    loss: float = Field(ge=0)
    count: int = Field(ge=1)
    per_class: dict[str, ClassMetrics]


class ConfusionMatrix(ForwardCompatible):
    labels: list[str]
    rows_true_columns_predicted: list[list[int]]


class CalibrationFigures(ForwardCompatible):
    accuracy: Share
    ece: Share  # expected calibration error, 15 equal-width confidence bins
    log_loss: float = Field(ge=0)
    mean_confidence: Share


class Calibration(ForwardCompatible):
    """Temperature scaling fitted on the validation split and baked into the graph: softmax(logits / T)."""

    method: Literal["temperature"] = "temperature"
    temperature: float = Field(gt=0)
    bins: int = Field(ge=2)
    before: CalibrationFigures
    after: CalibrationFigures


class Domain(ForwardCompatible):
    """The "none of these" answer: ``domain_score`` (higher = more like the training images) and ``in_domain``
    (score >= threshold), both computed in the graph."""

    score: str  # how the graph computes it, in words
    threshold: float
    own_flagged: Share  # validation images of the labels flagged out of domain (chosen <= target)
    target_own_flagged: Share
    other_flagged: Share | None = None  # held-out images of other classes flagged
    roc_auc: Share | None = None
    other_count: int = Field(default=0, ge=0)
    candidates: dict[str, Share] = Field(default_factory=dict)  # ROC AUC of each score export compared


class Baselines(ForwardCompatible):
    """What validation measured on in-domain images, for drift alerts in production."""

    mean_confidence: Share
    out_of_domain_share: Share
    mean_domain_score: float


class PrecisionFigures(ForwardCompatible):
    accuracy: Share
    per_class_accuracy: dict[str, Share]
    latency_ms: float | None = None  # one image, one thread, median
    size_bytes: int = Field(ge=1)
    # "None of these" through this graph at the shared threshold (None: not measured, or no other-class images).
    own_flagged: Share | None = None
    other_flagged: Share | None = None
    # What the drift alerts and the calibration figures are for this graph (None: versions exported before these).
    baselines: Baselines | None = None
    calibration: CalibrationFigures | None = None


class Quantization(ForwardCompatible):
    """INT8 against FP32 on the validation split; ``accepted`` only when every check passed."""

    accepted: bool
    method: str  # the recipe that passed, or the last one tried
    recipes_tried: list[str] = Field(default_factory=list)  # each recipe tried, in order, and what it failed
    calibration_images: int = Field(ge=1)
    top1_agreement: Share
    fp32: PrecisionFigures
    int8: PrecisionFigures
    problems: list[str] = Field(default_factory=list)
    # The CPU and ONNX Runtime the checks ran on (service.verification.cpu()): integer kernels differ between CPUs.
    checked_on: dict | None = None
    saturation_free: bool | None = None  # no 8-bit product pair can overflow a 16-bit lane (see training/quantize.py)


class Metrics(ForwardCompatible):
    validation: Validation
    confusion_matrix: ConfusionMatrix
    calibration: Calibration
    domain: Domain
    baselines: Baselines
    quantization: Quantization | None = None


class ModelMetadata(ForwardCompatible):
    schema_version: Literal[2] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    version: str = Field(pattern=r"^[0-9]+$")
    created_at: str
    labels: list[str] = Field(min_length=1)
    input: InputTensor
    outputs: list[TensorSpec] = Field(min_length=1)
    files: Files
    inspection: Inspection
    architecture: Architecture
    training: dict  # the whole hyperparameter block and how the run went (device, versions, hardware)
    data: dict  # where the images came from and how they were split
    metrics: Metrics
    parity: dict[str, dict]

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        return labels

    @model_validator(mode="after")
    def _outputs_cover_labels(self) -> ModelMetadata:
        probabilities = next((o for o in self.outputs if o.name == contract.PROBABILITIES), None)
        if probabilities is None or probabilities.shape != [-1, len(self.labels)]:
            raise ValueError(f"outputs must include probabilities of shape [-1, {len(self.labels)}]")
        return self

    @classmethod
    def read(cls, path: Path) -> ModelMetadata:
        """Parse ``metadata.json``; a ``MetadataError`` names every bad field."""
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise MetadataError(describe_errors(exc)) from None

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2, exclude_none=False) + "\n")


class MetadataError(ValueError):
    """metadata.json does not follow the schema; the message names the fields."""


def describe_errors(exc: ValidationError, limit: int = 5) -> str:
    problems = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(part) for part in error["loc"]) or "(document)"
        problems.append(f"{where}: {error['msg'].lower()}")
    more = exc.error_count() - limit
    return "metadata.json: " + "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def json_schema() -> dict:
    schema = ModelMetadata.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "convserve model metadata (metadata.json)"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":  # python -m service.metadata [--check]: write (or check) the published JSON Schema
    if "--check" in sys.argv[1:]:
        sys.exit(0 if SCHEMA_FILE.read_text() == schema_text() else 1)
    SCHEMA_FILE.write_text(schema_text())
