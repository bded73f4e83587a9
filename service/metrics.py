"""The Prometheus metrics, created once at import. Few labels: route templates, never raw paths.

With several gunicorn workers, prometheus_client's multiprocess mode aggregates them (the gunicorn config sets
PROMETHEUS_MULTIPROC_DIR before workers start and compacts dead workers' files); service/metrics_files.py makes that
folder safe: a full, read-only or deleted folder never fails a request.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from service import contract, metrics_files
from service.errors import MetricsUnavailable
from service.metrics_files import Histogram
from service.settings import prometheus_folder

metrics_files.install()  # before the first metric is made
log = logging.getLogger("convserve")

PREFIX = "convserve"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

PROTOCOLS = ("http", "grpc")
# gRPC calls count here too: route is the method's path (/inference.GRPCInferenceService/ModelInfer), method POST,
# status the HTTP status its gRPC code stands for (service/grpc_server.py), so the same alerts cover both protocols.
REQUESTS = Counter(f"{PREFIX}_requests_total", "Requests by protocol (http or grpc), route template, method and "
                   "status.", ["route", "method", "status", "protocol"])
REQUEST_LATENCY = Histogram(f"{PREFIX}_request_duration_seconds", "Request latency by route template and protocol.",
                            ["route", "method", "protocol"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge(f"{PREFIX}_requests_in_flight", "Requests being processed now.", multiprocess_mode="livesum")
PREPROCESS_LATENCY = Histogram(f"{PREFIX}_preprocess_duration_seconds",
                               "Decode and preprocessing time per request batch.", ["model", "version"],
                               buckets=LATENCY_BUCKETS)
INFERENCE_LATENCY = Histogram(f"{PREFIX}_inference_duration_seconds", "ONNX Runtime time per batch.",
                              ["model", "version"], buckets=LATENCY_BUCKETS)
# Per model version, what Triton's statistics extension reports (GET /v2/models/{name}/stats, service/statistics.py).
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
MODEL_REQUEST_LATENCY = Histogram(f"{PREFIX}_model_request_duration_seconds", "Inference requests of a model version "
                                  "(classify and /v2 infer, REST and gRPC), queueing to answer, by outcome (success "
                                  "or fail).", ["model", "version", "outcome"], buckets=STAGE_BUCKETS)
STAGE_LATENCY = Histogram(f"{PREFIX}_model_stage_duration_seconds", "Each inference request's time in a stage: queue "
                          "(waiting for a thread), compute_input (decode and preprocess, or reading the tensor), "
                          "compute_infer (the ONNX Runtime call it ran in), compute_output (shaping the answer).",
                          ["model", "version", "stage"], buckets=STAGE_BUCKETS)
IMAGES_ANSWERED = Counter(f"{PREFIX}_model_images_total", "Images answered by a model version.", ["model", "version"])
BATCH_EXECUTIONS = Counter(f"{PREFIX}_model_executions_total", "ONNX Runtime calls of a model version, by the number "
                           "of images in the call.", ["model", "version", "batch_size"])
BATCH_STAGE_SECONDS = Counter(f"{PREFIX}_model_execution_seconds_total", "Seconds spent per stage in the calls of a "
                              "batch size (each call counted once).", ["model", "version", "batch_size", "stage"])
LAST_INFERENCE = Gauge(f"{PREFIX}_model_last_inference_timestamp_seconds", "When a model version last answered "
                       "(Unix time; the live workers' latest).", ["model", "version"], multiprocess_mode="livemax")
BATCH_SIZE = Histogram(f"{PREFIX}_batch_size", "Images per inference call.", ["model", "version"],
                       buckets=BATCH_BUCKETS)
PREDICTIONS = Counter(f"{PREFIX}_predictions_total", "Images classified, by model and predicted label.",
                      ["model", "version", "label"])
MODEL_INFO = Gauge(f"{PREFIX}_model_info", "1 for each model version loaded, with the sha256 and precision of the "
                   "graph that serves.", ["model", "version", "sha256", "precision"], multiprocess_mode="livemax")
MODEL_LOAD_FAILURES = Counter(f"{PREFIX}_model_load_failures_total", "Failed model loads (per worker).",
                              ["model", "version"])
MODEL_LOADED = Gauge(f"{PREFIX}_model_loaded", "1 if the model version loaded in every live worker, else 0.",
                     ["model", "version"], multiprocess_mode="livemin")
READY = Gauge(f"{PREFIX}_ready", "1 when every live worker is ready to serve.", multiprocess_mode="livemin")

QUEUE_DEPTH = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for an inference thread now.",
                    multiprocess_mode="livesum")
INFERENCE_THREADS = Gauge(f"{PREFIX}_inference_threads", "Threads running decode and ONNX Runtime (capacity).",
                          multiprocess_mode="livesum")
QUEUE_WAIT = Histogram(f"{PREFIX}_queue_wait_seconds", "Time a request waited for an inference thread.",
                       buckets=LATENCY_BUCKETS)
SHED = Counter(f"{PREFIX}_shed_total", "Requests refused with 503 overloaded instead of queued, by reason.",
               ["reason"])
for _reason in contract.SHED_REASONS:
    SHED.labels(_reason)  # exported at 0 from the start, so rate() and alerts see the series

MODEL_SERVED = Gauge(f"{PREFIX}_model_served", "1 for the version each model serves now (in every live worker).",
                     ["model", "version"], multiprocess_mode="livemin")
AUTH_FAILURES = Counter(f"{PREFIX}_auth_failures_total", "Requests refused for a missing or unknown API key.",
                        ["reason"])
for _reason in ("missing", "invalid"):
    AUTH_FAILURES.labels(_reason)

# Drift: what the served answers look like, against what validation measured (the model's baselines).
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
CONFIDENCE = Histogram(f"{PREFIX}_confidence", "Calibrated top-1 probability of each image served.",
                       ["model", "version"], buckets=CONFIDENCE_BUCKETS)
DOMAIN_SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DOMAIN_SCORE = Histogram(f"{PREFIX}_domain_score", "domain_score of each image served (higher = more like the "
                         "training images).", ["model", "version"], buckets=DOMAIN_SCORE_BUCKETS)
OUT_OF_DOMAIN = Counter(f"{PREFIX}_out_of_domain_total", "Images answered in_domain=false (none of the labels).",
                        ["model", "version"])
BASELINE = Gauge(f"{PREFIX}_model_baseline", "What validation measured for a model version on in-domain images: "
                 "mean_confidence, out_of_domain_share, mean_domain_score.", ["model", "version", "quantity"],
                 multiprocess_mode="livemax")

VERIFICATION = Gauge(f"{PREFIX}_model_verification_passed", "1 if the graph of this precision passed verification "
                     "on this machine at load (in every live worker), 0 if it was refused.",
                     ["model", "version", "precision"], multiprocess_mode="livemin")
VERIFICATION_SECONDS = Gauge(f"{PREFIX}_model_verification_seconds", "How long verifying the graph took at load "
                             "(the slowest live worker).", ["model", "version", "precision"],
                             multiprocess_mode="livemax")

STORE_ERROR_REASONS = ("unreadable", "changed")
STORE_ERRORS = Counter(f"{PREFIX}_model_store_errors_total", "Model store faults seen by a scan: the store root "
                       "missing, unreadable or suddenly empty (unreadable), or a loaded version's files changed on "
                       "disk (changed). Loaded versions keep serving.", ["reason"])
for _reason in STORE_ERROR_REASONS:
    STORE_ERRORS.labels(_reason)
STORE_OK = Gauge(f"{PREFIX}_model_store_ok", "1 when the last scan of the model store could read it (in every live "
                 "worker), 0 while it cannot.", multiprocess_mode="livemin")
WATCHDOG_TRIPS = Counter(f"{PREFIX}_watchdog_trips_total", "Inferences that outran INFERENCE_WATCHDOG_SECONDS: each "
                         "took its worker out of service to be replaced.")
API_KEY_RELOADS = Counter(f"{PREFIX}_api_key_reloads_total", "Times a changed API_KEYS_FILE was re-read, by result "
                          "(failed: unreadable or no key; the keys before stay in force).", ["result"])
for _result in ("ok", "failed"):
    API_KEY_RELOADS.labels(_result)


# What the HTTP layer times per request, beside the inference stages (service/request_context.py names them all).
REQUEST_STAGES = ("read_body", "encode")


class VersionSeries:
    """A model version's labelled series on the inference path, looked up once: prometheus_client's ``labels()``
    takes a lock and checks the label values on every call, which was most of what recording a request cost."""

    def __init__(self, model: str, version: str):
        self.key = (model, version)
        self.stages = {stage: STAGE_LATENCY.labels(model, version, stage) for stage in (*STAGES, *REQUEST_STAGES)}
        self.outcomes = {outcome: MODEL_REQUEST_LATENCY.labels(model, version, outcome)
                         for outcome in ("success", "fail")}
        self.preprocess = PREPROCESS_LATENCY.labels(model, version)
        self.inference = INFERENCE_LATENCY.labels(model, version)
        self.batch_size = BATCH_SIZE.labels(model, version)
        self.images = IMAGES_ANSWERED.labels(model, version)
        self.last_inference = LAST_INFERENCE.labels(model, version)
        self.confidence = CONFIDENCE.labels(model, version)
        self.domain_score = DOMAIN_SCORE.labels(model, version)
        self.out_of_domain = OUT_OF_DOMAIN.labels(model, version)
        self._predictions: dict[str, object] = {}
        self._executions: dict[int, tuple] = {}

    def prediction(self, label: str):
        child = self._predictions.get(label)
        if child is None:
            child = self._predictions[label] = PREDICTIONS.labels(*self.key, label)
        return child

    def execution(self, images: int) -> tuple:
        """The call counter and the per-stage seconds of ONNX Runtime calls of this batch size."""
        children = self._executions.get(images)
        if children is None:
            size = str(images)
            children = self._executions[images] = (BATCH_EXECUTIONS.labels(*self.key, size), {
                stage: BATCH_STAGE_SECONDS.labels(*self.key, size, stage)
                for stage in ("compute_input", "compute_infer", "compute_output")})
        return children


_version_series: dict[tuple[str, str], VersionSeries] = {}
_request_series: dict[tuple[str, str, int, str], tuple] = {}


def request_series(route: str, method: str, status: int, protocol: str) -> tuple:
    """The request counter and latency histogram of these labels, looked up once (as VersionSeries does): every
    request asks. The labels are a closed set (route templates, the metered methods, the service's statuses)."""
    key = (route, method, status, protocol)
    series = _request_series.get(key)
    if series is None:
        series = _request_series[key] = (REQUESTS.labels(route, method, str(status), protocol),
                                         REQUEST_LATENCY.labels(route, method, protocol))
    return series


def version_series(model: str, version: str) -> VersionSeries:
    """The series of a model version (made on first use; a few per version ever served, so the cache stays small)."""
    series = _version_series.get((model, version))
    if series is None:
        series = _version_series[(model, version)] = VersionSeries(model, version)
    return series


def record_verifications(model: str, version: str, verifications: dict) -> None:
    for precision, check in verifications.items():
        VERIFICATION.labels(model, version, precision).set(1 if check.passed else 0)
        VERIFICATION_SECONDS.labels(model, version, precision).set(check.seconds)


def record_baselines(model: str, version: str, baselines) -> None:
    """At load: what validation measured; the out-of-domain counter starts at 0, so rate() sees its first images."""
    for quantity, value in baselines.model_dump().items():
        BASELINE.labels(model, version, quantity).set(value)
    OUT_OF_DOMAIN.labels(model, version)


def record_answers(model: str, version: str, confidence, domain_score, in_domain) -> None:
    """Per image: its confidence and domain score, and whether it was out of domain."""
    series = version_series(model, version)
    for value in confidence.tolist():
        series.confidence.observe(value)
    for value in domain_score.tolist():
        series.domain_score.observe(value)
    outside = int(len(in_domain) - in_domain.sum())
    if outside:
        series.out_of_domain.inc(outside)


EXPORTED_METRICS = [REQUESTS, REQUEST_LATENCY, IN_FLIGHT, PREPROCESS_LATENCY, INFERENCE_LATENCY, BATCH_SIZE,
                    MODEL_REQUEST_LATENCY, STAGE_LATENCY, IMAGES_ANSWERED, BATCH_EXECUTIONS, BATCH_STAGE_SECONDS,
                    LAST_INFERENCE,
                    PREDICTIONS, MODEL_INFO, MODEL_LOAD_FAILURES, MODEL_LOADED, READY, QUEUE_DEPTH, INFERENCE_THREADS,
                    QUEUE_WAIT, SHED, MODEL_SERVED, AUTH_FAILURES, CONFIDENCE, DOMAIN_SCORE, OUT_OF_DOMAIN, BASELINE,
                    VERIFICATION, VERIFICATION_SECONDS, STORE_ERRORS, STORE_OK, WATCHDOG_TRIPS, API_KEY_RELOADS]

# The mode prometheus_client took at import, from the same variable (the gunicorn config sets it before workers).
MULTIPROCESS_FOLDER = prometheus_folder()


def exposition() -> tuple[bytes, str]:
    """The text exposition: aggregated over workers in multiprocess mode, this process's otherwise. A folder that is
    gone or unreadable answers 503 (Prometheus then shows the target down), never a partial or empty 200."""
    if not MULTIPROCESS_FOLDER:
        from prometheus_client import REGISTRY

        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    if not os.path.isdir(MULTIPROCESS_FOLDER):
        raise MetricsUnavailable("The metrics folder (PROMETHEUS_MULTIPROC_DIR) is gone: this replica's metrics are "
                                 "lost; classification goes on. Restart the pod to get metrics back.")
    try:
        return metrics_files.collect(MULTIPROCESS_FOLDER), CONTENT_TYPE_LATEST
    except (OSError, RuntimeError, ValueError) as error:  # a file that cannot be read or is corrupt
        log.error("metrics: reading the metrics folder failed: %s: %s", type(error).__name__, error)
        raise MetricsUnavailable("The metrics folder (PROMETHEUS_MULTIPROC_DIR) could not be read; the server log "
                                 "has the details.") from None
