"""The gunicorn worker convserve runs: gevent for connections, real threads for compute (service/inference_queue.py).

Why gevent: with sync workers, one worker per core, two idle sockets were an outage (both workers blocked in a read)
and health probes queued behind inference. Here every connection is a greenlet: a slow or idle client costs a few kB
until KEEPALIVE (headers) or BODY_TIMEOUT (body) closes it, and /healthz, /readyz and /metrics are answered by the
event loop while inference threads are busy. README "Performance" has the measurements behind the choice.

Differences from gunicorn's stock gevent worker:
- threads are not monkey-patched: the inference pool and the model loader are real threads, and locks are real
  locks, which is what ONNX Runtime and prometheus_client expect;
- a response that says ``Connection: close`` closes the connection (gunicorn otherwise drops that header), so a 408
  for a half-sent body ends the connection instead of reading the rest;
- after a 503 ``overloaded`` for a full queue, the next request on that connection is read SHED_BACKOFF seconds
  later: the 503 itself goes out at once, but a client that ignores Retry-After and resends at once cannot keep the
  event loop busy with rejections (which starved inference and health probes of CPU under a 512-connection flood);
- errors gunicorn answers itself (a bad request line, a URI or headers too long) are JSON like the service's;
- SIGTERM starts a drain: readiness turns 503 at once (gRPC health NOT_SERVING), requests are served for
  DRAIN_SECONDS, then the worker stops accepting (HTTP and gRPC) and finishes every request it accepted;
- with GRPC_PORT, it also serves the Open Inference Protocol over gRPC (service/grpc_server.py) from the same
  models and inference queue;
- when the inference watchdog trips (service/inference_queue.py), the worker stops accepting, answers what it holds, and
  exits with os._exit: a thread stuck inside ONNX Runtime cannot be stopped any other way. The master replaces it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import socket
import sys

import gevent
from gevent import monkey
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

from service import compat, request_context
from service.errors import BACKOFF_ENVIRON_KEY, HTTP_STATUS_CODES

log = logging.getLogger("convserve")


class ServingWorker(GeventWorker):
    def init_process(self):
        # Errors gunicorn answers itself (bad request line, URI or headers too long, broken chunking) get the
        # service's JSON error body too, not an HTML page. Only this worker process is patched.
        compat.replace_worker_error_writer(_JsonErrors())
        _map_large_allocations()
        super().init_process()

    def patch(self):
        monkey.patch_all(thread=False)
        from gevent import socket as cooperative

        self.sockets = [cooperative.socket(s.FAMILY, cooperative.SOCK_STREAM, fileno=s.sock.detach())
                        for s in self.sockets]

    def load_wsgi(self):
        super().load_wsgi()
        self.flask_app = self.wsgi
        self.wsgi = _serve(self.flask_app)
        state = self.app_state
        if state is not None:
            state.pipeline.queue.on_unhealthy = self._out_of_service

    def handle(self, listener, client, addr):
        with request_context.connection():  # small work runs on the loop only while one client is connected
            super().handle(listener, client, addr)

    def run(self):
        state = self.app_state
        self.grpc = None
        if state is not None and state.settings.GRPC_PORT:
            self._start_grpc(state)
        super().run()
        if state is not None and state.pipeline.queue.unhealthy:
            self._exit_stuck()
        if self.grpc is not None:  # its calls in flight finish too
            self.grpc.stop(self.cfg.graceful_timeout).wait(self.cfg.graceful_timeout)

    def _start_grpc(self, state) -> None:
        from service.grpc_server import GrpcServer

        settings = state.settings
        self.grpc = GrpcServer(state)
        try:
            self.grpc.start(settings.HOST, settings.GRPC_PORT, cpu=settings.grpc_cpu(getattr(self, "slot", None)))
        except RuntimeError as exc:
            log.error("convserve: GRPC_PORT=%d cannot be bound on %s (%s): set another port, or 0 for no gRPC",
                      settings.GRPC_PORT, settings.HOST, exc)
            sys.exit(3)  # a boot error: the master stops the server rather than restart the worker in a loop

    @property
    def app_state(self):
        return getattr(self, "flask_app", None) and self.flask_app.extensions.get("convserve")

    def handle_exit(self, sig, frame):
        # Not in the signal handler itself: it may have interrupted code holding a lock the drain needs (a metric
        # write), which deadlocked the worker now and then under load. gunicorn's own handlers do the same.
        gevent.spawn(self._drain)

    def _drain(self):
        if getattr(self, "_draining", False):
            return
        self._draining = True
        state = self.app_state
        if state is not None:
            state.registry.begin_shutdown()
        drain = (state.settings if state is not None else _server_settings()).DRAIN_SECONDS
        gevent.sleep(max(0.0, drain))
        self._stop_accepting()

    def _out_of_service(self, reason: str) -> None:
        log.error("worker %d out of service: %s; it stops accepting, answers what it holds, and exits", self.pid,
                  reason)
        self.app_state.registry.take_out_of_service(reason)
        self._stop_accepting()
        # run() returns once the accepted requests are answered (idle keep-alive connections: KEEPALIVE at most);
        # this bounds it in any case.
        gevent.spawn_later(self.cfg.graceful_timeout, self._exit_stuck)

    def _exit_stuck(self) -> None:
        log.error("worker %d exits: a stuck inference thread cannot be stopped any other way", self.pid)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # not 3 or 4: gunicorn's master stops the whole server for those

    def _stop_accepting(self):
        # run() sees this within a second, closes the listeners, then waits for accepted requests (GRACEFUL_TIMEOUT)
        self.alive = False
        if getattr(self, "grpc", None) is not None:
            self.grpc.stop(self.cfg.graceful_timeout)  # no new calls; those in flight finish


# glibc's malloc serves a block this large or larger with its own mmap, returned to the system when freed. Left to
# itself, it raises that threshold to the largest block freed so far (a 10 MB body), then serves such blocks from the
# heap, where they fragment and stay: one of the three reasons a worker's peak grew flood after flood of 10 MB bodies
# (the others: service/api/__init__.py's teardown, service/inputs.py's request_body; tests/test_hostile.py).
MMAP_THRESHOLD_BYTES = 1 << 20
# Free memory at the top of a heap goes back to the system only past this much. At glibc's 128 KiB (fixed once the
# mmap threshold is set), one 1920x1080 JPEG's buffers on a gRPC or inference thread were given back after every
# request and faulted in again (1-2 % of the CPU in perf); gRPC's server CPU per JPEG fell 3-6 %, REST's 2 %. Each
# heap (one per thread that allocates, at most 8 per core) now keeps up to this much.
TRIM_THRESHOLD_BYTES = 2 << 20
M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -3, -1  # mallopt's parameter numbers, from <malloc.h>


def _map_large_allocations() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        pass


def _server_settings():
    """The settings the master made (service/gunicorn_config.py), which this forked worker inherited."""
    from service.gunicorn_config import settings

    return settings


class _JsonErrors:
    """gunicorn's util module, with write_error answering JSON."""

    def __getattr__(self, name):
        return getattr(util, name)

    @staticmethod
    def write_error(sock, status, reason, message):
        code = HTTP_STATUS_CODES.get(status, "internal" if status >= 500 else "bad_request")
        if status >= 500:
            message = "Internal error; the server log has the details."
        body = json.dumps({"error": {"code": code, "message": message or reason}}).encode()
        request_id = request_context.request_id(None)  # the request could not be parsed: its own ID is unknown
        log.info("gunicorn answered %d %s itself: %s", status, reason, message or reason,
                 extra={"request_id": request_id})
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"X-Content-Type-Options: nosniff\r\n{request_context.REQUEST_ID_HEADER}: {request_id}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        util.write_nonblock(sock, head.encode("latin-1") + body)
        _linger(sock)


