"""Server overhead at one connection, and where a request's time goes.

Overhead = classify p50 over HTTP (wrk, one connection, the service as deployed) − p50 of the same decode +
preprocessing + ONNX Runtime run in this process (one thread, no HTTP), for the same 32x32 JPEG and model. Each
configuration (the service as shipped, and variants such as INLINE_WORK_SECONDS=0, every request handed to a thread)
runs on its own server, and the in-process runs between them, interleaved; each side is the best of its runs, so a
slow moment of this noisy machine moves neither side alone.

The breakdown per stage comes from the answers' ``Server-Timing`` headers (one sequential client) and, for the same
requests, from the stage histogram's sums (convserve_model_stage_duration_seconds): the two must agree.
"""

from __future__ import annotations

import http.client
import statistics
import time
from pathlib import Path

import requests

from service.model import OnnxModel
from service.preprocessing import decode, normalize

STAGE_METRIC = "convserve_model_stage_duration_seconds"


def in_process_p50_ms(model: OnnxModel, payload: bytes, runs: int = 2000) -> float:
    for _ in range(200):
        model.predict(normalize(decode(payload, model.spec)[None], model.spec))
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        model.predict(normalize(decode(payload, model.spec)[None], model.spec))
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: queue;dur=0.012, compute_infer;dur=0.1;desc="batch of 1", total;dur=1.2`` → {name: ms}."""
    stages = {}
    for part in header.split(","):
        name, *params = (piece.strip() for piece in part.split(";"))
        for param in params:
            if param.startswith("dur="):
                stages[name] = float(param[4:])
    return stages


def stage_sums(server, model: str) -> dict[str, tuple[float, float]]:
    """Per stage of ``model``'s latest version: (sum of seconds, count) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, tuple[float, float]] = {}
    text = requests.get(server.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name != STAGE_METRIC:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model or not sample.name.endswith(("_sum", "_count")):
                continue
            total, count = found.get(sample.labels["stage"], (0.0, 0.0))
            found[sample.labels["stage"]] = ((total + sample.value, count) if sample.name.endswith("_sum")
                                             else (total, count + sample.value))
    return found


def breakdown(server, model: str, payload: bytes, requests_count: int = 300) -> dict:
    """``requests_count`` classify requests one after another on one connection: the median of each stage from
    Server-Timing, and the mean of each stage from the header and from the histogram over the same requests."""
    path = f"/v1/models/{model}/classify"
    before = stage_sums(server, model)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    headers = {"Content-Type": "image/jpeg"}
    timings: list[dict[str, float]] = []
    try:
        for _ in range(requests_count):
            connection.request("POST", path, body=payload, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                timings.append(server_timing(response.getheader("Server-Timing", "")))
    finally:
        connection.close()
    after = stage_sums(server, model)
    stages = [name for name in timings[0] if name != "total"] if timings else []
    result = {"requests": len(timings), "median_ms": {}, "mean_ms_header": {}, "mean_ms_histogram": {}}
    for stage in [*stages, "total"]:
        values = [timing.get(stage, 0.0) for timing in timings]
        result["median_ms"][stage] = round(statistics.median(values), 3)
        result["mean_ms_header"][stage] = round(statistics.fmean(values), 3)
        if stage in after:
            seconds = after[stage][0] - before.get(stage, (0.0, 0.0))[0]
            count = after[stage][1] - before.get(stage, (0.0, 0.0))[1]
            result["mean_ms_histogram"][stage] = round(seconds * 1000 / count, 3) if count else None
    return result


def overhead_cases(wrk, servers: dict, folders: dict[str, Path], payload: bytes, seconds: float,
                   repeats: int = 3) -> dict:
    """For each model and configuration: classify p50 at one connection and the in-process p50 (each the lowest of
    ``repeats`` interleaved runs), their difference, and (as shipped) the stage breakdown."""
    result = {}
    for model, folder in folders.items():
        loaded = OnnxModel(folder, intra_op_threads=1)  # one thread, as each worker runs it
        loaded.load()
        runs: dict[str, list[float]] = {name: [] for name in servers}
        in_process_runs = []
        for _ in range(repeats):
            in_process_runs.append(in_process_p50_ms(loaded, payload))
            for name, server in servers.items():
                url = f"{server.url}/v1/models/{model}/classify"
                wrk.run(url, payload, "image/jpeg", 1, 1)  # warm the connection path
                runs[name].append(wrk.run(url, payload, "image/jpeg", 1, seconds)["p50_ms"])
        shipped = next(iter(servers))
        in_process = min(in_process_runs)
        entry = {"in_process_p50_ms": round(in_process, 3), "in_process_runs": [round(run, 3) for run in
                                                                                 in_process_runs],
                 "configurations": {}}
        for name, p50s in runs.items():
            p50 = min(p50s)
            entry["configurations"][name] = {"classify_p50_ms": round(p50, 3), "runs": p50s,
                                             "overhead_ms": round(p50 - in_process, 3)}
        entry["breakdown"] = breakdown(servers[shipped], model, payload)
        result[model] = entry
        described = ", ".join(f"{name} {c['classify_p50_ms']:.2f} ms (overhead {c['overhead_ms']:.2f} ms)"
                              for name, c in entry["configurations"].items())
        median = entry["breakdown"]["median_ms"]
        print(f"  {model} 32x32 JPEG c=1: in process {in_process:.3f} ms; served {described}", flush=True)
        print(f"  {model} where the time goes (median ms, Server-Timing): "
              + ", ".join(f"{stage} {value:.3f}" for stage, value in median.items()), flush=True)
    return result


def tracing_cost(wrk, work: Path, workers: int, model: str, payload: bytes, content_type: str, seconds: float,
                 connections: int = 8, repeats: int = 5) -> dict:
    """Classify throughput and the server's CPU per request at ``connections`` with tracing off and on (every
    request sampled, its stages as child spans or as events; or one in ten sampled), exported over OTLP/HTTP to a
    receiver in this process that reads and counts what it is sent; interleaved runs, their medians and ratios."""
    from bench.protocols import server_cpu_seconds
    from tests.helpers import GunicornServer
    from tests.otlp import OtlpHttpReceiver

    receiver = OtlpHttpReceiver(decode=False)
    configurations = {"off": {}, "on": {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint},
                      "on, stages as events": {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                               "TRACE_STAGES": "events"},
                      "on, 10% sampled": {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                          "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                          "OTEL_TRACES_SAMPLER_ARG": "0.1"}}
    servers = {}
    for index, (name, settings) in enumerate(configurations.items()):
        (work / f"tracing-{index}").mkdir(exist_ok=True)
        servers[name] = GunicornServer(work / f"tracing-{index}", WORKERS=workers, **settings)
    runs: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}  # server CPU ms per request
    try:
        for server in servers.values():
            server.wait_ready()
        for round_number in range(repeats):
            # every other round in reverse order, so a machine slowing or speeding up through a round favours none
            names = list(servers) if round_number % 2 == 0 else list(servers)[::-1]
            for name in names:
                server = servers[name]
                url = f"{server.url}/v1/models/{model}/classify"
                cpu_before = server_cpu_seconds(server)
                measured = wrk.run(url, payload, content_type, connections, seconds)
                runs[name].append(measured["req_per_s"])
                cpu[name].append((server_cpu_seconds(server) - cpu_before) * 1000 / max(1, measured["requests"]))
    finally:
        for server in servers.values():
            server.stop()
        receiver.close()
    medians = {name: statistics.median(values) for name, values in runs.items()}
    cpu_ms = {name: statistics.median(values) for name, values in cpu.items()}
    # each round's throughput over that round's "off", then the median: the rounds' common drift cancels
    paired = {name: statistics.median(on / off for on, off in zip(values, runs["off"]))
              for name, values in runs.items()}
    recording_us = span_recording_us()
    result = {"model": model, "connections": connections, "runs": runs, "exports_received": receiver.requests,
              "bytes_received": receiver.received_bytes,
              "req_per_s": {name: round(value, 1) for name, value in medians.items()},
              "over_off": {name: round(value, 3) for name, value in paired.items()},
              "recording_us_per_request": recording_us,
              "server_cpu_ms_per_request": {name: round(value, 3) for name, value in cpu_ms.items()},
              "cpu_over_off": {name: round(value / cpu_ms["off"], 3) for name, value in cpu_ms.items()}}
    print(f"  tracing, {model} c={connections}: " + ", ".join(
        f"{name} {value:.0f} req/s (x{result['over_off'][name]}, server CPU {cpu_ms[name]:.3f} ms/request)"
        for name, value in medians.items())
        + f"; {receiver.requests} OTLP exports, {receiver.received_bytes / 2**20:.1f} MiB received", flush=True)
    print(f"  tracing, in process: a request's span and stage spans cost {recording_us['record']:.1f} us to record"
          f" and {recording_us['export_encode']:.1f} us to encode for export"
          f" ({(recording_us['record'] + recording_us['export_encode']) / 10 / cpu_ms['off']:.2f} % of the"
          f" {cpu_ms['off']:.2f} ms of server CPU per request)", flush=True)
    return result


def span_recording_us(requests: int = 250, repeats: int = 7) -> dict:
    """Microseconds per request to record its span and six stage spans (service/tracing.py), and to frame them
    as an OTLP export: the best of ``repeats`` timings, in this process, with a stand-in for the batch processor."""
    import time
    import uuid

    from service import otlp_wire
    from service.request_context import STAGES, RequestContext
    from service.settings import Settings
    from service.tracing import Tracing, _written

    class Queue:
        def __init__(self):
            self.spans = []

        def on_end(self, span):
            self.spans.append(span)

        def shutdown(self):
            pass

    tracing = Tracing(Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}))
    tracing._processor.shutdown()
    queue = tracing._processor = Queue()
    attributes = {"http.request.method": "POST", "http.route": "/v1/models/<name>/classify",
                  "url.path": "/v1/models/convnet/classify", "http.response.status_code": 200}
    envelope = otlp_wire.Envelope({"service.name": "convserve"}, "convserve", "bench")
    record = encode = float("inf")
    for _ in range(repeats):
        contexts = []
        for _ in range(requests):
            context = RequestContext(uuid.uuid4().hex)
            context.model, context.version, context.precision, context.images, context.batch_size = \
                "convnet", "1", "fp32", 1, 2
            for offset, stage in enumerate(STAGES):
                context.add(stage, 1e-4, context.started + offset * 1e-4)
            contexts.append(context)
        queue.spans.clear()
        started = time.perf_counter()
        for context in contexts:
            tracing.record(context, {}, "POST /v1/models/<name>/classify", attributes, False, time.perf_counter())
        record = min(record, (time.perf_counter() - started) / requests)
        started = time.perf_counter()
        envelope.request(_written(queue.spans))
        encode = min(encode, (time.perf_counter() - started) / requests)
    return {"record": round(record * 1e6, 2), "export_encode": round(encode * 1e6, 2)}


def answer_encoding(repeats: int = 5, number: int = 20000) -> dict:
    """Microseconds to encode a one-image classify answer: through its pydantic model, validated (as served), and
    with json.dumps of the same dict, unchecked; the best of ``repeats`` alternating timings of each."""
    import json
    import timeit

    from service.api import schemas

    body = {"model": "lenet", "version": "1", "precision": "int8",
            "predictions": [{"label": "cat", "confidence": 0.5, "in_domain": True, "domain_score": 0.7,
                             "probabilities": {"dog": 0.1, "cat": 0.5, "boat": 0.2, "bird": 0.2}}]}
    model = schemas.ClassifyResponse
    ways = {"validated (pydantic)": lambda: model.model_validate(body).model_dump_json(exclude_unset=True).encode(),
            "unchecked (json.dumps)": lambda: json.dumps(body, separators=(",", ":"), ensure_ascii=False,
                                                         allow_nan=False).encode()}
    assert json.loads(ways["validated (pydantic)"]()) == json.loads(ways["unchecked (json.dumps)"]())
    best = {name: float("inf") for name in ways}
    for _ in range(repeats):
        for name, encode in ways.items():
            best[name] = min(best[name], timeit.timeit(encode, number=number) / number * 1e6)
    result = {name: round(value, 2) for name, value in best.items()}
    print("  encoding a classify answer: " + ", ".join(f"{name} {value:.1f} µs" for name, value in result.items()),
          flush=True)
    return result
