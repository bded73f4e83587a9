"""The inference queue: CPU work runs on a few real threads per worker, behind a bounded, timed, batching queue.

Under the gevent worker (service/worker.py) each connection is a greenlet, so idle and slow clients cost a few kB,
and health probes are answered by the event loop. CPU work (decoding, preprocessing, ONNX Runtime) must not run on
that loop, or one large JPEG would stall every connection: it runs on ``threads`` real threads instead. Pillow and
ONNX Runtime release the GIL while they work, so those threads use the cores while the loop keeps answering.

Jobs wait in FIFO order. Two limits keep the wait bounded and the answer prompt: ``max_queue`` waiting jobs (more
are shed at once, before their body is even read) and ``queue_timeout`` seconds of waiting (then shed). A shed
request gets 503 ``overloaded`` with ``Retry-After``; an accepted one finishes within ``queue_timeout`` + its own
service time.

Dynamic batching: when a thread takes a job that has a batch key, it also takes every waiting job with the same key
(up to ``max_batch`` items) and runs them as one call, so one ONNX Runtime run and one hand-over to the thread serve
them all (README "Performance" has the gain). A lone request is never delayed to wait for company.

The watchdog (under gevent): a call that runs longer than ``watchdog_seconds`` per request in it is stuck (a wedged ONNX
Runtime call, a decoder in a loop); its thread cannot be taken back. The queue turns unhealthy: the stuck call's
requests and every waiting one get 503 ``worker_unhealthy`` at once, new ones too, and ``on_unhealthy`` is told
(service/worker.py then takes the worker out of service to be replaced).

Work smaller than the hand-over (a 32x32 image through lenet: 0.3 ms of work, against about 0.8 ms to hand it to a
thread and back on a 2-core VM) may run on the event loop itself when it would lead alone: the pipeline marks it
``inline`` (service/pipeline.py says when); it then blocks the loop for less than a millisecond.

Real threads may queue too (a gRPC call, service/grpc_server.py): they wait on a real event, and when their turn
comes they run the batch on their own thread (REST's requests batched with them included), with no hand-over; the
event loop watches those batches for the watchdog. Outside gevent (the Flask test client, a sync worker) every
caller is such a thread, with the same limits and batching, so every code path is the same one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from service import contract, metrics
from service.errors import Overloaded, WorkerUnhealthy


class _Stuck(Exception):
    """The call outran the watchdog; it is still running on its thread."""


def gevent_active() -> bool:
    """True inside a gevent worker (sockets monkey-patched), where waiting must yield to the event loop."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


class Job:
    """One request's work. ``state``: waiting → leading (it runs, with any batch it gathered) or batched (a leader
    runs it) → done. Its event is set when it may lead or when its result is ready."""

    __slots__ = ("batch_key", "size", "work", "args", "event", "state", "result", "error", "queued", "patience",
                 "inline")

    def __init__(self, work: Callable, args: tuple, batch_key: Hashable | None, size: int, event,
                 patience: float | None = None, inline: bool = False):
        self.work, self.args, self.batch_key, self.size, self.event = work, args, batch_key, size, event
        self.patience = patience  # how long it may wait, when less than queue_timeout (a gRPC client's deadline)
        self.inline = inline  # small enough to run on the event loop when it leads alone
        self.state = "waiting"
        self.queued = time.perf_counter()
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


