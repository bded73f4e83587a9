"""service/openapi.json: a valid OpenAPI 3.1 document that describes exactly the routes the app serves, whose schemas
real responses satisfy, and which GET /openapi.json serves."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import service
from service import create_app, errors
from service.errors import HTTP_STATUS_CODES
from service.inputs import IMAGE_TYPES
from service.settings import Settings
from tests.helpers import image_bytes

REPO = Path(__file__).resolve().parent.parent
STORE = REPO / "model_store"
DOCUMENT_FILE = REPO / "service" / "openapi.json"
DOCUMENT_URI = "urn:convserve:openapi"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
PNG = image_bytes("PNG", 64, 48)
B64 = base64.b64encode(PNG).decode()


# fixtures and helpers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def document() -> dict:
    return json.loads(DOCUMENT_FILE.read_text())


def build(load_models: bool = True, **overrides):
    settings = Settings.from_env({}, **{"MODEL_STORE": STORE, "DEFAULT_MODEL": "lenet", **overrides})
    application = create_app(settings, load_models=load_models)
    if load_models:
        assert application.extensions["convserve"].registry.loading_done.wait(60), "models did not load in time"
    return application


@pytest.fixture(scope="module")
def openapi_app():
    return build()


@pytest.fixture()
def api(openapi_app):
    return openapi_app.test_client()


def pointer(*parts: str) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def lookup(document: dict, ref: str):
    node = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


class Checker:
    """Validates real responses against the schema the document gives for (path template, method, status, type)."""

    def __init__(self, document: dict):
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(DOCUMENT_URI, resource)

    def validate(self, instance, schema_pointer: str) -> None:
        validator = Draft202012Validator({"$ref": f"{DOCUMENT_URI}#{schema_pointer}"}, registry=self.registry)
        problems = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
        assert not problems, "\n".join(f"{list(p.absolute_path)}: {p.message}" for p in problems[:5])

    def documented(self, path: str, method: str, status: int) -> tuple[dict, str]:
        """The response object and its JSON pointer (following a $ref into components/responses)."""
        item = self.document["paths"][path]
        if method.lower() not in item and status == 405:  # a method the path lacks: its operations document the 405
            method = next(iter(item))
        responses = item[method.lower()]["responses"]
        assert str(status) in responses, f"{method} {path} answered {status}, which the document does not list"
        response, location = responses[str(status)], pointer("paths", path, method.lower(), "responses", str(status))
        if "$ref" in response:
            location = response["$ref"].removeprefix("#")
            response = lookup(self.document, response["$ref"])
        return response, location

    def check(self, response, path: str, method: str, status: int | None = None):
        if status is not None:
            assert response.status_code == status, response.get_data(as_text=True)[:500]
        documented, location = self.documented(path, method, response.status_code)
        content = documented.get("content", {})
        assert response.mimetype in content, f"{response.mimetype} is not documented for {method} {path}"
        if response.mimetype == "application/json":
            self.validate(response.get_json(), location + pointer("content", "application/json", "schema"))
        for header, spec in documented.get("headers", {}).items():
            if header == "Allow":
                assert response.headers.get(header), f"documented header {header} missing"
            if header in response.headers:
                assert spec["schema"]["type"] != "integer" or response.headers[header].isdigit()
        return response


@pytest.fixture(scope="module")
def checker(document) -> Checker:
    return Checker(document)


def flask_to_openapi(rule: str) -> str:
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def walk(node, location=""):
    """Every (pointer, dict) in the document."""
    if isinstance(node, dict):
        yield location, node
        for key, value in node.items():
            yield from walk(value, location + pointer(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, location + pointer(str(index)))


# (1) the document is valid ----------------------------------------------------------------------------------------
def test_document_is_valid_openapi_3_1(document):
    from openapi_spec_validator import OpenAPIV31SpecValidator  # dev dependency: openapi-spec-validator

    assert document["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(document).validate()
    assert document["servers"] == [{"url": "/"}]
    assert document["info"]["version"] == service.__version__


def test_every_operation_is_described(document):
    operation_ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert method in HTTP_METHODS, f"{path}: {method}"
            assert operation.get("summary") and operation.get("description"), f"{method} {path}"
            operation_ids.append(operation["operationId"])
            declared = {lookup(document, p["$ref"])["name"] if "$ref" in p else p["name"]
                        for p in operation.get("parameters", [])}
            assert set(re.findall(r"{([^}]+)}", path)) <= declared, f"{method} {path}: undeclared path parameter"
            assert "500" in operation["responses"] and "405" in operation["responses"], f"{method} {path}"
    assert len(operation_ids) == len(set(operation_ids))


def test_examples_satisfy_their_schemas(document, checker):
    count = 0
    for location, node in walk(document):
        if "schema" in node and ("example" in node or "examples" in node) and "in" not in node:
            schema = location + pointer("schema")
            values = [node["example"]] if "example" in node else [e["value"] for e in node["examples"].values()
                                                                   if "value" in e]
            if not values or node["schema"].get("type") == "string":
                continue
            for value in values:
                checker.validate(value, schema)
                count += 1
        elif location.startswith("/components/schemas/") and location.count("/") == 3 and "examples" in node:
            for value in node["examples"]:
                checker.validate(value, location)
                count += 1
    assert count >= 15


def test_error_codes_are_the_services(document):
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    codes = {errors.ServiceError.code} | {cls.code for cls in subclasses(errors.ServiceError)}
    codes |= set(HTTP_STATUS_CODES.values()) | {"http_error"}
    documented = document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(documented) == codes


def test_image_request_body_lists_every_accepted_content_type(document):
    content = document["components"]["requestBodies"]["Images"]["content"]
    assert set(content) == IMAGE_TYPES | {"application/octet-stream", "multipart/form-data", "application/json"}


# (2) the document and the app serve the same routes ---------------------------------------------------------------
def test_documented_routes_are_exactly_the_apps(openapi_app, document):
    served = set()
    for rule in openapi_app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            served.add((flask_to_openapi(rule.rule), method.lower()))
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert not served - documented, f"routes without documentation: {sorted(served - documented)}"
    assert not documented - served, f"documented routes the app does not serve: {sorted(documented - served)}"


# (3) real responses satisfy the documented schemas ----------------------------------------------------------------
def multipart(*images: bytes) -> dict:
    return {"data": {"image": [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)]},
            "content_type": "multipart/form-data"}


def fp32_request(count: int = 1) -> dict:
    return {"id": "42", "inputs": [{"name": "input", "datatype": "FP32", "shape": [count, 3, 32, 32],
                                    "data": [0.0] * (count * 3 * 32 * 32)}]}


def bytes_request(*images: bytes) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(data).decode() for data in images]}]}


# (id, method, url, request kwargs factory, documented path, status, v1 error code)
CASES = [
    ("healthz", "GET", "/healthz", dict, "/healthz", 200, None),
    ("readyz", "GET", "/readyz", dict, "/readyz", 200, None),
    ("index", "GET", "/", dict, "/", 200, None),
    ("metrics", "GET", "/metrics", dict, "/metrics", 200, None),
    ("classify-raw", "POST", "/v1/classify?top_k=2", lambda: {"data": PNG, "content_type": "image/png"},
     "/v1/classify", 200, None),
    ("classify-octet-stream", "POST", "/v1/classify", lambda: {"data": PNG,
                                                                "content_type": "application/octet-stream"},
     "/v1/classify", 200, None),
    ("classify-multipart", "POST", "/v1/models/lenet/classify", lambda: multipart(PNG, PNG),
     "/v1/models/{name}/classify", 200, None),
    ("classify-json", "POST", "/v1/models/lenet/versions/1/classify",
     lambda: {"json": {"images": [B64, "data:image/png;base64," + B64]}},
     "/v1/models/{name}/versions/{version}/classify", 200, None),
    ("inspect", "POST", "/v1/inspect?class=cat", lambda: {"data": PNG, "content_type": "image/png"},
     "/v1/inspect", 200, None),
    ("inspect-model", "POST", "/v1/models/lenet/inspect", lambda: multipart(PNG), "/v1/models/{name}/inspect",
     200, None),
    ("inspect-version", "POST", "/v1/models/lenet/versions/1/inspect", lambda: {"json": {"images": [B64]}},
     "/v1/models/{name}/versions/{version}/inspect", 200, None),
    ("filters", "GET", "/v1/models/lenet/filters", dict, "/v1/models/{name}/filters", 200, None),
    ("filters-version", "GET", "/v1/models/lenet/versions/1/filters", dict,
     "/v1/models/{name}/versions/{version}/filters", 200, None),
    ("models", "GET", "/v1/models", dict, "/v1/models", 200, None),
    ("model", "GET", "/v1/models/lenet", dict, "/v1/models/{name}", 200, None),
    ("version", "GET", "/v1/models/lenet/versions/1", dict, "/v1/models/{name}/versions/{version}", 200, None),
    # /v1 errors
    ("v1-400-top-k", "POST", "/v1/classify?top_k=0", lambda: {"data": PNG, "content_type": "image/png"},
     "/v1/classify", 400, "invalid_parameter"),
    ("v1-400-empty", "POST", "/v1/classify", lambda: {"data": b"", "content_type": "image/png"},
     "/v1/classify", 400, "empty_body"),
    ("v1-400-image", "POST", "/v1/classify", lambda: {"data": b"not an image", "content_type": "image/png"},
     "/v1/classify", 400, "invalid_image"),
    ("v1-400-base64", "POST", "/v1/classify", lambda: {"json": {"images": ["!!"]}}, "/v1/classify", 400,
     "invalid_base64"),
    ("v1-400-json", "POST", "/v1/classify", lambda: {"data": b"{", "content_type": "application/json"},
     "/v1/classify", 400, "invalid_json"),
    ("v1-400-inspect-two", "POST", "/v1/inspect", lambda: multipart(PNG, PNG), "/v1/inspect", 400,
     "invalid_parameter"),
    ("v1-400-class", "POST", "/v1/inspect?class=zebra", lambda: {"data": PNG, "content_type": "image/png"},
     "/v1/inspect", 400, "invalid_parameter"),
    ("v1-404-model", "POST", "/v1/models/nope/classify", lambda: {"data": PNG, "content_type": "image/png"},
     "/v1/models/{name}/classify", 404, "model_not_found"),
    ("v1-404-version", "GET", "/v1/models/lenet/versions/9", dict, "/v1/models/{name}/versions/{version}", 404,
     "version_not_found"),
    ("v1-404-describe", "GET", "/v1/models/nope", dict, "/v1/models/{name}", 404, "model_not_found"),
    ("v1-404-filters", "GET", "/v1/models/lenet/versions/9/filters", dict,
     "/v1/models/{name}/versions/{version}/filters", 404, "version_not_found"),
    ("v1-405", "GET", "/v1/classify", dict, "/v1/classify", 405, "method_not_allowed"),
    ("v1-405-root", "POST", "/healthz", dict, "/healthz", 405, "method_not_allowed"),
    ("v1-413", "POST", "/v1/classify", lambda: {"json": {"images": [B64] * 65}}, "/v1/classify", 413,
     "too_many_images"),
    ("v1-415", "POST", "/v1/classify", lambda: {"data": "hello", "content_type": "text/plain"}, "/v1/classify",
     415, "unsupported_media_type"),
    # Open Inference Protocol
    ("v2-server", "GET", "/v2", dict, "/v2", 200, None),
    ("v2-live", "GET", "/v2/health/live", dict, "/v2/health/live", 200, None),
    ("v2-ready", "GET", "/v2/health/ready", dict, "/v2/health/ready", 200, None),
    ("v2-model", "GET", "/v2/models/lenet", dict, "/v2/models/{name}", 200, None),
    ("v2-model-version", "GET", "/v2/models/lenet/versions/1", dict, "/v2/models/{name}/versions/{version}",
     200, None),
    ("v2-model-ready", "GET", "/v2/models/lenet/ready", dict, "/v2/models/{name}/ready", 200, None),
    ("v2-version-ready", "GET", "/v2/models/lenet/versions/1/ready", dict,
     "/v2/models/{name}/versions/{version}/ready", 200, None),
    ("v2-infer-fp32", "POST", "/v2/models/lenet/infer", lambda: {"json": fp32_request(2)},
     "/v2/models/{name}/infer", 200, None),
    ("v2-infer-bytes", "POST", "/v2/models/lenet/versions/1/infer", lambda: {"json": bytes_request(PNG, PNG)},
     "/v2/models/{name}/versions/{version}/infer", 200, None),
    ("v2-400-inputs", "POST", "/v2/models/lenet/infer", lambda: {"json": {"inputs": []}},
     "/v2/models/{name}/infer", 400, None),
    ("v2-400-shape", "POST", "/v2/models/lenet/infer",
     lambda: {"json": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                   "data": [0.0] * 192}]}}, "/v2/models/{name}/infer", 400, None),
    ("v2-400-json", "POST", "/v2/models/lenet/infer", lambda: {"data": b"{"}, "/v2/models/{name}/infer", 400,
     None),
    ("v2-404-model", "POST", "/v2/models/nope/infer", lambda: {"json": fp32_request()}, "/v2/models/{name}/infer",
     404, None),
    ("v2-404-version", "GET", "/v2/models/lenet/versions/9", dict, "/v2/models/{name}/versions/{version}", 404,
     None),
    ("v2-404-ready", "GET", "/v2/models/nope/ready", dict, "/v2/models/{name}/ready", 404, None),
    ("v2-405", "GET", "/v2/models/lenet/infer", dict, "/v2/models/{name}/infer", 405, None),
    ("v2-413", "POST", "/v2/models/lenet/infer",
     lambda: {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [65], "data": [B64] * 65}]}},
     "/v2/models/{name}/infer", 413, None),
]


@pytest.mark.parametrize(("method", "url", "kwargs", "path", "status", "code"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_response_matches_the_documented_schema(api, checker, method, url, kwargs, path, status, code):
    response = checker.check(api.open(url, method=method, **kwargs()), path, method, status)
    if code is not None:
        assert response.get_json()["error"]["code"] == code
    elif status >= 400:
        assert isinstance(response.get_json()["error"], str)  # the /v2 shape


def test_classify_top_k_is_clamped_to_the_labels(api, checker):
    response = checker.check(api.post("/v1/classify?top_k=99", data=PNG, content_type="image/png"),
                             "/v1/classify", "POST", 200)
    prediction = response.get_json()["predictions"][0]
    assert [entry["label"] for entry in prediction["top_k"]] == sorted(
        prediction["probabilities"], key=prediction["probabilities"].get, reverse=True)
    assert "top_k" not in api.post("/v1/classify", data=PNG, content_type="image/png").get_json()["predictions"][0]


def test_inspect_stages_carry_maps_or_values(api, checker):
    body = checker.check(api.post("/v1/inspect", data=PNG, content_type="image/png"), "/v1/inspect", "POST",
                         200).get_json()
    kinds = {("maps" in stage, "values" in stage) for stage in body["stages"]}
    assert kinds == {(True, False), (False, True)}
    assert body["cam"] is None  # lenet has no class activation map


def test_unknown_routes_answer_the_documented_error_shapes(api, checker):
    v1 = api.get("/v1/nothing")
    assert v1.status_code == 404
    checker.validate(v1.get_json(), "/components/responses/NotFound/content/application~1json/schema")
    v2 = api.get("/v2/nothing")
    assert v2.status_code == 404
    checker.validate(v2.get_json(), "/components/schemas/V2Error")


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_v2_binary_tensor_extension_both_ways(api, checker, datatype):
    if datatype == "FP32":
        binary = struct.pack("<3072f", *([0.0] * 3072))
        tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32]}
    else:
        binary = struct.pack("<I", len(PNG)) + PNG
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1]}
    tensor["parameters"] = {"binary_data_size": len(binary)}
    request = {"inputs": [tensor], "parameters": {"binary_data_output": True}}
    checker.validate(request, "/components/schemas/InferenceRequest")
    header = json.dumps(request).encode()
    response = api.post("/v2/models/lenet/infer", data=header + binary, content_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(header))})
    checker.check(response, "/v2/models/{name}/infer", "POST", 200)
    assert response.mimetype == "application/octet-stream"
    body = response.get_data()
    split = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:split])
    checker.validate(answer, "/components/schemas/InferenceResponse")
    (output,) = answer["outputs"]
    assert output["parameters"]["binary_data_size"] == len(body) - split == 4 * 4


def test_not_ready_responses_match_the_document(checker):
    """Without loading models: readiness 503s and the model routes' 503 not_ready."""
    client = build(load_models=False).test_client()
    checker.check(client.get("/readyz"), "/readyz", "GET", 503)
    checker.check(client.get("/v2/health/ready"), "/v2/health/ready", "GET", 503)
    assert client.get("/v2/health/ready").get_json() == {"ready": False}
    checker.check(client.get("/v2/models/lenet/ready"), "/v2/models/{name}/ready", "GET", 503)
    response = checker.check(client.post("/v1/classify", data=PNG, content_type="image/png"), "/v1/classify",
                             "POST", 503)
    assert response.get_json()["error"]["code"] == "not_ready"
    checker.check(client.get("/v2/models/lenet"), "/v2/models/{name}", "GET", 503)


