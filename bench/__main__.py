"""Benchmark the service as deployed (gunicorn with its config file), driven by wrk and probes from other processes.

Throughput: for each image (a small PNG and a 1920x1080 JPEG) and concurrency (1, 8, 32), req/s, p50 and p99 of
the service as shipped (gevent workers, bounded inference queue) and of the former configuration (sync workers) in
the same run, next to the in-process limit: the same decode + preprocessing + ONNX Runtime work in as many processes
as there are workers, with no HTTP.
/v2 infer over REST (wrk) and gRPC (h2load) side by side, binary tensors, c = 1, 8, 32 (bench/protocols.py).
Hostile load: throughput at 8 connections while 300 connections trickle bodies at 1 byte/s, and health/metrics
latency from outside; 512 connections posting 1920x1080 JPEGs (4x overload): shedding, wrk time-outs and errors,
health/metrics latency. Faults: kill -9 of a worker under load, SIGTERM under load with a drain, and a mixed soak
(bench/soak.py: classify, inspect and /v2 for --soak-seconds, a version published every minute, a key rotated) that
reports RSS, open files and the metrics folder's size at its start and end.
Also single-image ONNX Runtime latency of the INT8 and FP32 graphs, served throughput with PRECISION=int8 and fp32,
inspect latency, and classify throughput after inspect has been used.
Results go to bench/results/bench-<time>.json. Timings are compared only as ratios taken within one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from bench.inprocess import in_process_worker
from bench.load import HealthProbe, Tricklers, Wrk, readiness_honouring_clients
from bench.overhead import answer_encoding, overhead_cases, tracing_cost
from bench.protocols import affinity_rows, compare, grpc_overload, perf_analyzer, perf_analyzer_rows, run_rest
from bench.soak import soak
from service.model import OnnxModel
from service.settings import Settings, available_cpus
from service.verification import cpu
from tests.helpers import GunicornServer, encode, metric_value, pattern

REPO = Path(__file__).resolve().parent.parent

SYNC_BASELINE = ("--worker-class", "sync")  # the configuration before the gevent worker, kept as a baseline


def bench_images() -> dict[str, tuple[bytes, str]]:
    photo = np.asarray(Image.fromarray(pattern(96, 54, seed=1)).resize((1920, 1080), Image.Resampling.BICUBIC))
    return {
        "32x32 PNG": (encode(pattern(32, 32, seed=2), "PNG"), "image/png"),
        "1920x1080 JPEG": (encode(photo, "JPEG", quality=90), "image/jpeg"),
    }


def in_process_limit(folder: Path, payload: bytes, processes: int, seconds: float) -> float:
    """Images/s for decode + preprocess + ONNX Runtime in ``processes`` processes at once, no HTTP."""
    start = time.time() + 2.0
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        counts = pool.map(in_process_worker, [(str(folder), payload, seconds, start)] * processes)
    return sum(counts) / seconds


def single_image_latency_ms(folder: Path, precision: str = "int8", repeats: int = 500) -> tuple[float, str]:
    """Median ONNX Runtime time of one image on one thread, and the precision that ran."""
    model = OnnxModel(folder, intra_op_threads=1, precision=precision)
    model.load()
    return model.time_one_image(repeats, warm_runs=50) * 1000, model.precision


def verification_seconds(folder: Path) -> dict:
    """What verifying each graph costs at load, one thread (each worker's share), and whether it passed here."""
    result = {}
    for precision in ("int8", "fp32"):
        model = OnnxModel(folder, intra_op_threads=1, precision=precision)
        model.load()
        for checked, check in model.verifications.items():
            result.setdefault(checked, {"seconds": round(check.seconds, 3), "passed": check.passed,
                                        "accuracy": check.measured["accuracy"],
                                        "exported_accuracy": check.exported["accuracy"]})
    return result


def latency_by_precision(folder: Path) -> dict:
    """INT8 and FP32 one after the other, twice each (interleaved, since this machine is noisy): medians and ratio."""
    runs = {"int8": [], "fp32": []}
    for _ in range(2):
        for precision in runs:
            milliseconds, served = single_image_latency_ms(folder, precision)
            runs[precision].append(milliseconds)
            if served != precision:  # the version has no INT8 graph
                runs.pop("int8", None)
                break
    result = {precision: round(min(values), 3) for precision, values in runs.items()}
    if "int8" in result:
        result["fp32_over_int8"] = round(result["fp32"] / result["int8"], 2)
    return result


def latest_version(store: Path, name: str) -> Path:
    return max((p for p in (store / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=6, help="duration of each wrk run, in whole seconds")
    parser.add_argument("--workers", type=int, default=Settings.from_env().WORKERS,
                        help="gunicorn workers, for the service and the baseline (default: WORKERS, as deployed)")
    parser.add_argument("--connections", default="1,8,32", help="comma-separated wrk connection counts")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--soak-seconds", type=float, default=600, help="length of the mixed soak (0: none)")
    parser.add_argument("--only-soak", action="store_true", help="run the soak alone")
    parser.add_argument("--only-overhead", action="store_true",
                        help="run the server overhead at one connection (and its stage breakdown) alone")
    parser.add_argument("--only-protocols", action="store_true",
                        help="run the REST vs gRPC comparison of /v2 infer alone")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    store = REPO / "model_store"
    folder = latest_version(store, args.model)
    work = Path(tempfile.mkdtemp(prefix="convserve-bench-"))
    wrk = Wrk(work)
    images = bench_images()
    if args.only_soak:
        (work / "soak").mkdir()
        results = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                   "machine": {"cpus": available_cpus(), **cpu(), "python": platform.python_version()},
                   "workers": args.workers, "soak": soak(work / "soak", store, images["32x32 PNG"][0], args.workers,
                                                         args.soak_seconds)}
        shutil.rmtree(work, ignore_errors=True)
        return write_results(results, args.out)
    if args.only_overhead:
        results = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                   "machine": {"cpus": available_cpus(), **cpu(), "python": platform.python_version()},
                   "workers": args.workers, "overhead": overhead(work, wrk, store, args)}
        shutil.rmtree(work, ignore_errors=True)
        return write_results(results, args.out)
    if args.only_protocols:
        results = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                   "machine": {"cpus": available_cpus(), **cpu(), "python": platform.python_version()},
                   "model": {"name": args.model, "version": folder.name}, "workers": args.workers,
                   "protocols": protocol_cases(work, images, args)}
        shutil.rmtree(work, ignore_errors=True)
        return write_results(results, args.out)
    results = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": {"cpus": available_cpus(), **cpu(), "python": platform.python_version()},
               "model": {"name": args.model, "version": folder.name}, "workers": args.workers,
               "seconds_per_case": args.seconds, "cases": [], "onnx_latency_ms": {}, "inspect": {}}
    machine = results["machine"]
    features = ", ".join(name for name, present in (machine["features"] or {}).items() if present) or "unknown"
    print(f"  this machine: {machine['processor']}, {machine['cpus']} CPUs, features: {features}; ONNX Runtime "
          f"{machine['onnxruntime']} (every figure below is this machine's)", flush=True)
    results["verification"] = {}
    for name in sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        results["onnx_latency_ms"][name] = latency_by_precision(latest_version(store, name))
        print(f"  {name}: one image on one thread {results['onnx_latency_ms'][name]} ms", flush=True)
        results["verification"][name] = verification_seconds(latest_version(store, name))
        print(f"  {name}: verification at load {results['verification'][name]}", flush=True)
    limits = {label: in_process_limit(folder, payload, args.workers, args.seconds)
              for label, (payload, _) in images.items()}
    for folder in ("served", "baseline", "drain"):
        (work / folder).mkdir()
    served = GunicornServer(work / "served", WORKERS=args.workers)
    baseline = GunicornServer(work / "baseline", gunicorn_args=SYNC_BASELINE, WORKERS=args.workers)
    try:
        served.wait_ready()
        baseline.wait_ready()
        results["cases"] = throughput(wrk, served, baseline, images, limits, args)
        results["inspect"], results["classify_after_inspect"] = inspect_cases(wrk, served, images, args)
        results["slow_clients"] = slow_clients(wrk, served, images, args)
        results["overload"] = overload(wrk, served, images, args)
        results["kill_9"] = kill_worker_under_load(wrk, served, images, args)
    finally:
        served.stop()
        baseline.stop()
    results["overhead"] = overhead(work, wrk, store, args)
    results["protocols"] = protocol_cases(work, images, args)
    results["precision"] = served_precisions(work, wrk, images, args)
    results["sigterm_drain"] = sigterm_under_load(work, images, args)
    if args.soak_seconds > 0:
        (work / "soak").mkdir()
        results["soak"] = soak(work / "soak", store, images["32x32 PNG"][0], args.workers, args.soak_seconds)
    shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    return write_results(results, args.out)


