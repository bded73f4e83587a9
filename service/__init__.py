"""convserve: a four-class ConvNet image classifier served over HTTP with ONNX Runtime.

``create_app(settings)`` is the factory gunicorn calls; nothing is built at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the gunicorn master imports service.settings: keep metrics and ONNX Runtime out of it
    from flask import Flask

    from service.auth import ApiKeys
    from service.pipeline import InferencePipeline
    from service.registry import ModelRegistry
    from service.repository import Repository
    from service.settings import Settings
    from service.tracing import Tracing

__version__ = "0.1.0"


@dataclass
class AppState:
    """What the views reach through ``current_app.extensions['convserve']``."""

    settings: Settings
    registry: ModelRegistry
    pipeline: InferencePipeline
    api_keys: ApiKeys
    repository: Repository
    tracing: Tracing


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None,
               load_models: bool = True) -> Flask:
    from flask import Flask

    from service import logs
    from service.api import StrictJSONProvider, register_api
    from service.auth import ApiKeys, load_keys
    from service.inference_queue import InferenceQueue
    from service.metrics import MULTIPROCESS_FOLDER
    from service.pipeline import InferencePipeline
    from service.registry import ModelRegistry
    from service.repository import Repository
    from service.settings import Settings
    from service.tracing import Tracing

    settings = settings or Settings.from_env()
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT)
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_UPLOAD_BYTES
    app.config["MAX_FORM_PARTS"] = settings.MAX_IMAGES_PER_REQUEST + 16  # file parts, and a few plain fields
    app.json = StrictJSONProvider(app)
    app.json.sort_keys = False
    registry = registry or ModelRegistry(settings)
    queue = InferenceQueue(settings.inference_threads, settings.MAX_QUEUE, settings.QUEUE_TIMEOUT,
                           settings.MAX_IMAGES_PER_INFERENCE, settings.BODY_BUFFER_BYTES,
                           settings.INFERENCE_WATCHDOG_SECONDS)
    repository = Repository(registry, MULTIPROCESS_FOLDER, settings.REPOSITORY_TIMEOUT)
    app.extensions["convserve"] = AppState(settings, registry, InferencePipeline(settings, queue),
                                           ApiKeys(load_keys(settings), watching=settings), repository,
                                           Tracing(settings))
    register_api(app, settings)
    if load_models:
        repository.adopt_state()
        registry.start_loading()
        if repository.folder is not None:
            repository.start_watching()
    return app
