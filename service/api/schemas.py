"""The HTTP request and response bodies as types, from which the answers are encoded and the OpenAPI is generated.

The views build their answers through these models (a response that does not fit its model is a server bug, answered
500 and logged, never sent), and GET /openapi.json is generated from them (service/api/openapi.py).

Adding a field to a response is one line in its model. Every model forbids fields it does not declare, so the
document says exactly what is sent: a view that sends more fails its own tests.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from service import contract
from service import metadata as stored
from service.oip import FP32_LIMIT


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, defer_build=True)


class RequestBody(BaseModel):
    """Requests may carry fields the server does not read: they are ignored."""

    model_config = ConfigDict(extra="allow", defer_build=True)


Probability = Annotated[float, Field(ge=0, le=1)]
Precision = Annotated[contract.Precision, Field(
    description="The graph that classifies: the INT8 quantized one, or FP32 (PRECISION, and what the version has).")]
PngDataUrl = Annotated[str, Field(pattern=r"^data:image/png;base64,", description="A PNG as a data: URL.",
                                  json_schema_extra={"contentMediaType": "image/png"})]
Range = Annotated[tuple[float, float], Field(description="[low, high]")]
Dims = list[Annotated[int, Field(ge=0)]]


# errors -----------------------------------------------------------------------------------------------------------
class ErrorDetail(Body):
    code: str = Field(description="Stable machine-readable code; match on this, not on the message.")
    message: str = Field(description="What went wrong and what to change.")


class Error(Body):
    """The error body of every route outside /v2."""

    error: ErrorDetail


class V2Error(Body):
    """The Open Inference Protocol's error body, on every /v2 route: no code; the status says the class of error."""

    error: str


# health -----------------------------------------------------------------------------------------------------------
class Liveness(Body):
    status: Literal["alive"]


class Unhealthy(Body):
    status: Literal["unhealthy"]
    reason: str = Field(description="Why this worker is out of service (an inference outran "
                                    "INFERENCE_WATCHDOG_SECONDS); it exits and is replaced.")


class Readiness(Body):
    status: Literal["ready"]


class NotReadyStatus(Body):
    status: Literal["not ready"]
    reason: str = Field(description="Models are loading, none could be loaded, the default one is not served, the "
                                    "worker is unhealthy, or the server is shutting down.")


# /v1 classify -----------------------------------------------------------------------------------------------------
class LabelScore(Body):
    label: str = Field(examples=["cat"])
    confidence: Probability


class Prediction(Body):
    """The classification of one image."""

    label: str = Field(description="The most probable label.", examples=["cat"])
    confidence: Probability = Field(description="Probability of `label`.")
    probabilities: dict[str, Probability] = Field(
        description="Every label's probability, in the model's label order; they sum to 1.")
    top_k: list[LabelScore] = Field(None, min_length=1, description=(
        "Only with the `top_k` query parameter: the k most probable labels, most probable first."))
    in_domain: bool = Field(description="False when the image looks like none of the labels (\"none of these\"): "
                                        "its domain_score is below the threshold set at export, which flags at most "
                                        "5 % of the labels' own validation images.")
    domain_score: Probability = Field(description="How much the image looks like the training images, 0 to 1 "
                                                  "(higher = more alike).")


class ClassifyResponse(Body):
    model: str = Field(description="The model that answered.", examples=["lenet"])
    version: str = Field(description="Its version.", examples=["1"])
    precision: Precision
    predictions: list[Prediction] = Field(description="One per image, in request order.")


class ImagesRequest(RequestBody):
    """The JSON form of an image request."""

    images: list[Annotated[str, Field(json_schema_extra={"format": "image-base64"})]] = Field(
        min_length=1, description="Each one image: base64 (standard, or URL-safe with optional padding) or a "
                                  "`data:image/...;base64,` URL.")


# /v1 inspect and filters ------------------------------------------------------------------------------------------
class FeatureGrid(Body):
    """Tiles (one per channel or filter) laid out row-major in `rows` × `columns`, in one PNG, scaled from one
    shared value range."""

    png: PngDataUrl
    range: Range = Field(description="The values grey levels 0 and 255 stand for.")
    rows: int = Field(ge=1)
    columns: int = Field(ge=1)
    tile: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] = Field(
        description="[height, width] of one tile in pixels.")
    gap: int = Field(ge=0, description="Pixels between tiles.")


class InputPicture(Body):
    shape: Dims = Field(min_length=3, max_length=3, description="[3, H, W] of the tensor the network got.")
    png: PngDataUrl = Field(description="The preprocessed input with normalisation undone: what the network saw.")
    range: Range = Field(description="[min, max] of the normalised input.")