def overhead(work: Path, wrk: Wrk, store: Path, args) -> dict:
    """Server overhead at one connection for each model (bench/overhead.py): as shipped, and with every request
    handed to an inference thread (INLINE_WORK_SECONDS=0), on two servers side by side; then what tracing costs."""
    configurations = {"as shipped": {}, "always a thread": {"INLINE_WORK_SECONDS": "0"}}
    servers = {}
    for index, (name, settings) in enumerate(configurations.items()):
        (work / f"overhead-{index}").mkdir(exist_ok=True)
        servers[name] = GunicornServer(work / f"overhead-{index}", WORKERS=args.workers, **settings)
    payload = encode(pattern(32, 32, seed=2), "JPEG", quality=90)
    folders = {name: latest_version(store, name) for name in ("lenet", "convnet")}
    try:
        for server in servers.values():
            server.wait_ready()
        cases = overhead_cases(wrk, servers, folders, payload, args.seconds)
    finally:
        for server in servers.values():
            server.stop()
    cases["answer_encoding_us"] = answer_encoding()
    png, content_type = bench_images()["32x32 PNG"]
    cases["tracing"] = tracing_cost(wrk, work, args.workers, args.model, png, content_type, args.seconds)
    return cases


def protocol_cases(work: Path, images, args) -> dict:
    """/v2 infer over REST and gRPC on one server (gevent workers, as shipped), the same images as binary tensors."""
    (work / "protocols").mkdir(exist_ok=True)
    server = GunicornServer(work / "protocols", grpc=True, WORKERS=args.workers)
    try:
        server.wait_ready()
        rows = compare(work / "protocols", server, args.model, images, connections_of(args), args.seconds)
        concurrent = [count for count in connections_of(args) if count > 1]
        affinity = grpc_affinity_cases(work, server, images, concurrent, args)
        tool = perf_analyzer()
        if isinstance(tool, str):
            print(f"  perf_analyzer rows skipped: {tool}", flush=True)
            triton_client = []
        else:  # the client Triton's users measure with, the same one for both protocols
            triton_client = perf_analyzer_rows(tool, work / "protocols", server, args.model, images, concurrent,
                                               args.seconds)
        photo = images["1920x1080 JPEG"][0]
        seconds = max(10, args.seconds)
        with HealthProbe(server.port, settle_s=2.0) as probe:  # the same flood over REST first, wrk's 2 s time-out
            rest_flood = run_rest(work / "protocols", server, args.model, photo, 512, seconds)
        rest_flood["health"] = probe.summary()
        print(f"  REST overload, 512 connections, 1920x1080 JPEG, 2 s time-out: {rest_flood['ok_per_s']:.0f} ok/s, "
              f"{rest_flood['non_2xx']} shed, {rest_flood['timeouts']} time-outs; /healthz p99 "
              f"{rest_flood['health']['/healthz']['p99_ms']} ms", flush=True)
        with HealthProbe(server.port, settle_s=2.0) as probe:
            flood = grpc_overload(server, args.model, photo, seconds=float(seconds))
        flood["health"] = probe.summary()
        flood["rest"] = rest_flood
        print(f"  gRPC overload, {flood['outstanding']} calls in flight, 1920x1080 JPEG, {flood['deadline_s']:g} s "
              f"deadline: {flood['outcomes']}; shed p50 {flood['shed_p50_ms']} ms, p99 {flood['shed_p99_ms']} ms; "
              f"/healthz p99 {flood['health']['/healthz']['p99_ms']} ms", flush=True)
        return {"rows": rows, "overload": flood, "grpc_cpu_affinity": affinity, "perf_analyzer": triton_client}
    finally:
        server.stop()