def _linger(sock, seconds: float = 1.0, most: int = 1 << 20) -> None:
    """Half-close, then read what the client is still sending before the server closes: closing with unread data
    makes the kernel send a reset, which can destroy the answer before the client reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds)
        drained = 0
        while drained < most and (chunk := sock.recv(65536)):
            drained += len(chunk)
    except OSError:
        pass


class _Backoff:
    """The response iterable, whose close (called by gunicorn once the response is sent) waits before the
    connection's next request is read, when the app asked for it."""

    def __init__(self, response, seconds: float):
        self.response, self.seconds = response, seconds

    def __iter__(self):
        return iter(self.response)

    def close(self):
        if hasattr(self.response, "close"):
            self.response.close()
        gevent.sleep(self.seconds)


def _serve(app):
    """The Flask app as gunicorn calls it: ``Connection: close`` honoured, and a back-off after shedding."""

    def wsgi(environ, start_response):
        def start(status, headers, exc_info=None):
            if any(name.lower() == "connection" and value.lower() == "close" for name, value in headers):
                compat.close_after_response(start_response)
            return start_response(status, headers, exc_info)

        response = app(environ, start)
        backoff = environ.get(BACKOFF_ENVIRON_KEY)
        return _Backoff(response, backoff) if backoff else response

    return wsgi
