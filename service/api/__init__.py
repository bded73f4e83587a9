"""HTTP layer: blueprints, the one mapping from errors to JSON bodies, request metrics and CORS."""

from __future__ import annotations

import logging
import time

from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from service import metrics
from service.errors import ServiceError
from service.settings import Settings

log = logging.getLogger("convserve")

# Probes and scrapes stay out of the request metrics.
UNMETERED_ROUTES = {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
              415: "unsupported_media_type"}


def state():
    return current_app.extensions["convserve"]


def register_api(app: Flask, settings: Settings) -> None:
    from service.api import docs, health, v1, v2

    for blueprint in (health.blueprint, v1.blueprint, v2.blueprint, docs.blueprint):
        app.register_blueprint(blueprint)
    app.register_error_handler(ServiceError, _service_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_start_timer)
    app.after_request(_record_request)
    app.teardown_request(_leave)
    if settings.cors_origins:
        from flask_cors import CORS

        origins = "*" if settings.cors_origins == ["*"] else settings.cors_origins
        CORS(app, origins=origins, expose_headers=["Inference-Header-Content-Length"])


def error_response(status: int, code: str, message: str):
    if request.path.startswith("/v2"):
        body = {"error": message}  # the Open Inference Protocol's error shape
    else:
        body = {"error": {"code": code, "message": message}}
    response = jsonify(body)
    response.status_code = status
    return response


def _service_error(error: ServiceError):
    log.info("%s %s → %d %s: %s", request.method, request.path, error.status, error.code, error.message)
    return error_response(error.status, error.code, error.message)


def _http_error(error: HTTPException):
    status = error.code or 500
    code = HTTP_CODES.get(status, "http_error")
    if status == 404:
        message = f"No route {request.path}. See GET /openapi.json for the API."
    elif status == 405:
        allowed = ", ".join(sorted(error.valid_methods or [])) if hasattr(error, "valid_methods") else ""
        message = f"{request.method} is not allowed on {request.path}" + (f"; use {allowed}." if allowed else ".")
    elif status == 413:
        message = (f"The request body is larger than the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes "
                   "(MAX_UPLOAD_BYTES). Send fewer or smaller images.")
    else:
        message = error.description or error.name
    response = error_response(status, code, message)
    if status == 405 and getattr(error, "valid_methods", None):
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def _unexpected_error(error: Exception):
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal", "Internal error; the server log has the details.")


def _route() -> str:
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def _start_timer() -> None:
    g.started = time.perf_counter()
    if _route() not in UNMETERED_ROUTES:
        metrics.IN_FLIGHT.inc()
        g.metered = True


def _record_request(response):
    route = _route()
    if route not in UNMETERED_ROUTES:
        metrics.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        metrics.REQUEST_LATENCY.labels(route, request.method).observe(time.perf_counter() - g.started)
    return response


def _leave(exc) -> None:
    if g.pop("metered", False):
        metrics.IN_FLIGHT.dec()
