"""The model store: discover every ``<name>/<version>/``, verify, load and warm each, and pick versions.

A version that fails to load is logged, counted in metrics and described by the metadata endpoints; it never takes
the others down. Readiness: loading finished, the default model serves, and no shutdown has begun.

With MODEL_POLL_SECONDS, a thread rescans the store while the worker serves: a new version is verified, loaded and
warmed before it can serve; a removed one is dropped, and in-flight requests finish on the model object they hold.
Folders whose name starts with "." are never read: publish by staging a folder beside the versions and renaming it
(what the exporter does). Which version serves is MODEL_VERSION_POLICY's choice: the latest, or a pinned one.
The dictionaries are replaced, never changed in place, so a request always sees one consistent store.

The store is read, never trusted blindly: a root that is missing, unreadable or suddenly empty (an NFS or volume
blink, a remount, a careless mv) is a store error, not a removal. Loaded versions keep serving, readiness stays as it
was, the error is logged once (and its end), counted, and the scan retries; a model this worker does not hold then
gets 503 store_unavailable, not 404. A version folder whose files change while it loads is still being written and is
tried again at the next scan; a loaded version whose graph changes on disk keeps serving the graph it verified
(versions are immutable: publish a new one), said once in the log and the store-error counter.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service import metrics, verification
from service.errors import (
    ModelNotFound,
    ModelUnavailable,
    ModelUnloaded,
    NotReady,
    StoreUnavailable,
    VersionNotFound,
)
from service.metadata import ModelMetadata, sha256_of
from service.model import ModelLoadError, OnnxModel
from service.settings import Settings
from service.verification import Tolerances

log = logging.getLogger("convserve")


STRETCH_KEYS = ("device", "hardware", "first_epoch", "last_epoch")  # of training.trained_on, as described


@dataclass
class LoadFailure:
    name: str
    version: str
    reason: str
    signature: tuple = ()  # the folder's files when it failed: a changed folder is tried again


class StoreUnreadable(Exception):
    """The store root cannot be trusted this scan; the message says why."""


def version_key(version: str) -> tuple:
    """Numeric versions sort numerically (10 after 9); others after them, alphabetically."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


