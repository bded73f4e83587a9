"""The hostile-input suite over gRPC, against the service as deployed (real gunicorn, two workers).

Crafted messages get the right status code and a message that says what is wrong, never an internal error, a crash or
a restarted worker; a flood is answered RESOURCE_EXHAUSTED (with a retry hint) before any client deadline."""

from __future__ import annotations

import io
import struct
import time

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

from service.proto import inference_pb2 as pb
from tests.helpers import GunicornServer, image_bytes, pattern
from tests.test_faults import stall_request, stall_store  # noqa: F401 - stall_store is a fixture

pytestmark = pytest.mark.slow

METHOD = "/inference.GRPCInferenceService/ModelInfer"
UPLOAD_LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = GunicornServer(tmp_path_factory.mktemp("hostile-grpc"), grpc=True, WORKERS=2, DEFAULT_MODEL="lenet",
                             MODEL_POLL_SECONDS=0, MAX_UPLOAD_BYTES=UPLOAD_LIMIT, QUEUE_TIMEOUT=30)
    running.wait_ready()
    running.initial_workers = running.worker_pids()
    yield running
    running.stop()


def call(server, payload: bytes, method: str = METHOD, timeout: float = 20):
    """The status code and details of one call with ``payload`` as the serialized request."""
    with grpc.insecure_channel(server.grpc_target, options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            channel.unary_unary(method)(payload, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def infer(model: str = "lenet", datatype: str = "BYTES", shape=(1,), raw: list[bytes] | None = None, **fields):
    tensor = pb.ModelInferRequest.InferInputTensor(name="image" if datatype == "BYTES" else "input",
                                                   datatype=datatype, shape=list(shape))
    for key, value in fields.items():
        getattr(tensor, key).CopyFrom(value)
    return pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=raw or []).SerializeToString()


def element(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


CASES = {
    "not a protobuf message": (b"\xff\xff\xff\xff garbage", grpc.StatusCode.INVALID_ARGUMENT, "not a ModelInfer"),
    "no model name": (pb.ModelInferRequest().SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "model_name"),
    "unknown model": (infer(model="nosuch", raw=[element(image_bytes())]), grpc.StatusCode.NOT_FOUND, "nosuch"),
    "no input": (pb.ModelInferRequest(model_name="lenet").SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT,
                 "exactly one input"),
    "unsupported datatype": (infer(datatype="INT64", shape=(1, 3, 32, 32), raw=[b"\0" * 8 * 3072]),
                             grpc.StatusCode.INVALID_ARGUMENT, "INT64"),
    "FP32 of the wrong shape": (infer(datatype="FP32", shape=(1, 3, 8, 8), raw=[b"\0" * 4 * 192]),
                                grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "FP32 shorter than its shape": (infer(datatype="FP32", shape=(2, 3, 32, 32), raw=[b"\0" * 4 * 3072]),
                                    grpc.StatusCode.INVALID_ARGUMENT, "binary_data_size"),
    "FP32 holding NaN": (infer(datatype="FP32", shape=(1, 3, 32, 32),
                               raw=[np.full(3072, np.nan, "<f4").tobytes()]), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "two raw contents for one input": (infer(raw=[element(image_bytes()), b"x"]), grpc.StatusCode.INVALID_ARGUMENT,
                                       "one entry per input"),
    "a truncated BYTES element": (infer(raw=[struct.pack("<I", 1000) + b"abc"]), grpc.StatusCode.INVALID_ARGUMENT,
                                  "Truncated"),
    "more images than the shape": (infer(shape=(1,), raw=[element(image_bytes()) * 2]),
                                   grpc.StatusCode.INVALID_ARGUMENT, "Shape says 1"),
    "not an image": (infer(raw=[element(b"hello, not an image")]), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    "a batch over MAX_IMAGES_PER_REQUEST": (infer(shape=(10**9,), raw=[element(image_bytes())]),
                                      grpc.StatusCode.RESOURCE_EXHAUSTED, "Split the batch"),
    "a decompression bomb": (infer(raw=[element(bomb())]), grpc.StatusCode.RESOURCE_EXHAUSTED, "pixels"),
    "a message over MAX_UPLOAD_BYTES": (infer(raw=[b"\0" * (UPLOAD_LIMIT + 1)]), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        ""),
    "typed contents of the wrong type": (infer(datatype="FP32", shape=(1, 3, 32, 32),
                                               contents=pb.InferTensorContents(int_contents=[1, 2])),
                                         grpc.StatusCode.INVALID_ARGUMENT, "binary_data_size"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_messages_get_the_right_status(server, case):
    payload, expected, words = CASES[case]
    code, details = call(server, payload)
    assert code == expected, (code, details)
    assert words in details, details
    assert "Traceback" not in details and "/work" not in details and "/tmp" not in details


def test_unknown_methods_and_services_are_unimplemented(server):
    for method in ("/inference.GRPCInferenceService/Nope", "/nosuch.Service/Call",
                   "/inference.GRPCInferenceService/ModelStreamInfer"):
        assert call(server, b"", method=method)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_no_worker_died_and_nothing_was_logged_as_a_crash(server):
    for payload, _, _ in CASES.values():  # once more, all of them, then the service as it was
        call(server, payload)
    assert server.worker_pids() == server.initial_workers
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log


def test_a_flood_is_shed_before_any_deadline(tmp_path):
    """200 calls at once with large JPEGs against one inference thread and a queue of 4: each is answered OK or
    RESOURCE_EXHAUSTED (the queue's with retry-after and gRPC's retry pushback), none outlives its deadline (even one
    shorter than QUEUE_TIMEOUT), and health answers throughout."""
    running = GunicornServer(tmp_path, grpc=True, WORKERS=1, DEFAULT_MODEL="lenet", MODEL_POLL_SECONDS=0,
                             INFERENCE_THREADS=1, MAX_QUEUE=4, GRPC_MAX_CALLS=32)
    photo = np.asarray(Image.fromarray(pattern(96, 54, seed=1)).resize((1920, 1080)))
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    payload = infer(raw=[element(buffer.getvalue())])
    try:
        running.wait_ready()
        channels = [grpc.insecure_channel(running.grpc_target) for _ in range(8)]
        started = time.monotonic()
        # half with a deadline shorter than QUEUE_TIMEOUT: they wait in the queue for 40 % of it at most
        calls = [channels[i % 8].unary_unary(METHOD).future(payload, timeout=10 if i % 2 else 0.8)
                 for i in range(200)]
        health = requests.get(running.url + "/healthz", timeout=5)
        outcomes = []
        for future in calls:
            try:
                future.result()
                outcomes.append((grpc.StatusCode.OK, {}))
            except grpc.RpcError as error:
                outcomes.append((error.code(), dict(error.trailing_metadata() or ())))
        elapsed = time.monotonic() - started
        for channel in channels:
            channel.close()
    finally:
        running.stop()
    codes = [code for code, _ in outcomes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
    assert codes.count(grpc.StatusCode.OK) >= 5 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 50, codes
    shed_by_queue = [trailers for code, trailers in outcomes if trailers.get("retry-after")]
    assert shed_by_queue and all(int(t["grpc-retry-pushback-ms"]) > 0 for t in shed_by_queue)
    assert health.status_code == 200
    assert elapsed < 10, f"the flood took {elapsed:.1f} s: some call waited past its deadline"
    assert "Traceback" not in running.log()


def test_a_stuck_grpc_inference_trips_the_watchdog(tmp_path, stall_store):  # noqa: F811
    """A gRPC call runs its batch on its own thread: when that batch outlives INFERENCE_WATCHDOG_SECONDS, the event
    loop's watchdog trips the worker as for REST: it is taken out of service and replaced, and the stuck call ends
    (UNAVAILABLE, retryable, when its worker exits) long before its deadline instead of hanging."""
    from tests.helpers import wait_until

    running = GunicornServer(tmp_path, grpc=True, WORKERS=1, MODEL_STORE=stall_store, DEFAULT_MODEL="lenet",
                             MODEL_POLL_SECONDS=0, INFERENCE_WATCHDOG_SECONDS=2, GRACEFUL_TIMEOUT=5)
    request = stall_request(1e6)["inputs"][0]
    payload = infer(model="stall", datatype="FP32", shape=request["shape"],
                    raw=[np.asarray(request["data"], "<f4").tobytes()])
    try:
        running.wait_ready()
        first = next(iter(running.worker_pids()))
        started = time.monotonic()
        code, details = call(running, payload, timeout=60)
        ended = time.monotonic() - started
        wait_until(lambda: running.worker_pids() and first not in running.worker_pids(), "a new worker", timeout=30)
        running.wait_ready(60)
        assert call(running, infer(raw=[element(image_bytes())]))[0] == grpc.StatusCode.OK
    finally:
        running.stop()
    assert code == grpc.StatusCode.UNAVAILABLE and 2 <= ended < 20, (code, details, ended)
    log = running.log()
    assert f"worker {first} out of service: an inference (stall v1" in log
    assert f"worker {first} exits: a stuck" in log
