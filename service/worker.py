"""The gunicorn worker convserve runs: gevent for connections, real threads for compute (service/scheduler.py).

Why gevent: with sync workers, one worker per core, two idle sockets were an outage (both workers blocked in a read)
and health probes queued behind inference. Here every connection is a greenlet: a slow or idle client costs a few kB
until KEEPALIVE (headers) or BODY_TIMEOUT (body) closes it, and /healthz, /readyz and /metrics are answered by the
event loop while inference threads are busy. README "Performance" has the measurements behind the choice.

Differences from gunicorn's stock gevent worker:
- threads are not monkey-patched: the inference pool and the model loader are real threads, and locks are real
  locks, which is what ONNX Runtime and prometheus_client expect;
- a response that says ``Connection: close`` closes the connection (gunicorn otherwise drops that header), so a 408
  for a half-sent body ends the connection instead of reading the rest;
- SIGTERM starts a drain: readiness turns 503 at once, requests are served for DRAIN_SECONDS, then the worker stops
  accepting and finishes every request it accepted.
"""

from __future__ import annotations

import os

import gevent
from gevent import monkey
from gunicorn.workers.ggevent import GeventWorker

from service.settings import Settings


class ServingWorker(GeventWorker):
    def patch(self):
        monkey.patch_all(thread=False)
        from gevent import socket

        self.sockets = [socket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach()) for s in self.sockets]

    def load_wsgi(self):
        super().load_wsgi()
        self.flask_app = self.wsgi
        self.wsgi = _honour_connection_close(self.flask_app)

    @property
    def app_state(self):
        return getattr(self, "flask_app", None) and self.flask_app.extensions.get("convserve")

    def handle_exit(self, sig, frame):
        if getattr(self, "_draining", False):
            return
        self._draining = True
        state = self.app_state
        if state is not None:
            state.registry.begin_shutdown()
        drain_seconds = Settings.from_env().DRAIN_SECONDS
        gevent.spawn_later(max(0.0, drain_seconds), self._stop_accepting)

    def _stop_accepting(self):
        self.alive = False  # run() closes the listeners, then waits for accepted requests (GRACEFUL_TIMEOUT)
        try:
            os.write(self.PIPE[1], b".")
        except (OSError, AttributeError):
            pass


def _honour_connection_close(app):
    def wsgi(environ, start_response):
        def start(status, headers, exc_info=None):
            if any(name.lower() == "connection" and value.lower() == "close" for name, value in headers):
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:
                    force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wsgi