class ModelRegistry:
    def __init__(self, settings: Settings,
                 model_factory: Callable[[Path, int, str, Tolerances], OnnxModel] = OnnxModel):
        self.store = Path(settings.MODEL_STORE)
        self.default_name = settings.DEFAULT_MODEL
        self.intra_op_threads = settings.ORT_INTRA_OP_THREADS
        self.model_factory = model_factory
        self.precision = settings.PRECISION
        self.tolerances = Tolerances.of(settings)
        self.pins = settings.version_pins
        self.poll_seconds = settings.MODEL_POLL_SECONDS
        self.models: dict[str, dict[str, OnnxModel]] = {}
        self.failures: dict[tuple[str, str], LoadFailure] = {}
        self.loading_done = threading.Event()
        self.shutting_down = False
        self.out_of_service: str | None = None  # why the worker is leaving (the inference watchdog tripped)
        self._stop_polling = threading.Event()
        self._scan_lock = threading.Lock()  # one rescan at a time
        self._served_shown: dict[str, str] = {}
        self.store_problem: str | None = None  # why the last scan could not read the store, while it cannot
        self._store_failed_at = 0.0
        self._signatures: dict[tuple[str, str], tuple] = {}  # each loaded version's folder when it loaded
        self._trims_due = 0  # scans left that give memory back after an unload
        self.unloaded: dict[str, str] = {}  # models a repository API call unloaded → why (service/repository.py)
        self.in_store: dict[str, list[str]] = {}  # model → versions, as the last readable scan found them
        metrics.STORE_OK.set(1)

    # lifecycle -----------------------------------------------------------------------------------------------
    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._load_then_poll, name="model-loader", daemon=True)
        thread.start()
        return thread

    def load_all(self) -> None:
        metrics.READY.set(0)
        try:
            self.rescan()
        finally:
            self.loading_done.set()
            problem = self._readiness_problem()
            metrics.READY.set(0 if problem else 1)
            if problem:
                log.error("not ready: %s", problem)
            else:
                log.info("ready: %s", ", ".join(f"{name} v{served.version}" for name in self.models
                                                if (served := self.served(name))))

    def rescan(self) -> None:
        """Load versions that appeared (or whose failed folder changed), drop versions that disappeared."""
        with self._scan_lock:
            try:
                present = {(folder.parent.name, folder.name): folder for folder in self._version_folders()}
            except StoreUnreadable as problem:
                self._store_unreadable(str(problem))
                return
            self._store_readable()
            loaded = {(name, version) for name, versions in self.models.items() for version in versions}
            for key in sorted(loaded | set(self.failures), key=lambda k: (k[0], version_key(k[1]))):
                if key not in present:
                    self._forget(*key)
            self.in_store = {name: sorted((v for n, v in present if n == name), key=version_key)
                             for name in {n for n, _ in present}}
            for key, folder in present.items():
                if key[0] in self.unloaded:
                    continue
                failure = self.failures.get(key)
                if key in loaded:
                    self._check_unchanged(key, folder)
                    continue
                if failure is not None and failure.signature == _signature(folder):
                    continue
                if not (folder / "metadata.json").is_file():
                    continue  # still being written: looked at again at the next scan
                self._load_one(folder)
            self._show_served()
            if self._trims_due:
                self._trims_due -= 1
                _give_memory_back()

    def set_unloaded(self, unloaded: dict[str, str]) -> None:
        """Models named here stop serving (in-flight requests finish on the model they hold) and are not loaded
        by any scan until they leave the set; the next rescan loads what the store holds for the others."""
        with self._scan_lock:
            self.unloaded = dict(unloaded)
            for name, version in [(n, v) for n, versions in self.models.items() for v in versions] + list(
                    self.failures):
                if name in self.unloaded:
                    self._forget(name, version, why="unloaded by a repository API call")
            self._show_served()

    def stop_polling(self) -> None:
        self._stop_polling.set()

    def _load_then_poll(self) -> None:
        self.load_all()
        if self.poll_seconds <= 0:
            return
        while not self._stop_polling.wait(self.poll_seconds):
            try:
                self.rescan()
            except Exception:  # a broken store must not stop the polling or the serving
                log.exception("rescanning the model store failed")

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        self.stop_polling()
        metrics.READY.set(0)
        log.info("shutdown begun: readiness now reports 503")

    def take_out_of_service(self, reason: str) -> None:
        """The worker is leaving for another reason than a shutdown: readiness says why until it exits."""
        self.out_of_service = reason
        self.stop_polling()
        metrics.READY.set(0)

    @property
    def ready(self) -> bool:
        return self.readiness_problem() is None

    def readiness_problem(self) -> str | None:
        if self.out_of_service:
            return self.out_of_service
        if self.shutting_down:
            return "shutting down"
        if not self.loading_done.is_set():
            return "models are loading"
        return self._readiness_problem()

    # lookup ----------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        failed = {name for name, _ in self.failures}
        return sorted(set(self.models) | failed | set(self.unloaded))

    def versions(self, name: str) -> list[str]:
        loaded = set(self.models.get(name, {}))
        failed = {version for n, version in self.failures if n == name}
        return sorted(loaded | failed, key=version_key)

    def served(self, name: str) -> OnnxModel | None:
        """The version that serves requests naming no version: the pinned one (MODEL_VERSION_POLICY), else the
        highest loaded; None when that version is not loaded."""
        versions = self.models.get(name, {})
        if name in self.pins:
            return versions.get(self.pins[name])
        return versions[max(versions, key=version_key)] if versions else None

    def get(self, name: str | None = None, version: str | None = None) -> OnnxModel:
        """The model to serve, or a typed error: 404 unknown, 503 still loading or failed to load."""
        name = name or self.default_name
        if name not in self.names():
            if not self.loading_done.is_set():
                raise NotReady("Models are still loading; retry in a moment.")
            if self.store_problem:
                raise StoreUnavailable(f"Model {name!r} is not loaded in this worker, and {self.store_problem} right "
                                       "now; retry in a moment.")
            known = ", ".join(self.names()) or "none"
            raise ModelNotFound(f"No model named {name!r}. Available models: {known}.")
        if name in self.unloaded:
            raise ModelUnloaded(f"Model {name!r} is unloaded ({self.unloaded[name]}); POST "
                                f"/v2/repository/models/{name}/load serves it again.")
        if version is None:
            served = self.served(name)
            if served is not None:
                return served
            if name in self.pins:
                raise ModelUnavailable(f"Model {name!r} is pinned to version {self.pins[name]} by "
                                       f"MODEL_VERSION_POLICY, which is not loaded (versions: "
                                       f"{', '.join(self.versions(name)) or 'none'}).")
            raise ModelUnavailable(f"Model {name!r} failed to load: "
                                   f"{'; '.join(f.reason for f in self._failures_of(name))}.")
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

    def loaded(self) -> list[OnnxModel]:
        """Every loaded version of every model."""
        return [model for versions in self.models.values() for model in versions.values()]

    def loaded_versions(self, name: str) -> list[str]:
        return sorted(self.models.get(name, {}), key=version_key)

    def index(self) -> list[dict]:
        """Every model and version this worker knows (the store's, as last scanned, and what it holds), each with
        its state (READY, LOADING, UNAVAILABLE) and, unless ready, why: the repository API's index."""
        entries = []
        for name in sorted(set(self.in_store) | set(self.names())):
            versions = sorted(set(self.in_store.get(name, [])) | set(self.versions(name)), key=version_key)
            for version in versions:
                model = self.models.get(name, {}).get(version)
                failure = self.failures.get((name, version))
                if name in self.unloaded:
                    state, reason = "UNAVAILABLE", f"unloaded ({self.unloaded[name]})"
                elif model is not None:
                    state, reason = ("READY", "") if model.ready else ("LOADING", "warming up")
                elif failure is not None:
                    state, reason = "UNAVAILABLE", failure.reason
                else:
                    state, reason = "LOADING", "found in the store; it loads at this worker's next scan"
                entries.append({"name": name, "version": version, "state": state, "reason": reason})
        return entries

    # descriptions (GET /v1/models...) ------------------------------------------------------------------------------
    def describe(self, name: str) -> dict:
        """A model: its versions with their state, and the served version's labels, input, outputs, inspection."""
        description = {"name": name, "default_version": None,
                       "versions": [self.describe_version(name, version) for version in self.versions(name)]}
        served = self.served(name)
        if served is not None:
            metadata = served.metadata
            description.update(default_version=served.version, precision=served.precision,
                               precision_reason=served.refusal, verification=describe_verification(served),
                               labels=metadata.labels,
                               input=metadata.input.model_dump(), outputs=[o.model_dump() for o in metadata.outputs],
                               architecture=metadata.architecture.model_dump(),
                               inspection=_describe_inspection(metadata))
        return description

    def describe_version(self, name: str, version: str) -> dict:
        failure = self.failure(name, version)
        if failure is not None:
            return {"version": version, "state": "failed", "error": failure.reason}
        model = self.models[name][version]
        metadata = model.metadata
        figures = metadata.metrics
        validation = figures.validation
        return {
            "version": version,
            "state": "ready" if model.ready else "loading",
            "precision": model.precision,
            "precision_reason": model.refusal,
            "verification": describe_verification(model),
            "sha256": model.served_file.sha256,
            "created_at": metadata.created_at,
            "labels": metadata.labels,
            "parameters": metadata.architecture.parameters,
            "metrics": {"validation_accuracy": validation.accuracy, "validation_count": validation.count,
                        "per_class": {label: c.model_dump() for label, c in validation.per_class.items()},
                        **served_figures(model),
                        "quantization": figures.quantization.model_dump() if figures.quantization else None},
            "training": {**{key: metadata.training.get(key) for key in ("preset", "wall_time_s", "device")},
                         "trained_on": [{key: stretch[key] for key in STRETCH_KEYS}
                                        for stretch in metadata.training.get("trained_on") or []] or None},
        }

    # internals -------------------------------------------------------------------------------------------------
    def _version_folders(self) -> list[Path]:
        """Every version folder; StoreUnreadable when the root is missing or unreadable, or holds no version at all
        while this worker knows some (an emptied mount point looks like that; deleting every model does not
        unload them: remove versions one by one, or restart)."""
        if not self.store.is_dir():
            raise StoreUnreadable("is missing or not a folder")
        folders = []
        try:
            for model_dir in sorted(p for p in self.store.iterdir() if p.is_dir() and not p.name.startswith(".")):
                versions = [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
                folders.extend(sorted(versions, key=lambda p: version_key(p.name)))
        except OSError as exc:
            raise StoreUnreadable(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
        if not folders and (self.models or self.failures):
            raise StoreUnreadable("suddenly holds no model version")
        return folders

    def _store_unreadable(self, problem: str) -> None:
        if self.store_problem is None:
            self._store_failed_at = time.monotonic()
            metrics.STORE_ERRORS.labels("unreadable").inc()
            metrics.STORE_OK.set(0)
            log.error("model store error: %s %s; the %d loaded versions keep serving, readiness is unchanged and the "
                      "scan retries every %g s (logged once until it recovers)", self.store, problem,
                      len(self.loaded()), self.poll_seconds)
        self.store_problem = f"the model store (MODEL_STORE) {problem}"

    def _store_readable(self) -> None:
        if self.store_problem is not None:
            log.info("model store readable again after %.1f s", time.monotonic() - self._store_failed_at)
            self.store_problem = None
            metrics.STORE_OK.set(1)

    def _check_unchanged(self, key: tuple[str, str], folder: Path) -> None:
        """A loaded version's folder changed: if a graph or file it names no longer matches its checksum, say so
        once per change. What serves stays the graph loaded and verified."""
        signature = _signature(folder)
        if not signature or signature == self._signatures.get(key):
            return
        self._signatures[key] = signature
        model = self.models[key[0]][key[1]]
        changed = [stored.path for stored in model.metadata.files.stored()
                   if not _matches(folder / stored.path, stored.sha256)]
        if changed:
            metrics.STORE_ERRORS.labels("changed").inc()
            log.warning("model %s version %s: %s changed on disk after it loaded; it keeps serving what it loaded and "
                        "verified (versions are immutable: publish a new version instead; a restarted worker would "
                        "refuse it)", key[0], key[1], ", ".join(changed))

    def _load_one(self, folder: Path) -> None:
        """Load and warm one version. Whatever goes wrong (ONNX Runtime failing at warm-up included) marks this
        version failed with its reason; the loop goes on to the others."""
        name, version = folder.parent.name, folder.name
        before = _signature(folder)
        error: Exception | None = None
        try:
            model = self.model_factory(folder, self.intra_op_threads, self.precision, self.tolerances)
            model.load()
        except Exception as exc:
            error = exc
        if _signature(folder) != before:
            log.info("model %s version %s is still being written (its files changed while it loaded); trying again "
                     "at the next scan", name, version)
            return
        if error is not None:
            self._fail(name, version, folder, error, before)
            return
        self._signatures[(name, version)] = before
        self.models = {**self.models, name: {**self.models.get(name, {}), version: model}}
        self.failures = {key: failure for key, failure in self.failures.items() if key != (name, version)}
        metrics.MODEL_INFO.labels(name, version, model.served_file.sha256, model.precision).set(1)
        metrics.record_baselines(name, version, model.baselines)
        metrics.record_verifications(name, version, model.verifications)
        metrics.MODEL_LOADED.labels(name, version).set(1)
        if model.refusal:
            log.warning("model %s version %s: %s", name, version, model.refusal)
        log.info("loaded model %s version %s (%s, %s) from %s", name, version, model.precision,
                 _verified_words(model), folder)

    def _fail(self, name: str, version: str, folder: Path, exc: Exception, signature: tuple) -> None:
        """The version is failed, with its reason; it is tried again when its folder changes."""
        reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        # Answers name files inside the store, never where the store is on this machine.
        for place, shown in ((folder.resolve(), f"{name}/{version}"), (folder, f"{name}/{version}"),
                             (self.store.resolve(), "<store>"), (self.store, "<store>")):
            reason = reason.replace(str(place), shown)
        self.failures = {**self.failures, (name, version): LoadFailure(name, version, reason, signature)}
        metrics.MODEL_LOAD_FAILURES.labels(name, version).inc()
        metrics.MODEL_LOADED.labels(name, version).set(0)
        log.error("model %s version %s failed to load: %s", name, version, reason, exc_info=exc)

    def _forget(self, name: str, version: str, why: str = "its folder is gone") -> None:
        """The folder is gone (or the model unloaded): new requests no longer get this version; those holding it
        finish on it."""
        model = self.models.get(name, {}).get(version)
        if model is not None:
            models = dict(self.models)
            remaining = {v: m for v, m in models.pop(name).items() if v != version}
            if remaining:
                models[name] = remaining
            self.models = models
            metrics.MODEL_INFO.labels(name, version, model.served_file.sha256, model.precision).set(0)
            log.info("unloaded model %s version %s: %s", name, version, why)
            self._trims_due = 2  # now, and once more after the requests holding it have finished
        self.failures = {key: failure for key, failure in self.failures.items() if key != (name, version)}
        self._signatures.pop((name, version), None)
        metrics.MODEL_LOADED.labels(name, version).set(0)

    def _show_served(self) -> None:
        """convserve_model_served: 1 for each model's serving version, 0 for the one it replaced."""
        for name in set(self._served_shown) | set(self.models):
            served = self.served(name)
            now = served.version if served is not None else None
            before = self._served_shown.get(name)
            if before is not None and before != now:
                metrics.MODEL_SERVED.labels(name, before).set(0)
                log.info("model %s now serves %s (was version %s)", name,
                         f"version {now}" if now else "no version", before)
            if now is not None:
                metrics.MODEL_SERVED.labels(name, now).set(1)
                self._served_shown[name] = now
            else:
                self._served_shown.pop(name, None)

    def _failures_of(self, name: str) -> list[LoadFailure]:
        return [failure for (n, _), failure in self.failures.items() if n == name]

    def _readiness_problem(self) -> str | None:
        if not self.models and not self.unloaded:
            if self.store_problem:
                return f"{self.store_problem}; retrying"
            if self.failures:
                return "no model could be loaded: " + "; ".join(
                    f"{f.name} v{f.version}: {f.reason}" for f in self.failures.values())
            return "the model store (MODEL_STORE) has no models (expected <name>/<version>/model.onnx)"
        not_ready = [f"{m.name} v{m.version}" for versions in self.models.values() for m in versions.values()
                     if not m.ready]
        if not_ready:
            return "not warmed up: " + ", ".join(not_ready)
        if self.default_name in self.unloaded:
            return None  # an operator's choice: the replica keeps serving the other models (and the load call)
        if self.default_name not in self.models:
            return (f"the default model {self.default_name!r} is not loaded (models: {', '.join(self.models)}); "
                    "set DEFAULT_MODEL to one of them")
        if self.served(self.default_name) is None:
            return (f"the default model {self.default_name!r} is pinned to version {self.pins[self.default_name]} "
                    "by MODEL_VERSION_POLICY, which is not loaded")
        return None


def describe_verification(model: OnnxModel) -> dict | None:
    """Each graph checked on this machine: the figures measured here next to export's, and the CPU they are of."""
    if not model.verifications:
        return None
    graphs = {precision: {key: value for key, value in check.describe().items() if key not in ("on", "precision")}
              for precision, check in model.verifications.items()}
    return {"on": verification.cpu(), "graphs": graphs}


def served_figures(model: OnnxModel) -> dict:
    """Calibration, "none of these" and drift baselines as measured at export through the graph that serves."""
    figures = model.metadata.metrics
    served = getattr(figures.quantization, model.precision, None) if figures.quantization else None
    calibration, domain = figures.calibration.model_dump(), figures.domain.model_dump(exclude={"candidates"})
    if served is not None and served.calibration is not None:
        calibration["after"] = served.calibration.model_dump()
    if served is not None and served.own_flagged is not None:
        domain.update(own_flagged=served.own_flagged, other_flagged=served.other_flagged)
    return {"calibration": calibration, "domain": domain, "baselines": model.baselines.model_dump()}


def _verified_words(model: OnnxModel) -> str:
    check = model.verifications.get(model.precision)
    if check is None:
        return "not verified: the version has no verification set"
    measured, exported = check.measured, check.exported
    return (f"verified on {check.images} images in {check.seconds * 1000:.0f} ms: accuracy {measured['accuracy']:.2%}"
            f" (export {exported['accuracy']:.2%}), top-1 agreement {measured['top1_agreement']:.2%}")


def _describe_inspection(metadata: ModelMetadata) -> dict:
    """What /inspect will show for this model: its stages in order, and whether it has class activation maps."""
    stages = [{"name": stage.name, "kind": stage.kind, "shape": stage.shape} for stage in metadata.inspection.stages]
    return {"stages": stages, "class_activation_maps": metadata.inspection.class_maps is not None}


def _give_memory_back() -> None:
    """An unloaded version's sessions are freed, but glibc keeps the pages: without a trim a worker's RSS rose by
    about 30 MiB over its first few version swaps (bench/soak.py), with one it stays flat."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _matches(path: Path, sha256: str) -> bool:
    try:
        return sha256_of(path) == sha256
    except OSError:
        return False


def _signature(folder: Path) -> tuple:
    """What a version folder holds (names, sizes, modification times): enough to see that it changed."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))
    except OSError:
        return ()
