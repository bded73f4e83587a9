"""Typed errors that carry their HTTP status and a stable machine-readable code.

Raised anywhere below the views; mapped once to a JSON body in ``service.api``.
"""

from __future__ import annotations

# Codes for HTTP errors raised by the framework or the server itself, not by the service's own code.
HTTP_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                     405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large", 414: "uri_too_long",
                     415: "unsupported_media_type", 417: "expectation_failed", 431: "header_fields_too_large",
                     500: "internal", 501: "not_implemented"}


class ServiceError(Exception):
    """Base class: ``status`` is the HTTP status, ``code`` the stable error code clients can match on."""

    status = 500
    code = "internal"
    retry_after: int | None = None  # seconds, sent as Retry-After: every 503 has one

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class InvalidImage(BadRequest):
    code = "invalid_image"


class InvalidBase64(BadRequest):
    code = "invalid_base64"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class EmptyBody(BadRequest):
    code = "empty_body"


class InvalidParameter(BadRequest):
    code = "invalid_parameter"


class InvalidTensor(BadRequest):
    code = "invalid_tensor"


class Unauthorized(ServiceError):
    """No API key, or an unknown one (API_KEYS / API_KEYS_FILE)."""

    status = 401
    code = "unauthorized"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class VersionNotFound(NotFound):
    code = "version_not_found"


class ModelUnloaded(NotFound):
    """A repository API call unloaded the model; a load call serves it again."""

    code = "model_unloaded"


class RepositoryUnavailable(ServiceError):
    """A repository API call could not reach every worker (the shared control folder, a worker that does not
    answer)."""

    status = 503
    code = "repository_unavailable"
    retry_after = 5


class ModelLoadFailed(ServiceError):
    """A repository load call found the model in the store, but some worker could not serve it."""

    status = 400
    code = "model_load_failed"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class TooManyImages(PayloadTooLarge):
    code = "too_many_images"


class ImageTooLarge(PayloadTooLarge):
    code = "image_too_large"


class DecodeBudgetExceeded(PayloadTooLarge):
    """The request's images would take more memory to decode than DECODE_BUDGET_BYTES."""

    code = "decode_budget_exceeded"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class NotReady(ServiceError):
    status = 503
    code = "not_ready"
    retry_after = 1


class ModelUnavailable(NotReady):
    """The model exists in the store but failed to load."""

    code = "model_unavailable"


class RequestTimeout(ServiceError):
    """The client did not finish sending its request body within BODY_TIMEOUT."""

    status = 408
    code = "request_timeout"


class StoreUnavailable(NotReady):
    """The model store cannot be read right now (moved, unmounted, unreadable): what it holds is unknown, so a model
    not loaded here is not said to be missing."""

    code = "store_unavailable"


class MetricsUnavailable(NotReady):
    """GET /metrics only: the multiprocess metrics folder is gone or unreadable."""

    code = "metrics_unavailable"


class WorkerUnhealthy(ServiceError):
    """An inference outran INFERENCE_WATCHDOG_SECONDS: this worker is being replaced; another one will answer."""

    status = 503
    code = "worker_unhealthy"
    retry_after = 1

    def __init__(self, message: str = "This worker is out of service: an inference in it got stuck, and it is being "
                 "replaced. Retry after the time in the Retry-After header; another worker or replica will answer."):
        super().__init__(message)


# The WSGI environ key through which a shed request asks the worker (service/worker.py) to pause before reading the
# connection's next request: SHED_BACKOFF seconds.
BACKOFF_ENVIRON_KEY = "convserve.backoff"


class Overloaded(ServiceError):
    """More work waits than can start within QUEUE_TIMEOUT: shed now, retryably, rather than time out later."""

    status = 503
    code = "overloaded"

    retry_after = 1

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
