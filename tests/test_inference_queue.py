"""The inference queue: FIFO, bounded, timed, batched per model, shedding with a retryable error.

Unit level, in one process; the same behaviour under real gunicorn is tests/test_load.py (the registry:
tests/test_registry.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service import metrics
from service.errors import Overloaded
from service.inference_queue import InferenceQueue
from service.settings import Settings, available_cpus
from tests.helpers import wait_until

SERVICE = Path(__file__).resolve().parent.parent / "service"


# --- the queue --------------------------------------------------------------------------------------------------------

def hold_the_thread(queue: InferenceQueue) -> tuple[threading.Thread, threading.Event]:
    """Occupy the queue's only thread until the returned event is set."""
    release, running = threading.Event(), threading.Event()

    def hold():
        running.set()
        release.wait(5)

    holder = threading.Thread(target=queue.run, args=(hold,))
    holder.start()
    assert running.wait(5)
    return holder, release


def enqueue(queue: InferenceQueue, submit) -> tuple[threading.Thread, list]:
    """Start ``submit()`` on a thread and return once its job waits in the queue."""
    waiting_before, outcome = len(queue.waiting), []

    def target():
        try:
            outcome.append(submit())
        except Exception as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    wait_until(lambda: len(queue.waiting) > waiting_before, "the job to wait in the queue", 10, 0.001)
    return thread, outcome


def test_jobs_start_first_come_first_served():
    queue = InferenceQueue(threads=1, max_queue=10, queue_timeout=5)
    holder, release = hold_the_thread(queue)
    order = []
    waiters = [enqueue(queue, lambda i=i: queue.run(order.append, i))[0] for i in range(5)]
    release.set()
    for thread in [holder, *waiters]:
        thread.join(5)
    assert order == [0, 1, 2, 3, 4]
    assert queue.free == 1 and not queue.waiting


def test_jobs_that_wait_together_for_one_model_run_as_one_batch():
    queue = InferenceQueue(threads=1, max_queue=10, queue_timeout=5, max_batch=5)
    calls = []

    def batch_work(requests):
        calls.append([name for name, _ in requests])
        return [ValueError(f"bad {name}") if name == "b" else name.upper() * size for name, size in requests]

    holder, release = hold_the_thread(queue)
    submitted = [enqueue(queue, lambda n=n, k=k, size=size: queue.run_batched(k, batch_work, n, size, size=size))
                 for n, k, size in (("a", "m1", 1), ("x", "m2", 1), ("b", "m1", 2), ("c", "m1", 2), ("d", "m1", 1))]
    release.set()
    for thread, _ in submitted:
        thread.join(5)
    holder.join(5)
    outcomes = [outcome[0] for _, outcome in submitted]
    assert outcomes[0] == "A" and outcomes[1] == "X" and outcomes[3] == "CC" and outcomes[4] == "D"
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "bad b"  # its own error, nobody else's
    # a, b and c fit in max_batch=5 together; d would make 6 and waits for the next call, after x
    assert calls == [["a", "b", "c"], ["x"], ["d"]]
    assert queue.free == 1 and not queue.waiting


def test_a_failing_batch_call_fails_each_of_its_jobs_and_frees_the_thread():
    queue = InferenceQueue(threads=1, max_queue=10, queue_timeout=5)

    def broken(requests):
        raise RuntimeError("the model broke")

    holder, release = hold_the_thread(queue)
    submitted = [enqueue(queue, lambda: queue.run_batched("m", broken, None)) for _ in range(3)]
    release.set()
    for thread, _ in submitted:
        thread.join(5)
    holder.join(5)
    assert all(isinstance(outcome[0], RuntimeError) for _, outcome in submitted)
    assert queue.run(lambda: "free") == "free"


def shed_count(reason: str) -> float:
    return metrics.SHED.labels(reason)._value.get()


def test_a_full_queue_sheds_at_once_with_a_retryable_error():
    queue = InferenceQueue(threads=1, max_queue=1, queue_timeout=5)
    release, running = threading.Event(), threading.Event()

    def hold():
        running.set()
        release.wait(5)
        return "held"

    results = []
    first = threading.Thread(target=lambda: results.append(queue.run(hold)))
    first.start()
    assert running.wait(5)
    second = threading.Thread(target=lambda: results.append(queue.run(lambda: "queued")))
    second.start()
    wait_until(lambda: queue.waiting, "a job waiting in the queue", 10, 0.001)
    before = shed_count("queue_full")
    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        queue.run(lambda: "never runs")
    assert time.monotonic() - started < 1  # prompt, not after a wait
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert refused.value.reason == "queue_full" and refused.value.retry_after >= 1
    assert "MAX_QUEUE=1" in refused.value.message
    assert shed_count("queue_full") == before + 1
    with pytest.raises(Overloaded):
        queue.admit()  # the check made before a body is read says the same
    release.set()
    first.join(5)
    second.join(5)
    assert results == ["held", "queued"] and not queue.waiting


def test_a_request_that_waits_past_queue_timeout_is_shed():
    queue = InferenceQueue(threads=1, max_queue=10, queue_timeout=0.1)
    holder, release = hold_the_thread(queue)
    before = shed_count("queue_timeout")
    started = time.monotonic()
    with pytest.raises(Overloaded) as refused:
        queue.run(lambda: "never runs")
    waited = time.monotonic() - started
    assert 0.1 <= waited < 1.0
    assert refused.value.reason == "queue_timeout" and "QUEUE_TIMEOUT=0.1" in refused.value.message
    assert shed_count("queue_timeout") == before + 1
    release.set()
    holder.join(5)
    assert queue.run(lambda: 42) == 42  # the thread is free again


def test_errors_raised_by_the_work_reach_the_caller_and_free_the_thread():
    queue = InferenceQueue(threads=1, max_queue=1, queue_timeout=1)
    with pytest.raises(ValueError, match="boom"):
        queue.run(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert queue.run(lambda: "next") == "next"


def test_bodies_held_at_once_are_bounded_but_one_always_fits():
    queue = InferenceQueue(threads=1, max_queue=10, queue_timeout=1, body_budget=100)
    assert queue.hold_bytes(150) == 150  # alone: let in, however large
    with pytest.raises(Overloaded) as refused:
        queue.hold_bytes(1)
    assert refused.value.reason == "body_budget" and "BODY_BUFFER_BYTES" in refused.value.message
    queue.release_bytes(150)
    assert queue.hold_bytes(60) == 60 and queue.hold_bytes(40) == 40
    with pytest.raises(Overloaded):
        queue.hold_bytes(1)
    queue.release_bytes(60)
    queue.release_bytes(40)
    assert queue.held_bytes == 0


def test_inference_threads_default_to_the_cpus_per_worker(tmp_path):
    assert Settings.from_env({}, WORKERS=1).inference_threads == available_cpus()
    assert Settings.from_env({}, WORKERS=available_cpus() * 2).inference_threads == 1
    assert Settings.from_env({}, INFERENCE_THREADS=3).inference_threads == 3
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a CPU limit of 1.5 (Kubernetes: limits.cpu: 1500m)
    assert available_cpus(quota) == min(2, available_cpus())
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == available_cpus()
