"""The model store: discover every ``<name>/<version>/``, verify, load and warm each, and pick versions.

A version that fails to load is logged, counted in metrics and described by the metadata endpoints; it never takes
the others down. Readiness: loading finished, at least one model serves, and no shutdown has begun.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service import metrics
from service.errors import ModelNotFound, ModelUnavailable, NotReady, VersionNotFound
from service.model import ModelLoadError, OnnxModel
from service.settings import Settings

log = logging.getLogger("convserve")


@dataclass
class LoadFailure:
    name: str
    version: str
    reason: str


def version_key(version: str) -> tuple:
    """Numeric versions sort numerically (10 after 9); others after them, alphabetically."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


class ModelRegistry:
    def __init__(self, settings: Settings, model_factory: Callable[[Path, int], OnnxModel] = OnnxModel):
        self.store = Path(settings.MODEL_STORE)
        self.default_name = settings.DEFAULT_MODEL
        self.intra_op_threads = settings.ORT_INTRA_OP_THREADS
        self.model_factory = model_factory
        self.models: dict[str, dict[str, OnnxModel]] = {}
        self.failures: dict[tuple[str, str], LoadFailure] = {}
        self.loading_done = threading.Event()
        self.shutting_down = False

    # lifecycle -----------------------------------------------------------------------------------------------
    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self.load_all, name="model-loader", daemon=True)
        thread.start()
        return thread

    def load_all(self) -> None:
        metrics.READY.set(0)
        try:
            for folder in self._version_folders():
                self._load_one(folder)
        finally:
            self.loading_done.set()
            problem = self._readiness_problem()
            metrics.READY.set(0 if problem else 1)
            if problem:
                log.error("not ready: %s", problem)
            else:
                log.info("ready: %s", ", ".join(f"{n} v{self.latest(n).version}" for n in self.models))

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        metrics.READY.set(0)
        log.info("shutdown begun: readiness now reports 503")

    @property
    def ready(self) -> bool:
        return self.loading_done.is_set() and not self.shutting_down and not self._readiness_problem()

    def readiness_problem(self) -> str | None:
        if self.shutting_down:
            return "shutting down"
        if not self.loading_done.is_set():
            return "models are loading"
        return self._readiness_problem()

    # lookup ----------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        failed = {name for name, _ in self.failures}
        return sorted(set(self.models) | failed)

    def versions(self, name: str) -> list[str]:
        loaded = set(self.models.get(name, {}))
        failed = {version for n, version in self.failures if n == name}
        return sorted(loaded | failed, key=version_key)

    def latest(self, name: str) -> OnnxModel:
        return self.models[name][max(self.models[name], key=version_key)]

    def get(self, name: str | None = None, version: str | None = None) -> OnnxModel:
        """The model to serve, or a typed error: 404 unknown, 503 still loading or failed to load."""
        name = name or self.default_name
        if name not in self.names():
            if not self.loading_done.is_set():
                raise NotReady("Models are still loading; retry in a moment.")
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"No model named {name!r}. Available models: {known}.")
        if version is None:
            if name not in self.models:
                raise ModelUnavailable(f"Model {name!r} failed to load: "
                                       f"{'; '.join(f.reason for f in self._failures_of(name))}.")
            return self.latest(name)
        if (name, version) in self.failures:
            raise ModelUnavailable(f"Model {name!r} version {version} failed to load: "
                                   f"{self.failures[(name, version)].reason}.")
        model = self.models.get(name, {}).get(version)
        if model is None:
            raise VersionNotFound(f"Model {name!r} has no version {version!r}. "
                                  f"Versions: {', '.join(self.versions(name))}.")
        if not model.ready:
            raise NotReady(f"Model {name!r} version {version} is not ready yet.")
        return model

    def failure(self, name: str, version: str) -> LoadFailure | None:
        return self.failures.get((name, version))

    def loaded_versions(self, name: str) -> list[str]:
        return sorted(self.models.get(name, {}), key=version_key)

    # descriptions (GET /v1/models...) ------------------------------------------------------------------------------
    def describe(self, name: str) -> dict:
        """A model: its versions with their state, and the served version's labels, input, outputs, inspection."""
        description = {"name": name, "default_version": None,
                       "versions": [self.describe_version(name, version) for version in self.versions(name)]}
        if name in self.models:
            latest = self.latest(name)
            metadata = latest.metadata
            description.update(default_version=latest.version, labels=metadata["labels"], input=metadata["input"],
                               outputs=metadata["outputs"], architecture=metadata.get("architecture"),
                               inspection=_describe_inspection(metadata))
        return description

    def describe_version(self, name: str, version: str) -> dict:
        failure = self.failure(name, version)
        if failure is not None:
            return {"version": version, "state": "failed", "error": failure.reason}
        model = self.models[name][version]
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

    # internals -------------------------------------------------------------------------------------------------
    def _version_folders(self) -> list[Path]:
        if not self.store.is_dir():
            log.error("model store %s does not exist", self.store)
            return []
        folders = []
        for model_dir in sorted(p for p in self.store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
            folders.extend(sorted(versions, key=lambda p: version_key(p.name)))
        return folders

    def _load_one(self, folder: Path) -> None:
        """Load and warm one version. Whatever goes wrong (ONNX Runtime failing at warm-up included) marks this
        version failed with its reason; the loop goes on to the others."""
        name, version = folder.parent.name, folder.name
        try:
            model = self.model_factory(folder, self.intra_op_threads)
            model.load()
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            # Answers name files inside the store, never where the store is on this machine.
            for place, shown in ((folder.resolve(), f"{name}/{version}"), (folder, f"{name}/{version}"),
                                 (self.store.resolve(), "<store>"), (self.store, "<store>")):
                reason = reason.replace(str(place), shown)
            self.failures[(name, version)] = LoadFailure(name, version, reason)
            metrics.MODEL_LOAD_FAILURES.labels(name, version).inc()
            metrics.MODEL_LOADED.labels(name, version).set(0)
            log.error("model %s version %s failed to load: %s", name, version, reason, exc_info=True)
            return
        self.models.setdefault(name, {})[version] = model
        metrics.MODEL_INFO.labels(name, version, model.metadata.get("sha256", "")).set(1)
        metrics.MODEL_LOADED.labels(name, version).set(1)
        log.info("loaded model %s version %s from %s", name, version, folder)

    def _failures_of(self, name: str) -> list[LoadFailure]:
        return [failure for (n, _), failure in self.failures.items() if n == name]

    def _readiness_problem(self) -> str | None:
        if not self.models:
            if self.failures:
                return "no model could be loaded: " + "; ".join(
                    f"{f.name} v{f.version}: {f.reason}" for f in self.failures.values())
            return "the model store (MODEL_STORE) has no models (expected <name>/<version>/model.onnx)"
        not_ready = [f"{m.name} v{m.version}" for versions in self.models.values() for m in versions.values()
                     if not m.ready]
        if not_ready:
            return "not warmed up: " + ", ".join(not_ready)
        if self.default_name not in self.models:
            return (f"the default model {self.default_name!r} is not loaded (models: {', '.join(self.models)}); "
                    "set DEFAULT_MODEL to one of them")
        return None


def _describe_inspection(metadata: dict) -> dict:
    """What /inspect will show for this model: its stages in order, and whether it has class activation maps."""
    inspection = metadata.get("inspection") or {}
    stages = [{key: stage[key] for key in ("name", "kind", "shape")} for stage in inspection.get("stages", [])]
    return {"stages": stages, "class_activation_maps": inspection.get("class_maps") is not None}