class StageBase(Body):
    name: str = Field(description="The stage (graph output) name.", examples=["conv1"])
    kind: str = Field(description="conv, relu, add (a residual shortcut), pool, fc, softmax.", examples=["conv"])
    shape: Dims = Field(description="Shape of the stage's output for this image, batch axis dropped.")


class MapStage(StageBase):
    """A (C, H, W) stage: its feature maps, tiled."""

    maps: FeatureGrid


class VectorStage(StageBase):
    """Any other stage: its values."""

    values: list[float]


class Cam(Body):
    """A class activation map (models with a global-pooling head)."""

    label: str = Field(description="The class it is for: `class` if given, else the predicted label.")
    stage: str | None = Field(description="The stage it is computed from.")
    png: PngDataUrl = Field(description="The heat map blended over the input, 128×128.")
    heatmap_png: PngDataUrl = Field(description="The heat map alone, 128×128.")
    range: Range = Field(description="[min, max] of the raw map.")
    shape: tuple[int, int] = Field(description="[h, w] of the raw map.")


class InspectResponse(Body):
    """What the network sees for one image: its input, every stage, and the class activation map if it has one."""

    model: str = Field(examples=["lenet"])
    version: str = Field(examples=["1"])
    prediction: Prediction
    input: InputPicture
    stages: list[MapStage | VectorStage] = Field(description="Every stage, input to output.")
    cam: Cam | None = Field(description="null when the model has none (lenet).")


class FiltersResponse(Body):
    """The first convolution's learned filters."""

    model: str
    version: str
    stage: str | None = Field(description="The first convolution's stage name.", examples=["conv1"])
    shape: Dims = Field(min_length=4, max_length=4, description="[out, in, kh, kw] of the weights.")
    filters: FeatureGrid


# /v1 models -------------------------------------------------------------------------------------------------------
class VersionMetrics(Body):
    validation_accuracy: float | None
    validation_count: int | None
    per_class: dict[str, dict[str, Any]] | None = Field(description="label → {accuracy, precision, support}.")
    calibration: stored.Calibration = Field(description="The temperature baked into the graph, and validation "
                                                        "accuracy, ECE and log-loss before and after it.")
    domain: stored.Domain = Field(description="The \"none of these\" rule and how it did on held-out images.")
    baselines: stored.Baselines = Field(description="What validation measured, for drift alerts.")
    quantization: stored.Quantization | None = Field(description="INT8 against FP32 on validation.")


class TrainedStretch(Body):
    device: str = Field(examples=["cuda"])
    hardware: str = Field(examples=["NVIDIA H200"])
    first_epoch: int
    last_epoch: int


class TrainingSummary(Body):
    preset: str | None
    wall_time_s: float | None
    device: str | None
    trained_on: list[TrainedStretch] | None = Field(
        None, description="Where each stretch of epochs ran (absent for versions that predate the record)")


class VerificationFigures(Body):
    accuracy: float
    top1_agreement: float = Field(description="Share of the set on which the graph's top-1 is the FP32 reference's.")
    in_domain_agreement: float = Field(description="Share on which in_domain equals the FP32 reference's.")
    own_flagged: float = Field(description="Share of the labels' own images answered in_domain=false.")
    max_probability_difference: float = Field(description="Largest difference from an FP32 reference probability.")


class GraphVerification(Body):
    passed: bool
    images: int = Field(description="Images of the verification set run (VERIFY_IMAGES).")
    measured: VerificationFigures = Field(description="On this machine, now.")
    exported: VerificationFigures = Field(description="The same figures from the answers export recorded.")
    problems: list[str] = Field(description="Why the graph was refused (empty when it passed).")
    seconds: float


class Machine(Body):
    processor: str
    machine: str
    features: dict[str, bool] | None = Field(description="Instruction-set features that decide ONNX Runtime's "
                                                         "kernels (null when unknown).")
    onnxruntime: str


class VersionVerification(Body):
    """Each graph this worker checked at load, and the machine it ran on."""

    on: Machine
    graphs: dict[str, GraphVerification] = Field(description="precision → its check.")


class LoadedVersion(Body):
    version: str = Field(examples=["1"])
    state: Literal["ready", "loading"]
    precision: Precision
    precision_reason: str | None = Field(description="Why FP32 serves although INT8 was wanted (the INT8 graph "
                                                     "failed verification here); null otherwise.")
    verification: VersionVerification | None = Field(description="null when the version has no verification set.")
    sha256: str | None = Field(description="SHA-256 of the classify graph that serves.")
    created_at: str | None
    labels: list[str]
    parameters: int | None = Field(description="Number of trained parameters.")
    metrics: VersionMetrics
    training: TrainingSummary


