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
    return jsonify(app.runtime.classify(model, images, top_k))


@blueprint.post("/inspect")
@blueprint.post("/models/<name>/inspect")
@blueprint.post("/models/<name>/versions/<version>/inspect")
def inspect(name: str | None = None, version: str | None = None):
    app = state()
    model = app.registry.get(name, version)
    images = images_from_request(request, app.settings.MAX_BATCH_IMAGES)
    if len(images) != 1:
        raise InvalidParameter(f"inspect takes exactly one image; got {len(images)}.")
    return jsonify(app.runtime.inspect(model, images[0], request.args.get("class")))


@blueprint.get("/models/<name>/filters")
@blueprint.get("/models/<name>/versions/<version>/filters")
def filters(name: str, version: str | None = None):
    app = state()
    return jsonify(app.runtime.filters(app.registry.get(name, version)))


@blueprint.get("/models")
def list_models():
    registry = state().registry
    return jsonify(default_model=registry.default_name, models=[describe(name) for name in registry.names()])


@blueprint.get("/models/<name>")
def model_metadata(name: str):
    registry = state().registry
    if name not in registry.names():
        registry.get(name)  # raises the typed 404 (or 503 while loading)
    return jsonify(describe(name))


@blueprint.get("/models/<name>/versions/<version>")
def version_metadata(name: str, version: str):
    registry = state().registry
    if registry.failure(name, version) is None:
        registry.get(name, version)
    return jsonify(describe_version(name, version))


def describe(name: str) -> dict:
    registry = state().registry
    versions = [describe_version(name, version) for version in registry.versions(name)]
    description = {"name": name, "default_version": None, "versions": versions}
    if name in registry.models:
        latest = registry.latest(name)
        metadata = latest.metadata
        description.update(default_version=latest.version, labels=metadata["labels"], input=metadata["input"],
                           outputs=metadata["outputs"], architecture=metadata.get("architecture"),
                           inspection=describe_inspection(metadata))
    return description


def describe_inspection(metadata: dict) -> dict:
    """What /inspect will show for this model: its stages in order, and whether it has class activation maps."""
    inspection = metadata.get("inspection") or {}
    stages = [{key: stage[key] for key in ("name", "kind", "shape")} for stage in inspection.get("stages", [])]
    return {"stages": stages, "class_activation_maps": inspection.get("class_maps") is not None}


def describe_version(name: str, version: str) -> dict:
    registry = state().registry
    failure = registry.failure(name, version)
    if failure is not None:
        return {"version": version, "state": "failed", "error": failure.reason}
    model = registry.models[name][version]
    metadata = model.metadata
    validation = metadata.get("metrics", {}).get("validation", {})
    return {
        "version": version,
        "state": "ready" if model.ready else "loading",
        "sha256": metadata.get("sha256"),
        "created_at": metadata.get("created_at"),
        "labels": metadata["labels"],
        "parameters": metadata.get("architecture", {}).get("parameters"),
        "metrics": {"validation_accuracy": validation.get("accuracy"), "validation_count": validation.get("count"),
                    "per_class": validation.get("per_class")},
        "training": {key: metadata.get("training", {}).get(key) for key in ("preset", "wall_time_s", "device")},
    }
