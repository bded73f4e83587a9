"""One request's context: its ID and where its time went.

For the access log, the ``Server-Timing`` header, every log line of the request and the stage metrics.

The context lives in a contextvar, so each gevent greenlet (a REST connection) and each gRPC thread has its own, and
log lines written while serving a request carry its ID (``RequestIdFilter``). Inference runs elsewhere (an inference
thread, in a batch that may hold several requests): the pipeline writes each request's timings into the context
object it was handed, never into the thread's.

A request ID comes from the client (``X-Request-ID``, as ingresses and meshes send it; ``x-request-id`` metadata over
gRPC) when it is 1-128 characters of letters, digits and ``._:+/=@-``; anything else is replaced by a fresh one,
so what reaches the logs is always a plain token.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_METADATA = "x-request-id"  # gRPC metadata keys are lower-case
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=@-]{1,128}")
# The stages a request passes, in order, as the Server-Timing header, the access log and the stage histogram
# (convserve_model_stage_duration_seconds) name them. queue .. compute_output are Triton's names for its statistics.
STAGES = ("read_body", "queue", "compute_input", "compute_infer", "compute_output", "encode")
STAGE_DESCRIPTIONS = {
    "read_body": "reading the request body", "queue": "waiting for an inference thread",
    "compute_input": "decode and preprocess", "compute_infer": "the ONNX Runtime call it ran in",
    "compute_output": "shaping the answer", "encode": "encoding the response",
}

_current: ContextVar[RequestContext | None] = ContextVar("convserve_request", default=None)
_open = [0]  # requests this process is serving now (REST and gRPC); real threads change it too, under the lock
_open_lock = threading.Lock()


class RequestContext:
    """What one request did: its ID, the model version that answered it, seconds per stage, the batch size of its
    ONNX Runtime call and, when it was shed, why."""

    __slots__ = ("id", "started", "stages", "starts", "batch_size", "model", "version", "precision", "images",
                 "shed_reason")

    def __init__(self, request_id: str):
        self.id = request_id
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}  # seconds per stage
        self.starts: dict[str, float] = {}  # when each stage began (perf_counter), for the trace's spans
        self.batch_size: int | None = None
        self.model: str | None = None
        self.version: str | None = None
        self.precision: str | None = None
        self.images: int | None = None
        self.shed_reason: str | None = None

    def add(self, stage: str, seconds: float, started: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self.starts.setdefault(stage, started)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stages_ms(self) -> dict[str, float]:
        return {stage: round(self.stages[stage] * 1000, 3) for stage in STAGES if stage in self.stages}

    def server_timing(self, total: float) -> str:
        """The ``Server-Timing`` header (browsers' developer tools chart it): each stage passed, then the total."""
        parts = []
        for stage, milliseconds in self.stages_ms().items():
            part = f"{stage};dur={milliseconds:.3f}"
            if stage == "compute_infer" and self.batch_size:
                part += f';desc="batch of {self.batch_size}"'
            parts.append(part)
        parts.append(f"total;dur={total * 1000:.3f}")
        return ", ".join(parts)

    def summary(self) -> str:
        """The stages as the human-readable access line writes them."""
        words = [f"model={self.model}/{self.version}"] if self.model else []
        for stage, milliseconds in self.stages_ms().items():
            batch = f"(batch {self.batch_size})" if stage == "compute_infer" and self.batch_size else ""
            words.append(f"{stage}={milliseconds:.2f}ms{batch}")
        if self.shed_reason:
            words.append(f"shed={self.shed_reason}")
        return " ".join(words)

    def fields(self) -> dict:
        """The stages as a JSON log line carries them."""
        return {"model": self.model, "version": self.version, "stages_ms": self.stages_ms(),
                "batch_size": self.batch_size, "shed_reason": self.shed_reason}


def request_id(supplied: str | None) -> str:
    """The client's ID when it is a plain token, else a new one."""
    if supplied and _REQUEST_ID.fullmatch(supplied):
        return supplied
    return os.urandom(16).hex()  # 128 random bits (a UUID4 has 122), for a third of what uuid4().hex costs


def begin(supplied: str | None) -> RequestContext:
    """A context for the request now being served on this greenlet or thread; ``end`` closes it."""
    context = RequestContext(request_id(supplied))
    _current.set(context)
    with _open_lock:
        _open[0] += 1
    return context


def current() -> RequestContext | None:
    return _current.get()


def end() -> None:
    if _current.get() is not None:
        _current.set(None)
        with _open_lock:
            _open[0] -= 1


_connections = [0]  # HTTP connections this worker holds open (the event loop alone changes it)


@contextmanager
def connection():
    """Counts an HTTP connection while the worker handles it (service/worker.py)."""
    _connections[0] += 1
    try:
        yield
    finally:
        _connections[0] -= 1


def alone() -> bool:
    """True when this worker holds at most one HTTP connection and serves at most one request: nobody else's
    request is waiting to be read behind this one."""
    return _connections[0] <= 1 and _open[0] <= 1


class RequestIdFilter(logging.Filter):
    """Gives every log record ``request_id``: the ID of the request being served where it was logged, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            context = _current.get()
            record.request_id = context.id if context is not None else None
        return True
