"""The Open Inference Protocol over REST and over gRPC, side by side, at each concurrency.

The same images as binary tensors, the same model and server, one protocol right after the other.

Each row also gives the CPU time the server and the load generator spent per successful answer (they share this
machine's cores). REST is driven by wrk (POST /v2/models/{name}/infer with the binary tensor extension), gRPC by h2load
(nghttp2-client: ModelInfer messages with raw_input_contents, each on its own stream, one in flight per
connection). Both are C load generators, so neither protocol pays for a Python client. h2load cannot read gRPC's
status (it travels in trailers), so the calls that succeeded are counted by the server itself: the delta of
convserve_requests_total{protocol="grpc", status="200"} over the run.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import requests

from service.proto import inference_pb2 as pb

REST_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = os.getenv("BENCH_HEADER_LENGTH")
"""
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(server) -> float:
    """CPU time (user + system) of the gunicorn master and its workers so far."""
    total = 0
    for pid in {server.process.pid, *server.worker_pids()}:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def client_cpu_seconds() -> float:
    """CPU time of this process's finished children (the load generators)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(run, server, *args) -> dict:
    """A load run with the CPU the server and the load generator spent on each successful answer."""
    server_before, client_before = server_cpu_seconds(server), client_cpu_seconds()
    result = run(*args)
    answers = max(1.0, result["ok_per_s"] * args[-1])
    result["server_cpu_ms_per_ok"] = round((server_cpu_seconds(server) - server_before) * 1000 / answers, 3)
    result["client_cpu_ms_per_ok"] = round((client_cpu_seconds() - client_before) * 1000 / answers, 3)
    return result


def rest_body(model: str, image: bytes) -> tuple[bytes, int]:
    """The binary-extension request for one BYTES image: the JSON, then the element; and the JSON's length."""
    element = struct.pack("<I", len(image)) + image
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + element, len(header)


def grpc_frame(model: str, image: bytes) -> bytes:
    """One ModelInfer message, length-prefixed as gRPC frames it on the wire (uncompressed)."""
    message = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1])], raw_input_contents=[struct.pack("<I", len(image)) + image])
    data = message.SerializeToString()
    return b"\0" + struct.pack(">I", len(data)) + data


def grpc_successes(server) -> float:
    from tests.helpers import metric_value

    text = requests.get(server.url + "/metrics", timeout=10).text
    return metric_value(text, "convserve_requests_total", protocol="grpc", route=GRPC_METHOD, status="200")