class InferenceQueue:
    def __init__(self, threads: int, max_queue: int, queue_timeout: float, max_batch: int = 64,
                 body_budget: int = 1 << 62, watchdog_seconds: float = 0.0):
        self.body_budget = body_budget
        self.watchdog_seconds = watchdog_seconds  # 0: no watchdog
        self.unhealthy: str | None = None  # why this worker is out of service, once an inference got stuck
        self.on_unhealthy: Callable[[str], None] | None = None
        self.held_bytes = 0
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.max_batch = max_batch
        self.free = threads
        self.waiting: deque[Job] = deque()
        self.lock = threading.Lock()  # the event loop and, with gRPC, real threads take it, briefly
        self._running: dict[int, tuple[float, int, list[Job]]] = {}  # batches real threads run themselves
        self._loop_thread = None
        if gevent_active():
            import gevent
            from gevent.event import Event
            from gevent.threadpool import ThreadPool

            self._loop_thread = threading.get_ident()
            self._loop = gevent.get_hub().loop
            self._loop_event = Event
            pool = ThreadPool(threads)
            # Exceptions come back as values: gevent's pool would print every one (a client's bad image too) as a
            # traceback on stderr.
            def execute(work: Callable, args: tuple, requests: int):
                running = pool.spawn(_capture, work, args)
                running.wait(self.watchdog_seconds * requests if self.watchdog_seconds else None)
                if not running.ready():
                    raise _Stuck()
                return _unwrap(running.get())

            self._execute_on_loop = execute
            if watchdog_seconds:
                gevent.spawn(self._watch_real_threads)
        metrics.INFERENCE_THREADS.set(threads)

    def admit(self) -> None:
        """Shed now if the queue is full: called before the request body is read, so a flood costs us nothing."""
        if self.unhealthy:
            raise WorkerUnhealthy()
        if len(self.waiting) >= self.max_queue:
            self._shed(contract.QUEUE_FULL, f"{len(self.waiting)} requests are already waiting for an inference thread "
                                     f"(MAX_QUEUE={self.max_queue}).")

    def hold_bytes(self, size: int) -> int:
        """Count a request body against the worker's budget for bodies held at once (BODY_BUFFER_BYTES), or shed.
        A body alone is always let in: the budget bounds many large bodies at once, not one."""
        with self.lock:
            if self.held_bytes and self.held_bytes + size > self.body_budget:
                held = self.held_bytes
            else:
                self.held_bytes += size
                return size
        self._shed(contract.BODY_BUDGET, f"request bodies held by this worker already take {held / 2**20:.0f} MiB "
                                  f"(BODY_BUFFER_BYTES={self.body_budget / 2**20:.0f} MiB).")

    def release_bytes(self, size: int) -> None:
        with self.lock:
            self.held_bytes -= size

    def _on_loop(self) -> bool:
        """True in a greenlet of the worker's event loop; False on a real thread (a gRPC call) or outside gevent."""
        return self._loop_thread is not None and threading.get_ident() == self._loop_thread

    def _make_event(self):
        return self._loop_event() if self._on_loop() else threading.Event()

    def _wake(self, job: Job) -> None:
        """Set a job's event from whichever thread we are on: a greenlet's event is set on its loop."""
        if isinstance(job.event, threading.Event) or self._on_loop():
            job.event.set()
        else:
            self._loop.run_callback_threadsafe(job.event.set)

    def _execute(self, work: Callable, args: tuple, requests: int, inline: bool = False):
        """A greenlet hands the work to the loop's thread pool (the loop keeps serving) with the watchdog's timeout,
        unless it is ``inline`` (smaller than the hand-over itself: it runs on the loop); a real thread runs it
        itself, watched by _watch_real_threads."""
        if self._on_loop() and not inline:
            return self._execute_on_loop(work, args, requests)
        return work(*args)

    def run(self, work: Callable, *args) -> Any:
        """Run ``work(*args)`` on an inference thread, after at most ``queue_timeout`` of waiting; its result."""
        return self._submit(Job(work, args, None, 1, self._make_event()))

    def run_batched(self, batch_key: Hashable, batch_work: Callable[[list[tuple]], list], *args, size: int = 1,
                    patience: float | None = None, inline: bool = False):
        """Like ``run``, but jobs with the same ``batch_key`` that wait together run as one
        ``batch_work([args, ...])``, which returns one result (or exception instance) per job, in order.
        ``patience``: wait at most this long (if less than queue_timeout), then shed. ``inline``: the work is
        smaller than handing it to a thread; when it runs alone, it runs on the calling greenlet."""
        return self._submit(Job(batch_work, args, batch_key, size, self._make_event(), patience, inline))

    # internals -----------------------------------------------------------------------------------------------------
    def _submit(self, job: Job):
        if self.unhealthy:
            raise WorkerUnhealthy()
        with self.lock:
            if self.free > 0 and not self.waiting:
                self.free -= 1
                job.state = "leading"
            else:
                self.admit()
                self.waiting.append(job)
                metrics.QUEUE_DEPTH.inc()
        if job.state == "waiting":
            patience = self.queue_timeout if job.patience is None else min(self.queue_timeout, job.patience)
            job.event.wait(patience)
            with self.lock:
                if job.state == "waiting":  # no thread took it in time
                    self.waiting.remove(job)
                    metrics.QUEUE_DEPTH.dec()
                    metrics.QUEUE_WAIT.observe(time.perf_counter() - job.queued)
                    self._shed(contract.QUEUE_TIMEOUT, f"no inference thread was free within "
                                                f"QUEUE_TIMEOUT={self.queue_timeout:g} s" + (
                                                    "" if patience == self.queue_timeout else
                                                    f" (or the {patience:.2f} s the client's deadline left)") + ".")
            if job.state in ("batched", "done"):
                job.event.wait()  # started: the leader sets it once the result is in
                return job.outcome()
        metrics.QUEUE_WAIT.observe(time.perf_counter() - job.queued)
        return self._lead(job)

    def _lead(self, job: Job):
        batch = self._gather(job)
        release = True
        watched = not self._on_loop() and self._loop_thread is not None
        if watched:
            self._running[id(job)] = (time.monotonic(), len(batch), batch)
        try:
            if job.batch_key is None:
                job.result = self._execute(job.work, job.args, 1)
            else:
                outcomes = self._execute(job.work, ([member.args for member in batch],), len(batch),
                                         job.inline and len(batch) == 1)
                for member, outcome in zip(batch, outcomes):
                    if isinstance(outcome, BaseException):
                        member.error = outcome
                    else:
                        member.result = outcome
        except _Stuck:
            release = False  # the thread is still in the call: not this queue's to hand on
            self._trip(job, len(batch))
            for member in batch:
                member.error = WorkerUnhealthy()
        except BaseException as error:  # the whole call failed: every member gets the error
            for member in batch:
                member.error = error
        finally:
            if watched and self._running.pop(id(job), None) is None:
                release = False  # the watchdog gave up on this call: its slot is not this queue's any more
            for member in batch[1:]:
                member.state = "done"
                self._wake(member)
            if release:
                self._release()
        return job.outcome()

    def _watch_real_threads(self) -> None:
        """On the event loop: a batch a real thread runs itself (a gRPC call) that outlives the watchdog trips the
        queue as a stuck pool call does; its members are answered now, the thread stays stuck."""
        import gevent

        while not self.unhealthy:
            gevent.sleep(min(1.0, self.watchdog_seconds / 4))
            now = time.monotonic()
            for key, (started, requests, batch) in list(self._running.items()):
                if now - started > self.watchdog_seconds * requests and self._running.pop(key, None):
                    self._answer_unhealthy(batch)
                    self._trip(batch[0], requests)

    def _trip(self, job: Job, requests: int) -> None:
        """Out of service: every waiting request is answered now, and the worker is told."""
        if self.unhealthy:
            return
        model = job.args[0] if job.args else None
        what = f"{model.name} v{model.version}" if hasattr(model, "version") else getattr(job.work, "__name__", "")
        self.unhealthy = (f"an inference ({what}, {requests} request{'s' if requests > 1 else ''}) ran longer than "
                          f"INFERENCE_WATCHDOG_SECONDS={self.watchdog_seconds:g} s per request and is still running; "
                          "this worker is out of service and being replaced")
        metrics.WATCHDOG_TRIPS.inc()
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        metrics.QUEUE_DEPTH.dec(len(waiting))
        self._answer_unhealthy(waiting)
        if self.on_unhealthy is not None:
            self.on_unhealthy(self.unhealthy)

    def _answer_unhealthy(self, jobs: list[Job]) -> None:
        for member in jobs:
            member.error = WorkerUnhealthy()
            member.state = "done"
            self._wake(member)

    def _gather(self, leader: Job) -> list[Job]:
        """The leader and every waiting job with its batch key, oldest first, up to ``max_batch`` items."""
        batch = [leader]
        if leader.batch_key is None:
            return batch
        size = leader.size
        with self.lock:
            for other in list(self.waiting):
                if other.batch_key == leader.batch_key and size + other.size <= self.max_batch:
                    self.waiting.remove(other)
                    metrics.QUEUE_DEPTH.dec()
                    other.state = "batched"
                    metrics.QUEUE_WAIT.observe(time.perf_counter() - other.queued)
                    size += other.size
                    batch.append(other)
        return batch

    def _release(self) -> None:
        """Hand the thread to the oldest waiting job (no barging), or free it."""
        with self.lock:
            if self.waiting:
                successor = self.waiting.popleft()
                metrics.QUEUE_DEPTH.dec()
                successor.state = "leading"
                self._wake(successor)
            else:
                self.free += 1

    @staticmethod
    def _shed(reason: str, detail: str) -> None:
        metrics.SHED.labels(reason).inc()
        raise Overloaded(f"The server is overloaded: {detail} Retry after the time in the Retry-After header, "
                         "or send to another replica.", reason=reason)


def _call(work: Callable, args: tuple, requests: int):
    return work(*args)


def _capture(work: Callable, args: tuple) -> tuple[bool, Any]:
    try:
        return True, work(*args)
    except Exception as error:  # noqa: BLE001 - handed back to the waiting request, which raises it
        return False, error


def _unwrap(outcome: tuple[bool, Any]):
    succeeded, value = outcome
    if not succeeded:
        raise value
    return value