class FailedVersion(Body):
    version: str
    state: Literal["failed"]
    error: str = Field(description="Why it failed to load.")


class VersionDescription(RootModel[LoadedVersion | FailedVersion]):
    """One version: its metadata when loaded, or why it failed to load."""


class ModelInput(Body):
    name: str
    dtype: str
    shape: list[int]
    preprocessing: dict[str, Any] = Field(description="The exact steps the service applies to an image.")


class ModelOutput(Body):
    name: str
    dtype: str
    shape: list[int]


class InspectionStage(Body):
    name: str
    kind: str
    shape: list[int]


class InspectionDescription(Body):
    """What /inspect shows: every stage in order, and whether class activation maps are available."""

    stages: list[InspectionStage]
    class_activation_maps: bool


class ModelDescription(Body):
    """A model and all its versions. The fields after `versions` describe the version that serves, and are there
    only when one is loaded."""

    name: str = Field(examples=["lenet"])
    default_version: str | None = Field(description="The version that serves requests naming none; null when none "
                                                    "is loaded.")
    versions: list[VersionDescription] = Field(description="Every version in the store, in version order.")
    precision: Precision = Field(None)
    precision_reason: str | None = Field(None, description="Why FP32 serves although INT8 was wanted.")
    verification: VersionVerification | None = Field(None, description="The served version's checks on this "
                                                                       "machine.")
    labels: list[str] = Field(None)
    input: ModelInput = Field(None)
    outputs: list[ModelOutput] = Field(None)
    architecture: dict[str, Any] | None = Field(None, description="name, parameters, description, ...")
    inspection: InspectionDescription = Field(None)


class ModelList(Body):
    default_model: str = Field(description="The model /v1/classify and /v1/inspect use (DEFAULT_MODEL).")
    models: list[ModelDescription]


# /v2: the Open Inference Protocol -----------------------------------------------------------------------------------
Datatype = Literal["FP32", "BYTES", "BOOL"]
OutputName = contract.OutputName


class ServerMetadata(Body):
    name: str
    version: str
    extensions: list[str]


class ServerLive(Body):
    live: bool


class ServerReady(Body):
    ready: bool


class ModelReady(Body):
    name: str
    ready: bool


class TensorMetadata(Body):
    name: str
    datatype: Datatype
    shape: list[Annotated[int, Field(ge=-1)]] = Field(description="-1 is a variable dimension (the batch).")


class ModelMetadataResponseParameters(Body):
    labels: list[str] = Field(description="The label of each column of `probabilities`.")
    alternative_input: TensorMetadata = Field(description="The other input: BYTES [-1], one encoded image each.")
    precision: Precision
    precision_reason: str | None = Field(description="Why FP32 serves although INT8 was wanted; null otherwise.")
    verification: VersionVerification | None = Field(description="The graph's checks on this machine.")


class ModelMetadataResponse(Body):
    name: str
    versions: list[str] = Field(description="The loaded versions.")
    platform: Literal["onnxruntime_onnx"]
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: ModelMetadataResponseParameters


ConfigType = Literal["TYPE_FP32", "TYPE_STRING", "TYPE_BOOL"]
ConfigDims = list[Annotated[int, Field(ge=-1)]]


class ModelConfigInput(Body):
    name: str
    data_type: ConfigType
    dims: ConfigDims = Field(description="The whole shape, -1 for the batch (max_batch_size is 0).")
    optional: Literal[True] = Field(description="A request sends one of the two inputs.")


class ModelConfigOutput(Body):
    name: OutputName
    data_type: ConfigType
    dims: ConfigDims


class ModelConfigResponse(Body):
    """Triton's model configuration (its model_config.proto as JSON), the fields perf_analyzer reads."""

    name: str
    platform: Literal["onnxruntime_onnx"]
    backend: Literal["onnxruntime"]
    max_batch_size: Literal[0] = Field(description="0: shapes carry their own batch dimension, -1; requests waiting "
                                                   "together are still batched into one ONNX Runtime call.")
    input: list[ModelConfigInput]
    output: list[ModelConfigOutput]


class OutputParameters(Body):
    binary_data_size: int = Field(ge=0, description="Bytes of this output in the binary part.")


class InferenceOutput(Body):
    """Exactly one of `data` (JSON) and `parameters` (the binary extension) is present."""

    name: OutputName
    datatype: Datatype = Field(description="BYTES when the classification extension was asked for.")
    shape: Dims
    data: list[float] | list[bool] | list[str] = Field(None, description="The values, flat, row-major; with "
                                                                         "classification, \"score:index:label\" "
                                                                         "strings, [N, k].")
    parameters: OutputParameters = Field(None)


