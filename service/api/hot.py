"""The hot route: POST classify with one raw image, answered without Flask's per-request layers.

It is most of the traffic and its work can be smaller than those layers (lenet: 0.3 ms of decode and inference
against 0.4 ms of request and app contexts, hooks and response objects), so it runs as WSGI middleware in front of
the Flask app. Everything it does is the HTTP layer's own functions (service/api/__init__.py): admission and the
body read, API keys, errors, metrics, span, access line, the same answer model. It takes a request only when it is
that simple: POST to a route of the ``v1.classify`` view (matched by Flask's own URL map), an image or octet-stream
body with a Content-Length, no query string and no CORS; anything else, Flask serves. Tests hold the two paths to
the same answers, headers and metrics (tests/test_hot_route.py).
"""

from __future__ import annotations

import functools
import logging

from werkzeug.datastructures import EnvironHeaders
from werkzeug.http import HTTP_STATUS_CODES as REASONS

from service import metrics, request_context
from service.api import (
    INTERNAL_MESSAGE,
    NOSNIFF,
    QUEUED_ENDPOINTS,
    admit_and_read_body,
    encoded,
    error_document,
    error_headers,
    finish_request,
    release_body,
)
from service.api.schemas import ClassifyResponse
from service.errors import ServiceError
from service.inputs import RAW_IMAGE_TYPES, raw_image

log = logging.getLogger("convserve")

ENDPOINT = "v1.classify"
ROUTES_REMEMBERED = 512  # paths matched once each (Werkzeug's match costs 15 us); bounded whatever clients send


class HotRoute:
    """WSGI middleware around ``app.wsgi_app``: the simple classify requests, answered here; the rest, passed on."""

    def __init__(self, app, wsgi_app):
        self.wsgi_app = wsgi_app
        self.urls = app.url_map.bind("localhost")  # routes here match on the path alone (no host rules)
        self._route = functools.lru_cache(maxsize=ROUTES_REMEMBERED)(self._route_of)
        self.state = app.extensions["convserve"]
        self.queued = ENDPOINT in app.extensions[QUEUED_ENDPOINTS]

    def __call__(self, environ, start_response):
        taken = self._match(environ)
        if taken is None:
            return self.wsgi_app(environ, start_response)
        route, arguments = taken
        return self._classify(environ, start_response, route, arguments)

    def _match(self, environ):
        """(route template, view arguments) when the request is one this route serves, else None."""
        path = environ.get("PATH_INFO", "")
        if (environ.get("REQUEST_METHOD") != "POST" or environ.get("QUERY_STRING") or "HTTP_TRANSFER_ENCODING" in
                environ or not path.isascii() or not path.isprintable()):
            return None
        length = environ.get("CONTENT_LENGTH", "")
        if not (length.isascii() and length.isdigit()):  # "²" is a digit to Python, not to int()
            return None
        if environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower() not in RAW_IMAGE_TYPES:
            return None
        return self._route(path)

    def _route_of(self, path: str):
        try:
            rule, arguments = self.urls.match(path, method="POST", return_rule=True)
        except Exception:  # no route, a redirect, a wrong method: Flask answers it as it always does
            return None
        return (rule.rule, arguments) if rule.endpoint == ENDPOINT else None

    def _classify(self, environ, start_response, route: str, arguments: dict):
        state, path = self.state, environ["PATH_INFO"]
        context = request_context.begin(environ.get("HTTP_X_REQUEST_ID"))
        metrics.IN_FLIGHT.inc()
        headers = EnvironHeaders(environ)
        extra: list = []
        try:
            try:
                state.api_keys.check("POST", path, headers)
                body = admit_and_read_body(state, environ, int(environ["CONTENT_LENGTH"]), self.queued, context)
                model = state.registry.get(arguments.get("name"), arguments.get("version"))
                images = raw_image(body)  # one image: within MAX_IMAGES_PER_REQUEST, which is at least 1
                status, document = 200, encoded(ClassifyResponse, state.pipeline.classify(model, images, None))
            except ServiceError as error:
                status, document = error.status, error_document(path, error.code, error.message)
                extra = error_headers(error, "POST", path, environ, state.settings)
            except Exception:
                log.exception("unhandled error on POST %s", path)
                status, document = 500, error_document(path, "internal", INTERNAL_MESSAGE)
            answer = [("Content-Type", "application/json"), ("Content-Length", str(len(document))), *extra, NOSNIFF]
            answer += finish_request(state, context, "POST", route, path, status, len(document),
                                     environ.get("REMOTE_ADDR"), headers)
            start_response(f"{status} {REASONS.get(status, 'Unknown')}", answer)
            return [document]
        finally:
            request_context.end()
            metrics.IN_FLIGHT.dec()
            release_body(state, environ)
