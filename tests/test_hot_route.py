"""The hot route (service/api/hot.py) answers exactly as Flask does, and takes only the requests it should."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from service import create_app
from service.api.hot import HotRoute
from service.settings import Settings
from tests.conftest import SHIPPED_STORE, wait_ready

CLASSIFY = "/v1/models/lenet/classify"
# Each request's ID is fresh and its timings its own; every other header must match.
OWN_PER_REQUEST = {"X-Request-ID", "Server-Timing"}


def encoded_image(kind: str = "JPEG", size: int = 32, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def keyed_app():
    application = create_app(Settings.from_env({}, MODEL_STORE=SHIPPED_STORE, API_KEYS="secret-one"))
    wait_ready(application)
    return application


def both_ways(app, method: str, path: str, **request):
    """The same request through the hot route and through Flask alone: (status, body, headers) each."""
    hot = app.wsgi_app
    assert isinstance(hot, HotRoute)
    answers = []
    for wsgi_app in (hot, hot.wsgi_app):
        app.wsgi_app = wsgi_app
        try:
            response = app.test_client().open(path, method=method, **request)
        finally:
            app.wsgi_app = hot
        headers = {name: value for name, value in response.headers.items() if name not in OWN_PER_REQUEST}
        answers.append((response.status_code, response.get_data(), headers, response.headers))
    return answers


CASES = {
    "a JPEG": dict(data=encoded_image(), content_type="image/jpeg"),
    "a PNG as octet-stream": dict(data=encoded_image("PNG", seed=1), content_type="application/octet-stream"),
    "a JPEG with parameters on its type": dict(data=encoded_image(seed=2), content_type="image/jpeg; q=1"),
    "an empty body": dict(data=b"", content_type="image/png"),
    "garbage": dict(data=b"\x89PNG\r\n\x1a\n not really", content_type="image/png"),
    "a truncated JPEG": dict(data=encoded_image(seed=3)[:200], content_type="image/jpeg"),
    "a body over MAX_UPLOAD_BYTES": dict(data=b"\xff" * (Settings().MAX_UPLOAD_BYTES + 1), content_type="image/jpeg"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", [CLASSIFY, "/v1/classify", "/v1/models/lenet/versions/3/classify",
                                  "/v1/models/nosuch/classify", "/v1/models/lenet/versions/99/classify"])
def test_the_hot_route_answers_as_flask_does(app, case, path):
    (hot_status, hot_body, hot_headers, _), (status, body, headers, _) = both_ways(app, "POST", path, **CASES[case])
    assert (hot_status, hot_body) == (status, body)
    assert hot_headers == headers


def test_a_supplied_request_id_comes_back_from_the_hot_route(app):
    hot, flask = both_ways(app, "POST", CLASSIFY, headers={"X-Request-ID": "abc-123"}, **CASES["a JPEG"])
    assert hot[3]["X-Request-ID"] == flask[3]["X-Request-ID"] == "abc-123"
    stages = [part.split(";")[0] for part in hot[3]["Server-Timing"].split(", ")]
    assert stages == [part.split(";")[0] for part in flask[3]["Server-Timing"].split(", ")]
    assert stages[0] == "read_body" and stages[-1] == "total"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "secret-one"}])
def test_api_keys_are_checked_alike(keyed_app, headers):
    hot, flask = both_ways(keyed_app, "POST", CLASSIFY, headers=headers, **CASES["a JPEG"])
    assert hot[:3] == flask[:3]
    assert hot[0] == (200 if headers.get("X-API-Key") == "secret-one" else 401)


def requests_counted(route: str, status: str) -> float:
    return REGISTRY.get_sample_value("convserve_requests_total", {
        "route": route, "method": "POST", "status": status, "protocol": "http"}) or 0.0


def test_the_hot_route_counts_its_requests_under_the_views_route(client):
    before = requests_counted("/v1/models/<name>/classify", "200"), requests_counted("/v1/classify", "400")
    assert client.post(CLASSIFY, **CASES["a JPEG"]).status_code == 200
    assert client.post("/v1/classify", **CASES["garbage"]).status_code == 400
    after = requests_counted("/v1/models/<name>/classify", "200"), requests_counted("/v1/classify", "400")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_only_simple_classify_requests_take_the_hot_route(app):
    """Flask's hooks run for what the hot route leaves to Flask, and only for that."""
    seen = []
    app.before_request_funcs.setdefault(None, []).insert(0, lambda: seen.append(1))
    client = app.test_client()
    image = CASES["a JPEG"]
    try:
        sends = {
            "raw image": lambda: client.post(CLASSIFY, **image),
            "raw image, default model": lambda: client.post("/v1/classify", **image),
            "with top_k": lambda: client.post(CLASSIFY + "?top_k=2", **image),
            "multipart": lambda: client.post(CLASSIFY, data={"image": (io.BytesIO(image["data"]), "x.jpg")}),
            "chunked": lambda: client.post(CLASSIFY, data=image["data"], content_type="image/jpeg",
                                           headers={"Transfer-Encoding": "chunked"}),
            "JSON": lambda: client.post(CLASSIFY, json={"images": []}),
            "inspect": lambda: client.post("/v1/models/lenet/inspect", **image),
            "a trailing slash": lambda: client.post(CLASSIFY + "/", **image),
            "GET": lambda: client.get(CLASSIFY),
        }
        flask_ran = {}
        for name, send in sends.items():
            response = send()
            assert response.status_code < 500, (name, response.get_data())
            flask_ran[name] = len(seen)
            seen.clear()
    finally:
        app.before_request_funcs[None].pop(0)
    assert {name for name, count in flask_ran.items() if not count} == {"raw image", "raw image, default model"}


def test_a_content_length_that_is_not_ascii_digits_is_left_to_flask(app):
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": CLASSIFY, "CONTENT_LENGTH": "\u00b2",
               "CONTENT_TYPE": "image/jpeg"}
    assert app.wsgi_app._match(environ) is None
    assert app.wsgi_app._match({**environ, "CONTENT_LENGTH": "2"}) == ("/v1/models/<name>/classify", {"name": "lenet"})


def test_with_cors_every_request_is_flasks(make_client):
    client = make_client(MODEL_STORE=SHIPPED_STORE, CORS_ORIGINS="https://example.org")
    assert not isinstance(client.application.wsgi_app, HotRoute)
    response = client.post(CLASSIFY, headers={"Origin": "https://example.org"}, **CASES["a JPEG"])
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://example.org"
