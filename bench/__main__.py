"""Benchmark the service as deployed (gunicorn with its config file), driven by wrk from another process.

For each image (a small PNG and a 1920x1080 JPEG) and concurrency (1, 8, 32) it reports req/s, p50 and p99, next to
the in-process limit measured in the same run: the same decode + preprocessing + ONNX Runtime work in as many
processes as there are workers, with no HTTP. It also reports single-image ONNX Runtime latency on one thread,
inspect latency, and classify throughput again after inspect has been used (inspection must cost classify nothing).
Results go to bench/results/bench-<time>.json. Timings are compared only as ratios taken within one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.inprocess import in_process_worker  # noqa: E402
from service.model import OnnxModel  # noqa: E402
from tests.helpers import GunicornServer, encode, pattern  # noqa: E402

WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_TYPE")
"""


def bench_images() -> dict[str, tuple[bytes, str]]:
    photo = np.asarray(Image.fromarray(pattern(96, 54, seed=1)).resize((1920, 1080), Image.Resampling.BICUBIC))
    return {
        "32x32 PNG": (encode(pattern(32, 32, seed=2), "PNG"), "image/png"),
        "1920x1080 JPEG": (encode(photo, "JPEG", quality=90), "image/jpeg"),
    }


def parse_wrk(output: str) -> dict:
    def latency_ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests_per_s = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    return {"req_per_s": requests_per_s, "p50_ms": latency_ms("50"), "p99_ms": latency_ms("99"),
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0, "socket_errors": errors.group(1) if errors else ""}


def run_wrk(url: str, body_path: Path, content_type: str, connections: int, seconds: float, script: Path) -> dict:
    command = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
               "--latency", "-s", str(script), url]
    env = dict(os.environ, BENCH_BODY=str(body_path), BENCH_TYPE=content_type)
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return parse_wrk(output)


def in_process_limit(folder: Path, payload: bytes, processes: int, seconds: float) -> float:
    """Images/s for decode + preprocess + ONNX Runtime in ``processes`` processes at once, no HTTP."""
    start = time.time() + 2.0
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        counts = pool.map(in_process_worker, [(str(folder), payload, seconds, start)] * processes)
    return sum(counts) / seconds


def single_image_latency_ms(folder: Path, repeats: int = 500) -> float:
    model = OnnxModel(folder, intra_op_threads=1)
    model.load()
    batch = np.zeros((1, *model.input_shape[1:]), np.float32)
    for _ in range(50):
        model.predict(batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(batch)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def latest_version(store: Path, name: str) -> Path:
    return max((p for p in (store / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=6, help="duration of each wrk run, in whole seconds")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", os.cpu_count() or 2)))
    parser.add_argument("--connections", default="1,8,32", help="comma-separated wrk connection counts")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    store = REPO / "model_store"
    folder = latest_version(store, args.model)
    connections = [int(c) for c in args.connections.split(",")]
    work = Path(tempfile.mkdtemp(prefix="convserve-bench-"))
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    results = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version()},
               "model": {"name": args.model, "version": folder.name}, "workers": args.workers,
               "seconds_per_case": args.seconds, "cases": [], "onnx_latency_ms": {}, "inspect": {}}
    for name in sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        results["onnx_latency_ms"][name] = round(single_image_latency_ms(latest_version(store, name)), 3)
    server = GunicornServer(work, WORKERS=args.workers, THREADS=1)
    try:
        server.wait_ready()
        url = f"{server.url}/v1/models/{args.model}/classify"
        for label, (payload, content_type) in bench_images().items():
            body_path = work / f"body-{len(payload)}"
            body_path.write_bytes(payload)
            limit = in_process_limit(folder, payload, args.workers, args.seconds)
            for count in connections:
                measured = run_wrk(url, body_path, content_type, count, args.seconds, script)
                measured.update(image=label, connections=count, in_process_limit=round(limit, 1),
                                ratio=round(measured["req_per_s"] / limit, 3))
                results["cases"].append(measured)
                print(f"  {label:15s} c={count:<3d} {measured['req_per_s']:8.1f} req/s  p50 {measured['p50_ms']:6.2f}"
                      f" ms  p99 {measured['p99_ms']:7.2f} ms  limit {limit:8.1f}/s  ratio {measured['ratio']:.2f}",
                      flush=True)
        small, small_type = bench_images()["32x32 PNG"]
        for name in results["onnx_latency_ms"]:
            timings = []
            for _ in range(30):
                started = time.perf_counter()
                response = requests.post(f"{server.url}/v1/models/{name}/inspect", data=small,
                                         headers={"Content-Type": small_type}, timeout=30)
                timings.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
            results["inspect"][name] = {"p50_ms": round(statistics.median(timings[5:]), 2),
                                        "max_ms": round(max(timings[5:]), 2)}
        body_path = work / "small.png"
        body_path.write_bytes(small)
        after = run_wrk(url, body_path, small_type, 8, args.seconds, script)
        before = next(c for c in results["cases"] if c["image"] == "32x32 PNG" and c["connections"] == 8)
        results["classify_after_inspect"] = {"req_per_s_before": before["req_per_s"],
                                             "req_per_s_after": after["req_per_s"],
                                             "ratio": round(after["req_per_s"] / before["req_per_s"], 3)}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return 0


def print_table(results: dict) -> None:
    print(f"\n{results['model']['name']} v{results['model']['version']}, {results['workers']} sync workers, "
          f"{results['machine']['cpus']} CPUs, {results['seconds_per_case']} s per case\n")
    print("| image | connections | req/s | p50 ms | p99 ms | in-process limit img/s | ratio | non-2xx |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in results["cases"]:
        print(f"| {case['image']} | {case['connections']} | {case['req_per_s']:.0f} | {case['p50_ms']:.2f} | "
              f"{case['p99_ms']:.2f} | {case['in_process_limit']:.0f} | {case['ratio']:.2f} | {case['non_2xx']} |")
    print("\nsingle-image ONNX Runtime latency, 1 thread (median): " +
          ", ".join(f"{name} {ms:.3f} ms" for name, ms in results["onnx_latency_ms"].items()))
    print("inspect latency over HTTP (p50): " +
          ", ".join(f"{name} {v['p50_ms']:.1f} ms" for name, v in results["inspect"].items()))
    after = results["classify_after_inspect"]
    print(f"classify at c=8 after inspect was used: {after['req_per_s_after']:.0f} req/s vs "
          f"{after['req_per_s_before']:.0f} before (ratio {after['ratio']:.2f})")


if __name__ == "__main__":
    sys.exit(main())
