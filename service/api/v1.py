"""The service's own API: classify, inspect, filters and model metadata."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from service.api import state
from service.errors import InvalidParameter
from service.inputs import images_from_request

blueprint = Blueprint("v1", __name__, url_prefix="/v1")


def _top_k() -> int | None:
    raw = request.args.get("top_k")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidParameter(f"top_k must be a whole number >= 1; got {raw!r}.")
    return value


@blueprint.post("/classify")
@blueprint.post("/models/<name>/classify")
@blueprint.post("/models/<name>/versions/<version>/classify")
def classify(name: str | None = None, version: str | None = None):
    app = state()
    top_k = _top_k()
    model = app.registry.get(name, version)  # 404/503 before reading a large body
    images = images_from_request(request, app.settings.MAX_BATCH_IMAGES)
    if top_k is not None:
        top_k = min(top_k, len(model.labels))
    return jsonify(app.pipeline.classify(model, images, top_k))


@blueprint.post("/inspect")
@blueprint.post("/models/<name>/inspect")
@blueprint.post("/models/<name>/versions/<version>/inspect")
def inspect(name: str | None = None, version: str | None = None):
    app = state()
    model = app.registry.get(name, version)
    images = images_from_request(request, app.settings.MAX_BATCH_IMAGES)
    if len(images) != 1:
        raise InvalidParameter(f"inspect takes exactly one image; got {len(images)}.")
    return jsonify(app.pipeline.inspect(model, images[0], request.args.get("class")))


@blueprint.get("/models/<name>/filters")
@blueprint.get("/models/<name>/versions/<version>/filters")
def filters(name: str, version: str | None = None):
    app = state()
    return jsonify(app.pipeline.filters(app.registry.get(name, version)))


@blueprint.get("/models")
def list_models():
    registry = state().registry
    return jsonify(default_model=registry.default_name, models=[registry.describe(name) for name in registry.names()])


@blueprint.get("/models/<name>")
def model_metadata(name: str):
    registry = state().registry
    if name not in registry.names():
        registry.get(name)  # raises the typed 404 (or 503 while loading)
    return jsonify(registry.describe(name))


@blueprint.get("/models/<name>/versions/<version>")
def version_metadata(name: str, version: str):
    registry = state().registry
    if registry.failure(name, version) is None:
        registry.get(name, version)
    return jsonify(registry.describe_version(name, version))