class InferenceResponse(Body):
    model_name: str
    model_version: str
    id: str = Field(None, description="The request's `id`, when it had one.")
    outputs: list[InferenceOutput] = Field(min_length=1)


# The /v2 request, as documentation: the server reads it with the checks in service/oip.py, which name what is
# wrong in the protocol's own terms; tests/test_fuzz.py holds the two to the same strictness.
Float32 = Annotated[float, Field(ge=-FP32_LIMIT, le=FP32_LIMIT)]


class Fp32Input(RequestBody):
    """N images, preprocessed exactly as the model's metadata says (GET /v1/models/{name}, `input`)."""

    model_config = ConfigDict(title="FP32 input")
    name: Literal[contract.INPUT] = Field(description="The model's input name.")
    datatype: Literal["FP32"]
    shape: list[int] = Field(description="[N, 3, H, W] with the model's H and W.")
    data: list[Float32] = Field(min_length=1, description="N·3·H·W numbers, row-major (flat, or nested as the "
                                                          "shape says).")
    parameters: dict[str, Any] | None = None


class BytesInput(RequestBody):
    """N encoded images (JPEG, PNG, ...), which the service decodes and preprocesses itself."""

    model_config = ConfigDict(title="BYTES input")
    name: Literal["image"]
    datatype: Literal["BYTES"]
    shape: list[int] = Field(description="[N]")
    data: list[Annotated[str, Field(json_schema_extra={"format": "image-base64"})]] = Field(
        description="N base64 strings (or data: URLs), one encoded image each.")
    parameters: dict[str, Any] | None = None


class RequestedOutputParameters(BaseModel):
    binary_data: bool = Field(None, description="Send this output in the binary part of the response.")
    classification: int = Field(None, ge=1, description="The classification extension (probabilities only): the "
                                "top k labels per image as BYTES \"score:index:label\" strings, highest first.")


class RequestedOutput(RequestBody):
    name: OutputName
    parameters: RequestedOutputParameters | None = None


class InferenceParameters(BaseModel):
    binary_data_output: bool = Field(None, description="Send every output in the binary part of the response.")


class InferenceRequest(RequestBody):
    """An inference request with exactly one input tensor."""

    id: str = Field(None, description="Echoed in the response.")
    inputs: list[Fp32Input | BytesInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = Field(None, description="Default: every output, as JSON.")
    parameters: InferenceParameters | None = None


# /v2 extensions: statistics and the model repository (Triton's shapes) ----------------------------------------------
class Duration(Body):
    count: int = Field(ge=0)
    ns: int = Field(ge=0, description="Cumulative nanoseconds.")


class InferStatistics(Body):
    success: Duration = Field(description="Requests answered, queueing to answer.")
    fail: Duration = Field(description="Requests that failed after reaching the model (shed while queued included).")
    queue: Duration = Field(description="Waiting for an inference thread.")
    compute_input: Duration = Field(description="Decode and preprocess, or reading the input tensor.")
    compute_infer: Duration = Field(description="The ONNX Runtime call each request ran in.")
    compute_output: Duration = Field(description="Shaping the answer.")
    cache_hit: Duration = Field(description="Always 0: there is no response cache.")
    cache_miss: Duration = Field(description="Always 0.")


class BatchStatistics(Body):
    batch_size: int = Field(ge=1, description="Images in one ONNX Runtime call.")
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class ModelStatistics(Body):
    name: str
    version: str
    last_inference: int = Field(ge=0, description="Milliseconds since the epoch; 0 if it never answered.")
    inference_count: int = Field(ge=0, description="Images answered.")
    execution_count: int = Field(ge=0, description="ONNX Runtime calls (batching makes them fewer than requests).")
    inference_stats: InferStatistics
    batch_stats: list[BatchStatistics]


class ModelStatisticsList(Body):
    """Statistics of every worker together, as Triton's statistics extension gives them."""

    model_stats: list[ModelStatistics]


class RepositoryIndexRequest(RequestBody):
    ready: bool = Field(None, description="true: only what is ready now.")


class RepositoryModel(Body):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNAVAILABLE"]
    reason: str = Field(description="Why, when not READY (empty when READY).")


class RepositoryIndex(RootModel[list[RepositoryModel]]):
    """Every model and version in the store, with its state in this server."""


class RepositoryAnswer(Body):
    """An empty object: the change took effect in every worker."""
