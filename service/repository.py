"""The model repository API (Triton's explicit model control): index, load and unload, in every worker at once.

The store stays the one source of truth for what exists; these calls only say what this server serves of it.
- **unload** a model: every worker stops serving it (requests holding it finish) and no scan loads it again, until
  a load. Its versions stay in the index as UNAVAILABLE, "unloaded". An unload lasts until a load or a restart of
  the server (not of one worker: a replaced worker reads it at start).
- **load** a model: every worker scans the store now and loads what it holds for that model (new versions too,
  with MODEL_POLL_SECONDS=0 the only way to pick them up); the call answers once every worker has finished, with
  the reason if any could not serve it.
- MODEL_POLL_SECONDS goes on for every model not unloaded.

Across workers, through the control folder (``repository/`` in the metrics folder, which the gunicorn config makes
fresh for each server): a call writes the new state (the unloaded models and a serial number) to ``state.json``
under a lock; each worker's watcher applies every new serial and writes what it then serves to ``ack-<pid>.json``;
the call waits until every live worker has acknowledged its serial (REPOSITORY_TIMEOUT). Without a metrics folder
(one process: the Flask test client) the state is applied in place.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ModelLoadFailed, ModelNotFound, RepositoryUnavailable

if TYPE_CHECKING:  # the gunicorn master imports this module (forget_worker): keep metrics and models out of it
    from service.registry import ModelRegistry

log = logging.getLogger("convserve")

FOLDER_NAME = "repository"
WATCH_SECONDS = 0.05  # how often a worker looks for a new state: the latency a call adds, for a stat() each time


class Repository:
    def __init__(self, registry: ModelRegistry, metrics_folder: str, timeout: float):
        self.registry = registry
        self.timeout = timeout
        self.folder = Path(metrics_folder) / FOLDER_NAME if metrics_folder else None
        self.applied = 0
        self._stopped = threading.Event()
        self._seen: tuple | None = None
        self._unwritable = False  # logged once until it can write again

    # lifecycle (each worker) -----------------------------------------------------------------------------------------
    def adopt_state(self) -> None:
        """Before the first load: a worker started after an unload must not serve the model either."""
        try:
            state = self._read_state()
        except (OSError, ValueError) as exc:
            log.warning("repository: cannot read the state (%s); starting with every model loadable", exc)
            return
        self.registry.unloaded = dict(state["unloaded"])
        self.applied = state["serial"]

    def start_watching(self) -> threading.Thread:
        thread = threading.Thread(target=self._watch, name="repository-watcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stopped.set()

    # the calls -----------------------------------------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict]:
        entries = self.registry.index()
        return [entry for entry in entries if entry["state"] == "READY"] if ready_only else entries

    def unload(self, name: str) -> None:
        if name not in self.registry.in_store and name not in self.registry.names():
            raise ModelNotFound(f"No model named {name!r} in the store. Models: "
                                f"{', '.join(sorted(set(self.registry.in_store) | set(self.registry.names())))}.")
        at = datetime.now(UTC).isoformat(timespec="seconds")
        self._change(lambda unloaded: {**unloaded, name: f"POST /v2/repository/models/{name}/unload at {at}"})
        log.info("model %s unloaded in every worker by a repository API call", name)

    def load(self, name: str) -> None:
        """Every worker scans now; ModelNotFound if the store has no such model, ModelLoadFailed (with each
        worker's reason) if some worker does not serve it after the scan or a version of it failed to load (a
        version that loaded before then still serves)."""
        reports = self._change(lambda unloaded: {key: why for key, why in unloaded.items() if key != name})
        if not any(name in report["in_store"] for report in reports.values()):
            raise ModelNotFound(f"No model named {name!r} in the store (MODEL_STORE); publish it there first.")
        failed = {pid: why for pid, report in reports.items()
                  if (why := report["models"].get(name, "not in the store as this worker read it"))}
        if failed:
            reasons = "; ".join(sorted(set(failed.values())))
            raise ModelLoadFailed(f"Model {name!r} does not serve in {len(failed)} of {len(reports)} workers: "
                                  f"{reasons}.")
        log.info("model %s loaded in every worker by a repository API call", name)

    # internals -----------------------------------------------------------------------------------------------------
    def _change(self, update) -> dict[int, dict]:
        """Apply ``update`` to the unloaded models in every worker; each live worker's report afterwards."""
        if self.folder is None:
            self.registry.set_unloaded(update(self.registry.unloaded))
            self.registry.rescan()
            return {os.getpid(): self._report()}
        try:
            self.folder.mkdir(exist_ok=True)
            with self._locked():
                state = self._read_state()
                state = {"serial": state["serial"] + 1, "unloaded": update(state["unloaded"])}
                staged = self.folder / f".state-{os.getpid()}.tmp"
                staged.write_text(json.dumps(state))
                os.replace(staged, self.folder / "state.json")
        except OSError as exc:
            raise RepositoryUnavailable(f"The repository state could not be written ({exc.strerror}): the metrics "
                                        "folder (PROMETHEUS_MULTIPROC_DIR) must be writable.") from None
        return self._wait_for(state["serial"])

    def _wait_for(self, serial: int) -> dict[int, dict]:
        deadline = time.monotonic() + self.timeout
        while True:
            reports = self._reports()
            behind = [pid for pid, report in reports.items() if report["serial"] < serial]
            if reports and not behind:
                return reports
            if time.monotonic() > deadline:
                raise RepositoryUnavailable(f"{len(behind)} worker(s) did not apply the change within "
                                            f"REPOSITORY_TIMEOUT={self.timeout:g} s; it applies when they do.")
            time.sleep(WATCH_SECONDS)  # cooperative in a gevent worker

    def _reports(self) -> dict[int, dict]:
        """The acknowledgement of every live worker of this server."""
        reports = {}
        for path in self.folder.glob("ack-*.json"):
            pid = int(path.stem.split("-", 1)[1])
            if not _alive(pid):
                continue
            try:
                reports[pid] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now: read again at the next look
        return reports

    def _watch(self) -> None:
        self.registry.loading_done.wait()  # a worker still loading is not asked: it reads the state when it starts
        self._acknowledge()
        while not self._stopped.wait(WATCH_SECONDS):
            try:
                seen = _identity(self.folder / "state.json")
                if seen == self._seen:
                    continue
                self._seen = seen
                state = self._read_state()
                if state["serial"] > self.applied:
                    self.registry.set_unloaded(state["unloaded"])
                    self.registry.rescan()
                    self.applied = state["serial"]
                    self._acknowledge()
            except (OSError, ValueError) as exc:  # a broken folder must not stop the watching or the serving
                log.warning("repository: reading the state failed (%s); retrying", exc)

    def _acknowledge(self) -> None:
        report = {"serial": self.applied, **self._report()}
        try:
            self.folder.mkdir(exist_ok=True)
            staged = self.folder / f".ack-{os.getpid()}.tmp"
            staged.write_text(json.dumps(report))
            os.replace(staged, self.folder / f"ack-{os.getpid()}.json")
        except OSError as exc:  # the metrics folder gone or full: repository calls then answer 503; serving goes on
            if not self._unwritable:
                log.warning("repository: cannot write this worker's acknowledgement in %s (%s); load and unload "
                            "calls cannot reach it until the folder is writable", self.folder, exc.strerror)
            self._unwritable = True
            return
        self._unwritable = False

    def _report(self) -> dict:
        """What this worker serves after a change: per model, "" when it serves, else why not."""
        registry = self.registry
        models = {}
        for name in set(registry.in_store) | set(registry.names()):
            if name in registry.unloaded:
                models[name] = f"unloaded ({registry.unloaded[name]})"
            else:
                failures = [f"v{f.version}: {f.reason}" for f in registry.failures.values() if f.name == name]
                serves = registry.served(name)
                if failures and serves is not None:
                    failures.append(f"v{serves.version} serves meanwhile")
                models[name] = "; ".join(failures) or ("" if serves is not None else registry.store_problem
                                                       or "no version loaded")
        return {"in_store": sorted(registry.in_store), "models": models}

    def _read_state(self) -> dict:
        if self.folder is None:
            return {"serial": self.applied, "unloaded": dict(self.registry.unloaded)}
        try:
            return json.loads((self.folder / "state.json").read_text())
        except FileNotFoundError:
            return {"serial": 0, "unloaded": {}}

    @contextmanager
    def _locked(self):
        descriptor = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)


def forget_worker(metrics_folder: str, pid: int) -> None:
    """In the master, when a worker has exited: calls stop waiting for it."""
    try:
        (Path(metrics_folder) / FOLDER_NAME / f"ack-{pid}.json").unlink(missing_ok=True)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _identity(path: Path) -> tuple | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns
