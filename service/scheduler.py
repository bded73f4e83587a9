"""The inference queue: CPU work runs on a few real threads per worker, behind a bounded, timed queue.

Under the gevent worker (service/worker.py) each connection is a greenlet, so idle and slow clients cost a few kB,
and health probes are answered by the event loop. CPU work (decoding, preprocessing, ONNX Runtime) must not run on
that loop, or one large JPEG would stall every connection: it runs on ``threads`` real threads instead. Pillow and
ONNX Runtime release the GIL while they work, so those threads use the cores while the loop keeps answering.

Requests wait for a thread in FIFO order. Two limits keep the wait bounded and the answer prompt:
``max_queue`` waiting requests (more are shed at once, before their body is even read) and ``queue_timeout``
seconds of waiting (then shed). A shed request gets 503 ``overloaded`` with ``Retry-After``; an accepted one
finishes within ``queue_timeout`` + its own service time.

Outside gevent (the Flask test client, a sync worker) the same class runs the work inline on the calling thread,
with the same limits, so every code path is the same one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from service import metrics
from service.errors import Overloaded

T = TypeVar("T")


def gevent_active() -> bool:
    """True inside a gevent worker (sockets monkey-patched), where waiting must yield to the event loop."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


class InferenceQueue:
    def __init__(self, threads: int, max_queue: int, queue_timeout: float):
        self.threads = threads
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.waiting = 0
        self._count_lock = threading.Lock()  # only contended outside gevent, where threads share the queue
        if gevent_active():
            from gevent.event import Event
            from gevent.threadpool import ThreadPool

            self._slots = FairSlots(threads, Event)
            self._execute = ThreadPool(threads).apply
        else:
            self._slots = FairSlots(threads, threading.Event)
            self._execute = _call
        metrics.INFERENCE_THREADS.set(threads)

    def admit(self) -> None:
        """Shed now if the queue is full: called before the request body is read, so a flood costs us nothing."""
        if self.waiting >= self.max_queue:
            self._shed("queue_full", f"{self.waiting} requests are already waiting for an inference thread "
                                     f"(MAX_QUEUE={self.max_queue}).")

    def run(self, work: Callable[..., T], *args) -> T:
        """Wait for a thread (at most ``queue_timeout``), then run ``work(*args)`` on it and return its result."""
        self.admit()
        self._add_waiting(1)
        queued = time.perf_counter()
        try:
            acquired = self._slots.acquire(timeout=self.queue_timeout)
        finally:
            self._add_waiting(-1)
            metrics.QUEUE_WAIT.observe(time.perf_counter() - queued)
        if not acquired:
            self._shed("queue_timeout", f"no inference thread was free within QUEUE_TIMEOUT={self.queue_timeout:g} s.")
        try:
            return self._execute(work, args)
        finally:
            self._slots.release()

    def _add_waiting(self, delta: int) -> None:
        with self._count_lock:
            self.waiting += delta
        metrics.QUEUE_DEPTH.inc(delta)

    @staticmethod
    def _shed(reason: str, detail: str) -> None:
        metrics.SHED.labels(reason).inc()
        raise Overloaded(f"The server is overloaded: {detail} Retry after the time in the Retry-After header, "
                         "or send to another replica.", reason=reason)


class FairSlots:
    """A semaphore that serves waiters first come, first served. A released slot is handed to the oldest waiter
    directly; gevent's and threading's semaphores let the releasing client take it straight back, which starved
    some requests for hundreds of milliseconds at 8 connections."""

    def __init__(self, count: int, make_event: Callable):
        self.free = count
        self.waiters: deque = deque()
        self.make_event = make_event
        self.lock = threading.Lock()

    def acquire(self, timeout: float) -> bool:
        with self.lock:
            if self.free > 0 and not self.waiters:
                self.free -= 1
                return True
            ticket = self.make_event()
            self.waiters.append(ticket)
        ticket.wait(timeout)
        with self.lock:
            if ticket.is_set():
                return True  # granted, possibly just as the wait timed out
            self.waiters.remove(ticket)
            return False

    def release(self) -> None:
        with self.lock:
            if self.waiters:
                self.waiters.popleft().set()
            else:
                self.free += 1


def _call(work: Callable[..., T], args: tuple) -> T:
    return work(*args)