def run_rest(work: Path, server, model: str, image: bytes, connections: int, seconds: int) -> dict:
    from bench.load import parse_wrk

    body, header_length = rest_body(model, image)
    (work / "rest.body").write_bytes(body)
    (work / "rest.lua").write_text(REST_SCRIPT)
    command = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "2s",
               "--latency", "-s", str(work / "rest.lua"), f"{server.url}/v2/models/{model}/infer"]
    env = dict(os.environ, BENCH_BODY=str(work / "rest.body"), BENCH_HEADER_LENGTH=str(header_length))
    result = parse_wrk(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
    result["ok_per_s"] = (result["requests"] - result["non_2xx"]) / seconds
    return result


def run_grpc(work: Path, server, model: str, image: bytes, connections: int, seconds: int) -> dict:
    (work / "grpc.body").write_bytes(grpc_frame(model, image))
    log = work / "grpc.log"
    log.unlink(missing_ok=True)  # h2load appends to it
    before = grpc_successes(server)
    command = ["h2load", "-c", str(connections), "-m", "1", "-D", str(seconds),
               "-d", str(work / "grpc.body"), "-H", "content-type: application/grpc", "-H", "te: trailers",
               f"--log-file={log}", f"http://{server.grpc_target}{GRPC_METHOD}"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    succeeded = grpc_successes(server) - before
    timings = sorted(int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line.strip())
    sent = len(timings)
    return {"req_per_s": sent / seconds, "requests": sent, "ok_per_s": succeeded / seconds,
            "failed": max(0, int(sent - succeeded)), "p50_ms": statistics.median(timings) if timings else None,
            "p99_ms": timings[int(0.99 * (len(timings) - 1))] if timings else None,
            "h2load": output.strip().splitlines()[-1] if output.strip() else ""}


def alternating_pairs(sides: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """``repeats`` rounds of one run of each side, every other round in reverse order (neither side always goes
    first: this machine's throughput wanders by several per cent from one run to the next); each side's runs."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(repeats):
        for name in (list(sides) if repeat % 2 == 0 else list(sides)[::-1]):
            runs[name].append(sides[name]())
    return runs


def medians_and_ratio(runs: dict[str, list[dict]], over: str, under: str) -> tuple[dict, float | None, list[float]]:
    """Each side's median run, the ratio of the medians' ok/s (``over`` / ``under``) and each pair's ratio, sorted."""
    best = {name: median_run(side) for name, side in runs.items()}
    ratio = best[over]["ok_per_s"] / best[under]["ok_per_s"] if best[under]["ok_per_s"] else None
    pairs = sorted(a["ok_per_s"] / b["ok_per_s"] for a, b in zip(runs[over], runs[under]) if b["ok_per_s"])
    return best, ratio, [round(value, 3) for value in pairs]


def compare(work: Path, server, model: str, images: dict[str, tuple[bytes, str]], connections: list[int],
            seconds: int, repeats: int = 3) -> list[dict]:
    """Rows of REST and gRPC figures per image and concurrency: ``repeats`` pairs of runs, every other pair in
    reverse order, and their medians (this machine's throughput wanders by several per cent from one run to the
    next)."""
    if shutil.which("h2load") is None:
        print("  gRPC rows skipped: h2load is not installed (apt-get install nghttp2-client)", flush=True)
        return []
    rows = []
    for label, (image, _) in images.items():
        for count in connections:
            runs = alternating_pairs({
                protocol: functools.partial(measured, run, server, work, server, model, image, count, seconds)
                for protocol, run in (("rest", run_rest), ("grpc", run_grpc))}, repeats)
            best, ratio, pairs = medians_and_ratio(runs, "grpc", "rest")
            rest, over_grpc = best["rest"], best["grpc"]
            rows.append({"image": label, "connections": count, "rest": rest, "grpc": over_grpc, "runs": runs,
                         "grpc_over_rest": round(ratio, 3) if ratio else None, "ratios_of_pairs": pairs})
            print(f"  /v2 infer {label} c={count}: REST {rest['ok_per_s']:.0f} ok/s p50 {rest['p50_ms']:.2f} ms, "
                  f"CPU/answer server {rest['server_cpu_ms_per_ok']} ms client {rest['client_cpu_ms_per_ok']} ms | "
                  f"gRPC {over_grpc['ok_per_s']:.0f} ok/s p50 {over_grpc['p50_ms'] or 0:.2f} ms, CPU/answer server "
                  f"{over_grpc['server_cpu_ms_per_ok']} ms client {over_grpc['client_cpu_ms_per_ok']} ms "
                  f"({over_grpc['failed']} not OK) | gRPC/REST {ratio or 0:.2f} (pairs {rows[-1]['ratios_of_pairs']})",
                  flush=True)
    return rows


def affinity_rows(work: Path, servers: dict, model: str, images: dict[str, tuple[bytes, str]], connections: list[int],
                  seconds: int, repeats: int = 3) -> list[dict]:
    """gRPC alone on two servers alike but for GRPC_CPU_AFFINITY ("auto" and "off"): ``repeats`` pairs of runs per
    image and concurrency, every other pair in reverse order; the median run of each, and auto / off."""
    if shutil.which("h2load") is None:
        return []
    rows = []
    for label, (image, _) in images.items():
        for count in connections:
            runs = alternating_pairs({
                name: functools.partial(measured, run_grpc, server, work, server, model, image, count, seconds)
                for name, server in servers.items()}, repeats)
            best, ratio, _ = medians_and_ratio(runs, "auto", "off")
            rows.append({"image": label, "connections": count, "runs": runs,
                         **{name: best[name] for name in servers},
                         "auto_over_off": round(ratio, 3) if ratio else None})
            print(f"  gRPC {label} c={count}: GRPC_CPU_AFFINITY=auto {best['auto']['ok_per_s']:.0f} ok/s, server CPU "
                  f"{best['auto']['server_cpu_ms_per_ok']} ms/answer | off {best['off']['ok_per_s']:.0f} ok/s, "
                  f"{best['off']['server_cpu_ms_per_ok']} ms/answer | auto/off {ratio or 0:.2f}", flush=True)
    return rows


def perf_analyzer() -> tuple[list[str], dict[str, str]] | str:
    """Triton's perf_analyzer, as the tritonclient wheel ships it, with the environment it starts in: it links
    libcudart.so.12 (pip's nvidia-cuda-runtime-cu12, put on its library path) and libb64 (apt libb64-0d); it never
    uses a GPU here. Or why it cannot start."""
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.exists():
        return f"{binary} is missing (pip install 'tritonclient[all]')"
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        library = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(library), env.get("LD_LIBRARY_PATH")]))
    except ImportError:
        pass
    started = subprocess.run([str(binary), "--help"], env=env, capture_output=True, text=True)
    if "error while loading shared libraries" in started.stderr:
        return started.stderr.strip().splitlines()[-1] + " (apt libb64-0d; pip nvidia-cuda-runtime-cu12)"
    return [str(binary)], env


