"""GET /openapi.json, generated from the code (service/api/openapi.py), and the /docs page that shows it.

The document is valid OpenAPI 3.1 and covers every route the app serves; /docs shows it with files from this server
only. Whether the server keeps the document is tests/test_fuzz.py's question."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import pytest
import requests

import service
from service import create_app
from service.preprocessing import IMAGE_MEDIA_TYPES
from service.settings import Settings
from tests.conftest import SHIPPED_MODELS, SHIPPED_STORE, wait_ready
from tests.helpers import GunicornServer
from tests.test_browser import driver, severe_console_entries, wait_until  # noqa: F401 (driver is a fixture)


@pytest.fixture(scope="module")
def document(app) -> dict:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return response.get_json()


def served_operations(application) -> set[tuple[str, str]]:
    return {(re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method.lower())
            for rule in application.url_map.iter_rules() if rule.endpoint != "static"
            for method in rule.methods - {"HEAD", "OPTIONS"}}


def test_the_document_is_valid_openapi_3_1(document):
    from openapi_spec_validator import OpenAPIV31SpecValidator

    OpenAPIV31SpecValidator(document).validate()
    assert document["openapi"] == "3.1.0" and document["info"]["version"] == service.__version__


def test_the_document_covers_every_route_the_app_serves(app, document):
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == served_operations(app)
    ids = [operation["operationId"] for item in document["paths"].values() for operation in item.values()]
    assert len(ids) == len(set(ids))


def test_the_document_describes_the_running_server(document):
    parameters = document["components"]["parameters"]
    assert parameters["ModelName"]["schema"]["enum"] == SHIPPED_MODELS
    assert parameters["InspectClass"]["schema"]["enum"] == ["dog", "cat", "boat", "bird"]
    images = document["components"]["requestBodies"]["Images"]["content"]  # the web page reads this list
    assert set(images) == IMAGE_MEDIA_TYPES | {"application/octet-stream", "multipart/form-data", "application/json"}
    most = Settings.from_env({}).MAX_IMAGES_PER_REQUEST
    assert images["application/json"]["schema"]["properties"]["images"]["maxItems"] == most
    one = document["components"]["requestBodies"]["Image"]["content"]
    assert one["application/json"]["schema"]["properties"]["images"]["maxItems"] == 1


def test_errors_and_keys_are_documented(document):
    classify = document["paths"]["/v1/classify"]["post"]
    assert {"400", "401", "404", "408", "413", "415", "500", "503"} <= set(classify["responses"])
    assert {"$ref": "#/components/schemas/Error"} in classify["responses"]["404"]["content"]["application/json"][
        "schema"]["allOf"]
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/V2Error"}
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert classify["security"] == [{}, {"bearer": []}, {"apiKey": []}]  # no keys configured: optional
    assert "security" not in document["paths"]["/healthz"]["get"]


def test_with_api_keys_the_document_asks_for_one():
    application = create_app(Settings.from_env({}, MODEL_STORE=SHIPPED_STORE, API_KEYS="k1"), load_models=False)
    document = application.test_client().get("/openapi.json").get_json()
    assert document["paths"]["/v1/classify"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert document["components"]["parameters"]["ModelName"]["schema"] == {"type": "string"}  # nothing loaded yet


def test_the_document_follows_the_models(lenet_store):
    application = create_app(Settings.from_env({}, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet"))
    wait_ready(application)
    client = application.test_client()
    assert client.get("/openapi.json").get_json()["components"]["parameters"]["ModelName"]["schema"]["enum"] == [
        "lenet"]
    shutil.copytree(lenet_store / "lenet", lenet_store / "other")
    application.extensions["convserve"].registry.rescan()
    assert client.get("/openapi.json").get_json()["components"]["parameters"]["ModelName"]["schema"]["enum"] == [
        "lenet", "other"]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_docs_page_loads_only_files_of_this_server(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    links = _Links()
    links.feed(page.get_data(as_text=True))
    assert len(links.urls) == 4
    for url in links.urls:
        assert not urlsplit(url).scheme and not url.startswith("//"), url
        asset = client.get(urljoin("/docs", url))
        assert asset.status_code == 200 and asset.get_data(), url
    assert client.get("/docs/index.html").status_code == 404  # the bundle's other files are not served


@pytest.mark.slow
def test_docs_render_in_a_browser_from_this_server_alone(tmp_path, driver):  # noqa: F811
    server = GunicornServer(tmp_path, MODEL_STORE=SHIPPED_STORE, WORKERS=1, MODEL_POLL_SECONDS=0)
    try:
        server.wait_ready()
        paths = requests.get(server.url + "/openapi.json", timeout=10).json()["paths"]
        blocks = sum(len(operation["tags"]) for item in paths.values() for operation in item.values())  # per tag
        driver.get_log("performance")
        driver.get(server.url + "/docs")
        wait_until(lambda: driver.execute_script("return document.querySelectorAll('.opblock').length") == blocks,
                   "Swagger UI to show every operation")
        urls = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        assert server.url + "/openapi.json" in urls
        assert all(url.startswith(server.url + "/") or url.startswith("data:") for url in urls), urls
        assert not severe_console_entries(driver)
    finally:
        server.stop()
