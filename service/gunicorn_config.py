"""gunicorn configuration, used by ``make serve``, the container image and the benchmark alike.

    gunicorn -c python:service.gunicorn_config

One worker process per core, each a gevent worker (service/worker.py): connections are greenlets, so slow or idle
clients cost almost nothing and health probes never wait behind inference; decoding and ONNX Runtime run on
INFERENCE_THREADS real threads per worker behind a bounded queue (service/inference_queue.py). Each worker loads the
models itself after fork: ONNX Runtime sessions are not fork-safe.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile

from service import compat
from service.auth import KeyFileError, load_keys
from service.logs import gunicorn_logconfig
from service.settings import Settings, SettingsError, deprecation_warnings, gunicorn_override_problems, stop


def start_checks() -> Settings:
    """Every check made before a worker starts, in one place: the settings' values, the paths they name, gunicorn
    options that would override them, the API keys file, the borrowed server internals and the gRPC port. The first
    that fails stops the start: one line per problem on stderr, exit status 2, no traceback (gunicorn prints one for
    an exception raised while it imports this module; SystemExit passes through)."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        stop(exc.lines)
    if problems := settings.start_problems() + gunicorn_override_problems(sys.argv[1:]):
        stop(problems)
    for warning in deprecation_warnings():
        print(warning, file=sys.stderr)
    try:
        load_keys(settings)
    except KeyFileError as exc:
        stop([f"convserve: {exc}"])
    try:
        compat.check()
    except compat.MissingInternal as exc:
        stop([str(exc)])  # the line names the internal and the package version
    if settings.GRPC_PORT and (problem := _port_taken(settings.HOST, settings.GRPC_PORT)):
        stop([f"convserve: GRPC_PORT={settings.GRPC_PORT} is not free on {settings.HOST} ({problem}): set another "
              "port, or GRPC_PORT=0 for no gRPC"])
    return settings


def _port_taken(host: str, port: int) -> str | None:
    """Why ``port`` cannot be bound, if it cannot. Workers bind it with SO_REUSEPORT, which would let them share it
    silently with another server of this user's: a plain bind here finds any holder first."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror
    return None


# The settings of this server, made once here in the master; the forked workers inherit this very object (through
# serving_app and the worker class), so nothing re-reads the environment behind the master's back.
settings = start_checks()


def serving_app():
    """The app each worker serves, made after fork (ONNX Runtime sessions are not fork-safe) from these settings."""
    from service import create_app

    return create_app(settings)


wsgi_app = "service.gunicorn_config:serving_app()"
bind = f"{settings.HOST}:{settings.PORT}"
workers = settings.WORKERS
worker_class = "service.worker.ServingWorker"
worker_connections = settings.WORKER_CONNECTIONS
timeout = settings.WORKER_HEARTBEAT_TIMEOUT
graceful_timeout = settings.GRACEFUL_TIMEOUT
# Also the time allowed for a request's headers to arrive (gevent.Timeout around the header parse).
keepalive = settings.KEEPALIVE
# The access log is the service's own (service/logs.py): with the request ID, model version and stage timings.
accesslog = None
errorlog = "-"
loglevel = settings.LOG_LEVEL.lower()
if (_json_logs := gunicorn_logconfig(settings.LOG_FORMAT, settings.LOG_LEVEL)) is not None:
    logconfig_dict = _json_logs
# Request-line and header limits stay at gunicorn's defaults; the body limit is MAX_UPLOAD_BYTES in the app.
# Proxy headers (X-Forwarded-*, SCRIPT_NAME) are believed only from these addresses: from anyone, a client could
# rewrite its own path prefix past a proxy's rules.
forwarded_allow_ips = settings.FORWARDED_ALLOW_IPS
# gunicorn's control socket lives in $HOME, which a read-only container does not have; nothing here uses it.
control_socket_disable = True


_created_metrics_folder: list[str] = []
_metrics_folder: list[str] = []


def on_starting(server):
    """Give the workers one fresh multiprocess metrics folder (a stale one would resurrect old counts). One we make
    is private (mode 0700) and removed on exit."""
    folder = settings.PROMETHEUS_MULTIPROC_DIR
    try:
        if not folder:
            folder = tempfile.mkdtemp(prefix="convserve-metrics-")
            _created_metrics_folder.append(folder)
        os.makedirs(folder, exist_ok=True)
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    except OSError as exc:
        stop([f"convserve: PROMETHEUS_MULTIPROC_DIR={shlex.quote(folder)} is not usable: a folder this user can "
              f"create and empty ({exc.strerror})"])
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # for prometheus_client in the workers, which reads it itself
    _metrics_folder[:] = [folder]
    server.log.info("metrics folder %s", folder)


def pre_fork(server, worker):
    """Each worker gets a slot of its own, the lowest one no live worker holds (a replaced worker takes its
    predecessor's): with GRPC_CPU_AFFINITY, the slot names the CPU its gRPC threads keep to (service/worker.py)."""
    taken = {getattr(sibling, "slot", None) for sibling in server.WORKERS.values()}
    worker.slot = next(slot for slot in range(len(taken) + 1) if slot not in taken)


def post_worker_init(worker):
    """Accept connections only once this worker's models are loaded and warmed, so a restarted worker never
    answers 503 while its siblings serve. (SIGTERM and the drain: service/worker.py.)"""
    flask_app = getattr(worker, "flask_app", worker.wsgi)
    state = flask_app.extensions.get("convserve") if hasattr(flask_app, "extensions") else None
    if state is not None:
        state.registry.loading_done.wait(timeout=max(1, settings.WORKER_HEARTBEAT_TIMEOUT - 5))


def child_exit(server, worker):
    """The exited worker's live gauges go; its counters and histograms join the folder's archive (its size stays
    bounded however many workers have lived: service/metrics_files.py)."""
    from service import metrics_files, repository

    metrics_files.compact(_metrics_folder[0], worker.pid)
    repository.forget_worker(_metrics_folder[0], worker.pid)


def on_exit(server):
    for folder in _created_metrics_folder:
        shutil.rmtree(folder, ignore_errors=True)
