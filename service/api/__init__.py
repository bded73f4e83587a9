"""The HTTP layer around the views: errors as JSON, admission and the body read, request metrics and access lines.

Blueprints, the one mapping from errors to JSON bodies, CORS, the request body (admitted, read within BODY_TIMEOUT
and MAX_UPLOAD_BYTES, before any view runs), and each request's ID, stage timings (``Server-Timing``) and access line
(service/request_context.py)."""

from __future__ import annotations

import io
import logging
import time
from contextlib import contextmanager

from flask import Flask, Response, current_app, g, request
from flask.json.provider import DefaultJSONProvider
from pydantic import BaseModel
from werkzeug.exceptions import HTTPException

from service import contract, logs, metrics, request_context
from service.api import schemas
from service.errors import (
    BACKOFF_ENVIRON_KEY,
    HTTP_STATUS_CODES,
    BadRequest,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
)
from service.inference_queue import gevent_active
from service.inputs import BODY_ENVIRON_KEY
from service.logs import ACCESS_LOGGER
from service.request_context import REQUEST_ID_HEADER
from service.settings import Settings

log = logging.getLogger("convserve")
access_log = logging.getLogger(ACCESS_LOGGER)

QUEUED_ENDPOINTS = "convserve.queued_endpoints"  # app.extensions key: views declared queued=True (openapi.documented)
BODY_DISCARD_CHUNK = 256 * 1024
# Per request, in its WSGI environ (the Flask hooks and the hot route share them): bytes of BODY_BUFFER_BYTES held
# for its body, and whether its body is still unread (a 408 or 413 then closes the connection).
HELD_BYTES_KEY, BODY_UNREAD_KEY = "convserve.held_bytes", "convserve.body_unread"
NOSNIFF = ("X-Content-Type-Options", "nosniff")
INTERNAL_MESSAGE = "Internal error; the server log has the details."
# Probes and scrapes stay out of the request metrics.
UNMETERED_ROUTES = {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
METERED_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})


class StrictJSONProvider(DefaultJSONProvider):
    """Responses are strict JSON: NaN or Infinity would be a server bug, never sent as invalid JSON."""

    def dumps(self, obj, **kwargs):
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


def state():
    return current_app.extensions["convserve"]


def register_api(app: Flask, settings: Settings) -> None:
    from service.api import docs, health, v1, v2

    for blueprint in (health.blueprint, v1.blueprint, v2.blueprint, docs.blueprint):
        app.register_blueprint(blueprint)
    # Requests to these views queue for an inference thread: when that queue is full they are shed before their body
    # is read (decide before you spend).
    app.extensions[QUEUED_ENDPOINTS] = frozenset(
        endpoint for endpoint, view in app.view_functions.items() if getattr(view, "openapi", None) is not None
        and view.openapi.queued)
    app.register_error_handler(ServiceError, _service_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_start_timer)
    app.before_request(_authorize)
    app.before_request(_admit_and_read_body)
    app.after_request(_record_request)  # after_request functions run last-registered first: this one runs last
    app.teardown_request(_leave)
    app.after_request(_security_headers)
    if settings.cors_origins:
        from flask_cors import CORS

        if settings.cors_origins == ["*"]:  # a literal *, never the request's Origin reflected (not even "null")
            CORS(app, origins="*", send_wildcard=True, expose_headers=["Inference-Header-Content-Length"])
        else:
            CORS(app, origins=settings.cors_origins, vary_header=True,
                 expose_headers=["Inference-Header-Content-Length"])
            app.after_request(_vary_on_origin)
    else:  # with CORS, Flask serves every request: its extension writes the CORS headers
        from service.api.hot import HotRoute

        app.wsgi_app = HotRoute(app, app.wsgi_app)


def reply(model: type[BaseModel], body, status: int = 200) -> Response:
    """A JSON answer built through its model (service/api/schemas.py): a body that does not fit is a server bug,
    answered 500 and logged, never sent. Fields the view did not set are left out."""
    return Response(encoded(model, body), status=status, mimetype="application/json")


def encoded(model: type[BaseModel], body) -> bytes:
    """The JSON of an answer, timed as the request's ``encode`` stage."""
    began = time.perf_counter()
    document = model.model_validate(body).model_dump_json(exclude_unset=True).encode()
    if (context := request_context.current()) is not None:
        context.add("encode", time.perf_counter() - began, began)
    return document


def error_document(path: str, code: str, message: str) -> bytes:
    if path.startswith("/v2"):
        return encoded(schemas.V2Error, {"error": message})  # the Open Inference Protocol's error shape
    return encoded(schemas.Error, {"error": {"code": code, "message": message}})


def error_response(status: int, code: str, message: str):
    return Response(error_document(request.path, code, message), status=status, mimetype="application/json")


def error_headers(error: ServiceError, method: str, path: str, environ: dict, settings: Settings) -> list:
    """Logs a typed error's answer and gives the headers it carries beyond its body; a shed request's reason goes
    to its context and its back-off to the worker (service/worker.py)."""
    log.info("%s %s → %d %s: %s", method, path, error.status, error.code, error.message)
    headers = []
    if isinstance(error, Unauthorized):
        headers.append(("WWW-Authenticate", 'Bearer realm="convserve"'))
    if error.retry_after is not None:
        headers.append(("Retry-After", str(error.retry_after)))
    if isinstance(error, Overloaded):
        if (context := request_context.current()) is not None:
            context.shed_reason = error.reason
        if error.reason == contract.QUEUE_FULL:
            environ[BACKOFF_ENVIRON_KEY] = settings.SHED_BACKOFF
    if isinstance(error, (RequestTimeout, PayloadTooLarge)) and environ.get(BODY_UNREAD_KEY):
        headers.append(("Connection", "close"))  # the rest of the body is still on its way: don't read it
    return headers


def _service_error(error: ServiceError):
    response = error_response(error.status, error.code, error.message)
    for name, value in error_headers(error, request.method, request.path, request.environ, state().settings):
        response.headers[name] = value
    return response


def _authorize() -> None:
    """API keys, when configured: checked before anything is read or queued."""
    state().api_keys.check(request.method, request.path, request.headers)


def _admit_and_read_body() -> None:
    if request.method != "POST" or request.url_rule is None:
        return
    queued = request.endpoint in current_app.extensions[QUEUED_ENDPOINTS]
    body = admit_and_read_body(state(), request.environ, request.content_length, queued, g.context)
    request.environ.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)), BODY_ENVIRON_KEY: body})
    request.environ.pop("HTTP_TRANSFER_ENCODING", None)


def admit_and_read_body(app_state, environ: dict, content_length: int | None, queued: bool,
                        context: request_context.RequestContext) -> bytes:
    """Read the whole body before any view runs, bounded in size (MAX_UPLOAD_BYTES, whatever the transfer
    encoding), time (BODY_TIMEOUT) and memory (BODY_BUFFER_BYTES for all the bodies a worker holds), so a view never
    waits on a client. A request that cannot be taken (``queued`` for inference and the queue full, or bodies
    would take too much memory) is refused before anything but that read; its body is read and dropped in large
    pieces, so the connection stays usable (left to the server, it would be drained a kilobyte at a time). The
    bytes held are released by ``release_body``."""
    settings = app_state.settings
    limit = settings.MAX_UPLOAD_BYTES
    environ[BODY_UNREAD_KEY] = True
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(_too_large_message(limit))
    try:
        if queued:
            app_state.pipeline.queue.admit()
        environ[HELD_BYTES_KEY] = app_state.pipeline.queue.hold_bytes(content_length or limit)
    except Overloaded:
        _read_body(environ, limit, settings.BODY_TIMEOUT, keep=False)
        raise
    began = time.perf_counter()
    body = _read_body(environ, limit, settings.BODY_TIMEOUT, keep=True)
    context.add("read_body", time.perf_counter() - began, began)
    return body


def release_body(app_state, environ: dict) -> None:
    environ.pop(BODY_ENVIRON_KEY, None)
    if held := environ.pop(HELD_BYTES_KEY, 0):
        app_state.pipeline.queue.release_bytes(held)