def test_failed_version_responses_match_the_document(tmp_path, checker):
    store = tmp_path / "store"
    shutil.copytree(STORE / "lenet" / "1", store / "lenet" / "1", ignore=shutil.ignore_patterns("*.png"))
    shutil.copytree(store / "lenet" / "1", store / "lenet" / "2")
    metadata = json.loads((store / "lenet" / "2" / "metadata.json").read_text())
    metadata["sha256"] = "0" * 64
    (store / "lenet" / "2" / "metadata.json").write_text(json.dumps(metadata))
    client = build(MODEL_STORE=store).test_client()

    model = checker.check(client.get("/v1/models/lenet"), "/v1/models/{name}", "GET", 200).get_json()
    assert [v["state"] for v in model["versions"]] == ["ready", "failed"]
    checker.check(client.get("/v1/models/lenet/versions/2"), "/v1/models/{name}/versions/{version}", "GET", 200)
    response = checker.check(client.post("/v1/models/lenet/versions/2/classify", data=PNG, content_type="image/png"),
                             "/v1/models/{name}/versions/{version}/classify", "POST", 503)
    assert response.get_json()["error"]["code"] == "model_unavailable"
    checker.check(client.get("/v2/models/lenet/versions/2/ready"), "/v2/models/{name}/versions/{version}/ready",
                  "GET", 503)
    checker.check(client.get("/v2/models/lenet/versions/2"), "/v2/models/{name}/versions/{version}", "GET", 503)


# (4) the app serves the document -----------------------------------------------------------------------------------
def test_openapi_json_serves_the_document(api, checker, document):
    response = checker.check(api.get("/openapi.json"), "/openapi.json", "GET", 200)
    assert response.get_json() == document