def grpc_affinity_cases(work: Path, server: GunicornServer, images, counts: list[int], args) -> dict:
    """Why GRPC_CPU_AFFINITY: gRPC on the server above against one with it off, at 8 and 32 connections."""
    pinned = Settings(WORKERS=args.workers).grpc_cpu(0) is not None
    if not pinned:  # on this machine "auto" does not pin: both servers would be the same
        print("  GRPC_CPU_AFFINITY: the workers do not have CPUs to themselves here; nothing to compare", flush=True)
        return {"pinned": False, "rows": []}
    unpinned = GunicornServer(work / "protocols", grpc=True, WORKERS=args.workers, GRPC_CPU_AFFINITY="off")
    try:
        unpinned.wait_ready()
        rows = affinity_rows(work / "protocols", {"auto": server, "off": unpinned}, args.model, images, counts,
                             args.seconds)
    finally:
        unpinned.stop()
    return {"pinned": True, "rows": rows}


def connections_of(args) -> list[int]:
    return [int(count) for count in args.connections.split(",")]


def write_results(results: dict, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return 0


def classify_url(server: GunicornServer, model: str) -> str:
    return f"{server.url}/v1/models/{model}/classify"


def throughput(wrk: Wrk, served, baseline, images, limits, args) -> list[dict]:
    """Each case runs on the served configuration, then at once on the baseline: a ratio of neighbours."""
    cases = []
    for label, (payload, content_type) in images.items():
        for count in (int(c) for c in args.connections.split(",")):
            now = wrk.run(classify_url(served, args.model), payload, content_type, count, args.seconds)
            before = wrk.run(classify_url(baseline, args.model), payload, content_type, count, args.seconds)
            limit = limits[label]
            case = {"image": label, "connections": count, "in_process_limit": round(limit, 1), **now,
                    "ratio_to_limit": round(now["req_per_s"] / limit, 3),
                    "baseline": before, "ratio_to_baseline": round(now["req_per_s"] / before["req_per_s"], 3)}
            cases.append(case)
            print(f"  {label:15s} c={count:<3d} {now['req_per_s']:7.1f} req/s (sync baseline "
                  f"{before['req_per_s']:7.1f}, x{case['ratio_to_baseline']:.2f})  p99 {now['p99_ms']:7.2f} ms "
                  f"(baseline {before['p99_ms']:7.2f})  limit {limit:7.1f}/s  ratio {case['ratio_to_limit']:.2f}",
                  flush=True)
    return cases


def served_precisions(work: Path, wrk: Wrk, images, args) -> dict:
    """Small images at 8 connections, served with PRECISION=int8 (the default) and PRECISION=fp32, interleaved."""
    payload, content_type = images["32x32 PNG"]
    servers = {}
    for precision in ("int8", "fp32"):
        (work / precision).mkdir()
        servers[precision] = GunicornServer(work / precision, WORKERS=args.workers, PRECISION=precision)
    try:
        for server in servers.values():
            server.wait_ready()
        runs = {precision: [] for precision in servers}
        for _ in range(2):
            for precision, server in servers.items():
                runs[precision].append(wrk.run(classify_url(server, args.model), payload, content_type, 8,
                                               args.seconds)["req_per_s"])
    finally:
        for server in servers.values():
            server.stop()
    result = {precision: round(max(values), 1) for precision, values in runs.items()}
    result["int8_over_fp32"] = round(result["int8"] / result["fp32"], 2)
    print(f"  32x32 PNG c=8: INT8 {result['int8']} req/s, FP32 {result['fp32']} req/s "
          f"(x{result['int8_over_fp32']})", flush=True)
    return result


def inspect_cases(wrk: Wrk, server, images, args) -> tuple[dict, dict]:
    small, small_type = images["32x32 PNG"]
    inspect = {}
    for name in sorted(p.name for p in (REPO / "model_store").iterdir() if p.is_dir() and not p.name.startswith(".")):
        timings = []
        for _ in range(30):
            started = time.perf_counter()
            response = requests.post(f"{server.url}/v1/models/{name}/inspect", data=small,
                                     headers={"Content-Type": small_type}, timeout=30)
            timings.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
        inspect[name] = {"p50_ms": round(statistics.median(timings[5:]), 2), "max_ms": round(max(timings[5:]), 2)}
    before = wrk.run(classify_url(server, args.model), small, small_type, 8, args.seconds)
    after = wrk.run(classify_url(server, args.model), small, small_type, 8, args.seconds)
    return inspect, {"req_per_s_before": before["req_per_s"], "req_per_s_after": after["req_per_s"],
                     "ratio": round(after["req_per_s"] / before["req_per_s"], 3)}


def slow_clients(wrk: Wrk, server, images, args, trickling: int = 300) -> dict:
    """Throughput at 8 connections with and without 300 connections trickling a body at 1 byte/s."""
    payload, content_type = images["32x32 PNG"]
    url = classify_url(server, args.model)
    without = wrk.run(url, payload, content_type, 8, args.seconds)
    with Tricklers(server.port, trickling) as tricklers, HealthProbe(server.port) as probe:
        time.sleep(1.0)
        loaded = wrk.run(url, payload, content_type, 8, args.seconds)
        reopened = tricklers.reopened
    result = {"trickling_connections": trickling, "without": without, "with": loaded,
              "ratio": round(loaded["req_per_s"] / without["req_per_s"], 3), "health": probe.summary(),
              "trickling_closed_by_server": reopened}
    print(f"  slow clients: {loaded['req_per_s']:.1f} req/s with {trickling} trickling connections vs "
          f"{without['req_per_s']:.1f} without (x{result['ratio']:.2f}); /healthz p99 "
          f"{result['health']['/healthz']['p99_ms']} ms", flush=True)
    return result


def overload(wrk: Wrk, server, images, args, connections: int = 512) -> dict:
    """512 connections posting 1920x1080 JPEGs: what is shed, what times out, and how health answers meanwhile."""
    payload, content_type = images["1920x1080 JPEG"]
    before = requests.get(f"{server.url}/metrics", timeout=10).text
    with HealthProbe(server.port, settle_s=1.0) as probe:
        loaded = wrk.run(classify_url(server, args.model), payload, content_type, connections,
                         max(args.seconds, 10))
    after = requests.get(f"{server.url}/metrics", timeout=10).text
    shed = {reason: metric_value(after, "convserve_shed_total", reason=reason)
            - metric_value(before, "convserve_shed_total", reason=reason) for reason in ("queue_full", "queue_timeout")}
    result = {"connections": connections, "wrk": loaded, "shed": shed, "health": probe.summary()}
    health = result["health"]
    print(f"  overload c={connections}: {loaded['req_per_s']:.1f} req/s, {loaded['non_2xx']} shed (503), "
          f"{loaded['timeouts']} time-outs, {loaded['connection_errors']} connection errors; p99 /healthz "
          f"{health['/healthz']['p99_ms']} /readyz {health['/readyz']['p99_ms']} /metrics "
          f"{health['/metrics']['p99_ms']} ms after the first second; worst in the first second (the connections "
          f"arriving): {max(health[p]['first_seconds']['max_ms'] or 0 for p in ('/healthz', '/readyz', '/metrics'))}"
          " ms", flush=True)
    return result


def kill_worker_under_load(wrk: Wrk, server, images, args) -> dict:
    """kill -9 one worker while 8 connections classify: what failed, and how soon the replacement is ready."""
    payload, content_type = images["32x32 PNG"]
    time.sleep(3)  # let the previous case's connections and queue clear
    counted_before = metric_value(requests.get(f"{server.url}/metrics", timeout=10).text, "convserve_requests_total")
    outcome = {}
    load = threading.Thread(target=lambda: outcome.update(
        wrk.run(classify_url(server, args.model), payload, content_type, 8, 8)))
    load.start()
    time.sleep(2.0)
    victim = sorted(server.worker_pids())[0]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while victim in server.worker_pids() or not server.all_workers_ready():
        time.sleep(0.02)
        if time.monotonic() - killed > 60:
            break
    ready_after = time.monotonic() - killed
    load.join(60)
    counted_after = metric_value(requests.get(f"{server.url}/metrics", timeout=10).text, "convserve_requests_total")
    result = {"requests": outcome.get("requests"), "failed": outcome.get("non_2xx", 0)
              + outcome.get("connection_errors", 0) + outcome.get("timeouts", 0), "wrk": outcome,
              "ready_again_s": round(ready_after, 2), "counters_kept": counted_after >= counted_before}
    print(f"  kill -9 under load: {result['failed']} of {result['requests']} failed, replacement ready in "
          f"{result['ready_again_s']} s, counters kept: {result['counters_kept']}", flush=True)
    return result


def sigterm_under_load(work: Path, images, args, drain_seconds: float = 5) -> dict:
    """SIGTERM while 8 keep-alive clients classify; they stop 3 s after /readyz turns 503, like a load balancer."""
    payload, content_type = images["32x32 PNG"]
    server = GunicornServer(work / "drain", WORKERS=args.workers, DRAIN_SECONDS=drain_seconds)
    try:
        server.wait_ready()
        result = readiness_honouring_clients(server.url, payload, content_type, 8,
                                             during=lambda: (time.sleep(2), server.process.send_signal(signal.SIGTERM)),
                                             notice_delay_s=3)
        result["exit_code"] = server.process.wait(timeout=60)
    finally:
        server.stop()
    print(f"  SIGTERM with DRAIN_SECONDS={drain_seconds:g}: {result['served_after_not_ready']} requests served "
          f"after readiness turned 503, {result['failed']} failed, exit code {result['exit_code']}", flush=True)
    return {"drain_seconds": drain_seconds, **result}


def print_table(results: dict) -> None:
    machine = results["machine"]
    features = ", ".join(name for name, present in (machine["features"] or {}).items() if present) or "unknown"
    print(f"\n{results['model']['name']} v{results['model']['version']}, {results['workers']} workers, "
          f"{machine['cpus']} CPUs ({machine['processor']}; {features}; ONNX Runtime {machine['onnxruntime']}), "
          f"{results['seconds_per_case']} s per case\n")
    print("| image | connections | req/s | sync baseline req/s | ratio to baseline | p50 ms | p99 ms | "
          "baseline p99 ms | in-process limit img/s | ratio to limit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in results["cases"]:
        print(f"| {case['image']} | {case['connections']} | {case['req_per_s']:.0f} | "
              f"{case['baseline']['req_per_s']:.0f} | {case['ratio_to_baseline']:.2f} | {case['p50_ms']:.2f} | "
              f"{case['p99_ms']:.2f} | {case['baseline']['p99_ms']:.2f} | {case['in_process_limit']:.0f} | "
              f"{case['ratio_to_limit']:.2f} |")
    slow, over = results["slow_clients"], results["overload"]
    print("\n| hostile load | req/s | ratio | wrk time-outs | connection errors | 503 shed | "
          "/healthz p99 ms | /readyz p99 ms | /metrics p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, row, ratio, health in (
            (f"8 connections + {slow['trickling_connections']} trickling 1 byte/s", slow["with"], slow["ratio"],
             slow["health"]),
            (f"{over['connections']} connections, 1920x1080 JPEG", over["wrk"], None, over["health"])):
        print(f"| {label} | {row['req_per_s']:.0f} | {'' if ratio is None else f'{ratio:.2f}'} | {row['timeouts']} | "
              f"{row['connection_errors']} | {row['non_2xx']} | {health['/healthz']['p99_ms']} | "
              f"{health['/readyz']['p99_ms']} | {health['/metrics']['p99_ms']} |")
    if results.get("protocols"):
        print("\n| /v2 infer, binary tensors | connections | REST ok/s | REST p50 ms | gRPC ok/s | gRPC p50 ms | "
              "gRPC not OK | gRPC / REST |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in results["protocols"]["rows"]:
            rest, over_grpc = row["rest"], row["grpc"]
            print(f"| {row['image']} | {row['connections']} | {rest['ok_per_s']:.0f} | {rest['p50_ms']:.2f} | "
                  f"{over_grpc['ok_per_s']:.0f} | {over_grpc['p50_ms']:.2f} | {over_grpc['failed']} | "
                  f"{row['grpc_over_rest']:.2f} |")
        for row in results["protocols"].get("perf_analyzer", []):
            print(f"perf_analyzer {row['image']} c={row['connections']}: REST {row['rest']['ok_per_s']:.0f}, gRPC "
                  f"{row['grpc']['ok_per_s']:.0f} infer/s (x{row['grpc_over_rest']:.2f})")
        for row in results["protocols"].get("grpc_cpu_affinity", {}).get("rows", []):
            print(f"gRPC {row['image']} c={row['connections']}: GRPC_CPU_AFFINITY=auto {row['auto']['ok_per_s']:.0f} "
                  f"ok/s, off {row['off']['ok_per_s']:.0f} ok/s (x{row['auto_over_off']:.2f})")
        flood = results["protocols"]["overload"]
        print(f"gRPC overload ({flood['outstanding']} calls in flight, 1920x1080 JPEG, {flood['deadline_s']:g} s "
              f"deadlines): {flood['outcomes']}, {flood['deadline_exceeded']} past their deadline; RESOURCE_EXHAUSTED "
              f"answered in p50 {flood['shed_p50_ms']} ms, p99 {flood['shed_p99_ms']} ms")
    print("\nsingle-image ONNX Runtime latency, 1 thread (median): " + "; ".join(
        f"{name} " + ", ".join(f"{key} {value}" for key, value in figures.items())
        for name, figures in results["onnx_latency_ms"].items()))
    precision = results["precision"]
    print(f"served, 32x32 PNG at c=8: INT8 {precision['int8']} req/s, FP32 {precision['fp32']} req/s "
          f"(x{precision['int8_over_fp32']})")
    print("inspect latency over HTTP (p50): " +
          ", ".join(f"{name} {v['p50_ms']:.1f} ms" for name, v in results["inspect"].items()))
    after = results["classify_after_inspect"]
    print(f"classify at c=8 after inspect was used: {after['req_per_s_after']:.0f} req/s vs "
          f"{after['req_per_s_before']:.0f} before (ratio {after['ratio']:.2f})")
    kill, drain = results["kill_9"], results["sigterm_drain"]
    print(f"kill -9 of a worker under load: {kill['failed']} of {kill['requests']} requests failed; replacement "
          f"ready in {kill['ready_again_s']} s; counters kept: {kill['counters_kept']}")
    print(f"SIGTERM under load (DRAIN_SECONDS={drain['drain_seconds']:g}): {drain['served']} served, "
          f"{drain['served_after_not_ready']} after readiness turned 503, {drain['failed']} failed, "
          f"exit code {drain['exit_code']}")


if __name__ == "__main__":
    sys.exit(main())
