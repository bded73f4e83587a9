"""The service's own API: classify, inspect, filters and model metadata."""

from __future__ import annotations

from flask import Blueprint, request

from service.api import reply, state
from service.api.openapi import documented
from service.api.schemas import ClassifyResponse, FiltersResponse, InspectResponse, ModelDescription, ModelList
from service.api.schemas import VersionDescription as Version
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
@documented("Classify images", "One prediction per image, in request order, from one model call for the whole "
            "batch: the top label, its confidence and every label's probability; with `top_k`, the k best too. The "
            "model is looked up before the body is read: an unknown one is a 404 whatever the body.",
            tags=["classify"], responses={200: ClassifyResponse}, errors=(400, 404, 413, 415, 503), body="Images",
            query=["TopK"], queued=True)
def classify(name: str | None = None, version: str | None = None):
    app_state = state()
    top_k = _top_k()
    model = app_state.registry.get(name, version)  # 404/503 before reading a large body
    images = images_from_request(request, app_state.settings.MAX_IMAGES_PER_REQUEST)
    if top_k is not None:
        top_k = min(top_k, len(model.labels))
    return reply(ClassifyResponse, app_state.pipeline.classify(model, images, top_k))


@blueprint.post("/inspect")
@blueprint.post("/models/<name>/inspect")
@blueprint.post("/models/<name>/versions/<version>/inspect")
@documented("What the network sees", "Runs exactly one image through the model and answers with the input as the "
            "network sees it, every stage's output in order (feature maps tiled in a PNG, vectors as numbers), the "
            "prediction, and a class activation map for models with one (null for lenet). Body forms as for "
            "classify, one image only.", tags=["inspect"], responses={200: InspectResponse},
            errors=(400, 404, 413, 415, 503), body="Image", query=["InspectClass"],
            queued=True)
def inspect(name: str | None = None, version: str | None = None):
    app_state = state()
    model = app_state.registry.get(name, version)
    images = images_from_request(request, app_state.settings.MAX_IMAGES_PER_REQUEST)
    if len(images) != 1:
        raise InvalidParameter(f"inspect takes exactly one image; got {len(images)}.")
    return reply(InspectResponse, app_state.pipeline.inspect(model, images[0], request.args.get("class")))


@blueprint.get("/models/<name>/filters")
@blueprint.get("/models/<name>/versions/<version>/filters")
@documented("First-layer filters", "The learned weights of the model's first convolution, as tiles in one PNG.",
            tags=["inspect"], responses={200: FiltersResponse}, errors=(404, 503))
def filters(name: str, version: str | None = None):
    app_state = state()
    return reply(FiltersResponse, app_state.pipeline.filters(app_state.registry.get(name, version)))


@blueprint.get("/models")
@documented("Every model and version", "Every model in the store with all its versions, those that failed to load "
            "too (with the reason), and the default model.", tags=["models"], responses={200: ModelList})
def list_models():
    registry = state().registry
    return reply(ModelList, {"default_model": registry.default_name,
                             "models": [registry.describe(name) for name in registry.names()]})


@blueprint.get("/models/<name>")
@documented("A model", "Its versions, and for the version that serves: labels, input (with the preprocessing spec), "
            "outputs, architecture and what /inspect shows. A model whose every version failed to load is still "
            "described (`default_version` null). 503 while models load and the name is not yet known.",
            tags=["models"], responses={200: ModelDescription}, errors=(404, 503))
def model_metadata(name: str):
    registry = state().registry
    if name not in registry.names():
        registry.get(name)  # raises the typed 404 (or 503 while loading)
    return reply(ModelDescription, registry.describe(name))


@blueprint.get("/models/<name>/versions/<version>")
@documented("A model version", "Its checksum, creation time, labels, parameter count, validation metrics and "
            "training summary; for a version that failed to load, the reason (state `failed`).", tags=["models"],
            responses={200: Version}, errors=(404, 503))
def version_metadata(name: str, version: str):
    registry = state().registry
    if registry.failure(name, version) is None:
        registry.get(name, version)
    return reply(Version, registry.describe_version(name, version))