def run_perf_analyzer(tool: tuple[list[str], dict[str, str]], work: Path, server, protocol: str, model: str,
                      image: bytes, connections: int, seconds: int) -> dict:
    """perf_analyzer (``tool``: what perf_analyzer() found) at ``connections`` concurrent requests of one BYTES image,
    over ``protocol`` (grpc or http): three measurement windows of seconds/3 each (stability not required: the pairs
    are compared, not each run)."""
    command, env = tool
    element = base64.b64encode(struct.pack("<I", len(image)) + image).decode()  # a serialized BYTES tensor
    (work / "perf_analyzer.json").write_text(json.dumps({"data": [{"image": {"b64": element, "shape": [1]}}]}))
    report = work / f"perf_analyzer-{protocol}.csv"
    report.unlink(missing_ok=True)
    target = server.grpc_target if protocol == "grpc" else server.url.removeprefix("http://")
    window_ms = max(500, seconds * 1000 // 3)
    ran = subprocess.run([*command, "-m", model, "-i", protocol, "-u", target, "--input-data",
                          str(work / "perf_analyzer.json"), "--shape", "image:1", "--concurrency-range",
                          str(connections), "--measurement-interval", str(window_ms), "--max-trials", "3",
                          "--stability-percentage", "100", "-f", str(report)],
                         env=env, capture_output=True, text=True, timeout=60 + 10 * seconds)
    if ran.returncode != 0 or not report.exists():
        raise RuntimeError(f"perf_analyzer failed ({ran.returncode}): {(ran.stdout + ran.stderr)[-600:]}")
    header, row = report.read_text().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(",")))
    return {"ok_per_s": float(values["Inferences/Second"]), "p50_ms": int(values["p50 latency"]) / 1000,
            "p99_ms": int(values["p99 latency"]) / 1000}


def perf_analyzer_rows(tool: tuple[list[str], dict[str, str]], work: Path, server, model: str,
                       images: dict[str, tuple[bytes, str]], connections: list[int], seconds: int,
                       repeats: int = 3) -> list[dict]:
    """gRPC and REST driven by one client, Triton's perf_analyzer: ``repeats`` pairs per image and concurrency,
    every other pair in reverse order; the median run of each and gRPC / REST."""
    rows = []
    for label, (image, _) in images.items():
        for count in connections:
            runs = alternating_pairs({
                protocol: functools.partial(run_perf_analyzer, tool, work, server, protocol, model, image, count,
                                            seconds) for protocol in ("http", "grpc")}, repeats)
            best, ratio, pairs = medians_and_ratio(runs, "grpc", "http")
            rows.append({"image": label, "connections": count, "runs": runs, "rest": best["http"],
                         "grpc": best["grpc"], "grpc_over_rest": round(ratio, 3) if ratio else None,
                         "ratios_of_pairs": pairs})
            print(f"  perf_analyzer {label} c={count}: REST {best['http']['ok_per_s']:.0f} infer/s p50 "
                  f"{best['http']['p50_ms']:.2f} ms | gRPC {best['grpc']['ok_per_s']:.0f} infer/s p50 "
                  f"{best['grpc']['p50_ms']:.2f} ms | gRPC/REST {ratio or 0:.2f} (pairs {rows[-1]['ratios_of_pairs']})",
                  flush=True)
    return rows


def median_run(runs: list[dict]) -> dict:
    """The run with the median successful answers per second."""
    return sorted(runs, key=lambda run: run["ok_per_s"])[len(runs) // 2]


def grpc_overload(server, model: str, image: bytes, outstanding: int = 512, seconds: float = 10.0,
                  deadline_s: float = 2.0) -> dict:
    """``outstanding`` ModelInfer calls kept in flight (each one answered is sent again at once) over 16 channels,
    each with a client deadline of ``deadline_s``: how many were answered OK, shed with RESOURCE_EXHAUSTED (and how
    fast), or ran past their deadline. Python's gRPC client is C underneath; its futures need no thread per call."""
    import threading
    import time

    import grpc

    request = grpc_frame(model, image)[5:]
    channels = [grpc.insecure_channel(server.grpc_target) for _ in range(16)]
    calls = [channel.unary_unary(GRPC_METHOD) for channel in channels]
    outcomes: dict[str, int] = {}
    shed_ms: list[float] = []
    lock, done = threading.Lock(), threading.Event()
    stop_at = time.monotonic() + seconds
    in_flight = [0]

    def send(index: int) -> None:
        started = time.monotonic()
        future = calls[index % len(calls)].future(request, timeout=deadline_s)
        future.add_done_callback(lambda f: finished(f, index, started))

    def finished(future, index: int, started: float) -> None:
        code = future.code()
        with lock:
            outcomes[code.name] = outcomes.get(code.name, 0) + 1
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                shed_ms.append((time.monotonic() - started) * 1000)
            again = time.monotonic() < stop_at
            if not again:
                in_flight[0] -= 1
                if in_flight[0] == 0:
                    done.set()
        if again:
            send(index)

    in_flight[0] = outstanding
    for index in range(outstanding):
        send(index)
    done.wait(seconds + deadline_s + 30)
    for channel in channels:
        channel.close()
    shed_ms.sort()
    return {"outstanding": outstanding, "seconds": seconds, "deadline_s": deadline_s, "outcomes": outcomes,
            "ok_per_s": outcomes.get("OK", 0) / seconds,
            "deadline_exceeded": outcomes.get("DEADLINE_EXCEEDED", 0),
            "shed_p50_ms": round(statistics.median(shed_ms), 2) if shed_ms else None,
            "shed_p99_ms": round(shed_ms[int(0.99 * (len(shed_ms) - 1))], 2) if shed_ms else None}