def _read_body(environ: dict, limit: int, timeout: float, keep: bool) -> bytes:
    stream, kept, size = environ["wsgi.input"], [], 0
    with _deadline(timeout):
        try:
            while chunk := stream.read(limit + 1 if keep else BODY_DISCARD_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(_too_large_message(limit))
                if keep:
                    kept.append(chunk)
        except ServiceError:
            raise
        except Exception as exc:  # the server's own body reader: broken chunked encoding, client gone
            # (gevent.Timeout is a BaseException: it passes through to _deadline)
            raise BadRequest(f"The request body could not be read ({type(exc).__name__}): check its "
                             "Content-Length or chunked encoding.") from exc
    environ[BODY_UNREAD_KEY] = False
    return b"".join(kept)


@contextmanager
def _deadline(seconds: float):
    """Under gevent, a RequestTimeout (408) once ``seconds`` have passed; elsewhere (sync worker) no deadline."""
    if not gevent_active():
        yield
        return
    import gevent

    timer = gevent.Timeout(seconds)
    timer.start()
    try:
        yield
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise RequestTimeout(f"The request body did not arrive within BODY_TIMEOUT={seconds:g} s. Send the whole "
                             "body at once, or split large batches.") from None
    finally:
        timer.close()


def _too_large_message(limit: int) -> str:
    return (f"The request body is larger than the limit of {limit} bytes (MAX_UPLOAD_BYTES). "
            "Send fewer or smaller images.")


def _http_error(error: HTTPException):
    status = error.code or 500
    code = HTTP_STATUS_CODES.get(status, "http_error")
    if status == 404:
        message = f"No route {request.path}. See GET /openapi.json for the API."
    elif status == 405:
        allowed = ", ".join(sorted(error.valid_methods or [])) if hasattr(error, "valid_methods") else ""
        message = f"{request.method} is not allowed on {request.path}" + (f"; use {allowed}." if allowed else ".")
    elif status == 413:
        message = _too_large_message(current_app.config["MAX_CONTENT_LENGTH"])
    else:
        message = error.description or error.name
    response = error_response(status, code, message)
    if status == 405 and getattr(error, "valid_methods", None):
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def _unexpected_error(error: Exception):
    log.exception("unhandled error on %s %s", request.method, request.path)
    return error_response(500, "internal", INTERNAL_MESSAGE)


def _route() -> str:
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def _start_timer() -> None:
    g.context = request_context.begin(request.headers.get(REQUEST_ID_HEADER))
    if _route() not in UNMETERED_ROUTES:
        metrics.IN_FLIGHT.inc()
        g.metered = True


def _record_request(response):
    headers = finish_request(state(), g.context, request.method, _route(), request.path, response.status_code,
                             response.content_length, request.remote_addr, request.headers)
    for name, value in headers:
        response.headers[name] = value
    return response


def finish_request(app_state, context: request_context.RequestContext, method: str, route: str, path: str,
                   status: int, size: int | None, remote: str | None, request_headers) -> list:
    """Every answer gets the request's ID and its Server-Timing (the headers returned); then its metrics, its span
    and its access line."""
    total = context.elapsed()
    metered = route not in UNMETERED_ROUTES
    if metered:
        label = method if method in METERED_METHODS else "other"  # a closed set: clients cannot grow the metrics
        count, latency = metrics.request_series(route, label, status, "http")
        count.inc()
        latency.observe(total)
        if context.model is not None:
            stages = metrics.version_series(context.model, context.version).stages
            for stage in metrics.REQUEST_STAGES:
                if stage in context.stages:
                    stages[stage].observe(context.stages[stage])
    tracing = app_state.tracing
    if tracing.enabled and metered:  # probes and scrapes would drown the traces
        tracing.record(context, request_headers, f"{method[:16]} {route}", {
            "http.request.method": method[:16], "http.route": route, "url.path": path[:200],
            "http.response.status_code": status}, status >= 500, time.perf_counter())
    if access_log.isEnabledFor(logging.INFO):
        _log_access(context, remote, method, path, status, size, total)
    return [(REQUEST_ID_HEADER, context.id), ("Server-Timing", context.server_timing(total))]


def _spaced(words: str) -> str:
    return f" {words}" if words else ""


def _log_access(context: request_context.RequestContext, remote: str | None, method: str, path: str, status: int,
                size: int | None, total: float) -> None:
    path = path if len(path) <= 200 and path.isprintable() else ascii(path[:200])
    extra = {"request_id": context.id}
    if logs.structured():
        extra.update(protocol="http", method=method[:16], path=path, status=status, bytes=size,
                     total_ms=round(total * 1000, 3), remote=remote, **context.fields())
    access_log.info("%s %s %s %d %sB %.2fms%s", remote, method[:16], path, status, size if size is not None else "-",
                    total * 1000, _spaced(context.summary()), extra=extra)


def _security_headers(response):
    response.headers[NOSNIFF[0]] = NOSNIFF[1]
    if response.mimetype == "text/html":
        # The page loads only its own files; an image URL the user pastes is fetched by the browser (connect-src).
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; connect-src 'self' http: https:; "
            "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
        response.headers["X-Frame-Options"] = "DENY"
    if request.method == "OPTIONS" and response.status_code == 200 and not response.get_data():
        response.status_code = 204  # an automatic OPTIONS answer: Allow says it all, no empty text/html body
        response.headers.pop("Content-Type", None)
    return response


def _vary_on_origin(response):
    response.vary.add("Origin")
    return response


def _leave(exc) -> None:
    request_context.end()
    # Werkzeug's request and its environ refer to each other: a cycle that only the garbage collector frees, which
    # held each request's body (and parsed files) long after it was answered, 30 bodies of 10 MB in a worker under
    # a flood of large ones. Broken here, the request goes when its context does, and the body with it.
    request.environ.pop("werkzeug.request", None)
    if g.pop("metered", False):
        metrics.IN_FLIGHT.dec()
    release_body(state(), request.environ)
