"""gunicorn configuration, used by ``make serve``, the container image and the benchmark alike.

    gunicorn -c python:service.gunicorn_config

Sync workers, one per core: on 2 cores they gave the best throughput and p99 (gthread and gevent were measured and
lost; see README "Performance"). Each worker loads the models itself after fork: ONNX Runtime sessions are not
fork-safe.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading

from service.settings import Settings

settings = Settings.from_env()

wsgi_app = "service:create_app()"
bind = f"{settings.HOST}:{settings.PORT}"
workers = settings.WORKERS
threads = settings.THREADS
worker_class = "gthread" if settings.THREADS > 1 else "sync"
timeout = settings.TIMEOUT
graceful_timeout = settings.GRACEFUL_TIMEOUT
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = settings.LOG_LEVEL.lower()
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
# Request-line and header limits stay at gunicorn's defaults; the body limit is MAX_UPLOAD_BYTES in the app.
forwarded_allow_ips = "*"
# gunicorn's control socket lives in $HOME, which a read-only container does not have; nothing here uses it.
control_socket_disable = True


def on_starting(server):
    """Give the workers one fresh multiprocess metrics folder (a stale one would resurrect old counts)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="convserve-metrics-")
    os.makedirs(folder, exist_ok=True)
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    server.log.info("metrics folder %s", folder)


def post_worker_init(worker):
    """Accept connections only once this worker's models are loaded and warmed, so a restarted worker never
    answers 503 while its siblings serve. On SIGTERM: report not-ready at once, keep serving for DRAIN_SECONDS,
    then stop gracefully."""
    drain_seconds = Settings.from_env().DRAIN_SECONDS
    state = worker.wsgi.extensions.get("convserve")
    if state is not None:
        state.registry.loading_done.wait(timeout=max(1, settings.TIMEOUT - 5))

    def stop():
        worker.alive = False
        try:
            os.write(worker.PIPE[1], b".")  # wake the worker loop out of select()
        except OSError:
            pass

    def begin_shutdown(signum, frame):
        if state is not None:
            state.registry.begin_shutdown()
        if drain_seconds > 0:
            threading.Timer(drain_seconds, stop).start()
        else:
            stop()

    signal.signal(signal.SIGTERM, begin_shutdown)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
