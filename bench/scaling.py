"""Throughput from 1 to 3 replicas behind the load balancer, in one run: `python -m bench.scaling`.

Starts `make cluster` with REPLICAS=1, then with REPLICAS=3 (one worker each), and drives each through HAProxy with
wrk (small PNGs, 32 connections, --seconds). The ratio says what adding replicas buys on this machine; with fewer
cores than replicas the cores, not the replicas, set the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import Wrk
from service.settings import available_cpus
from tests.helpers import free_port, image_bytes, wait_for

REPO = Path(__file__).resolve().parent.parent


def measure(replicas: int, wrk: Wrk, seconds: int, connections: int) -> dict:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "REPLICAS": str(replicas)}
    cluster = subprocess.Popen(["make", "--no-print-directory", "cluster"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        state = REPO / ".cluster" / str(port) / "state.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if len(json.loads(state.read_text())["routed"]) == replicas:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        wait_for(f"http://127.0.0.1:{port}/readyz", 200, 30)
        wrk.run(f"http://127.0.0.1:{port}/v1/classify", image_bytes(), "image/png", connections, 2)  # warm-up
        return wrk.run(f"http://127.0.0.1:{port}/v1/classify", image_bytes(), "image/png", connections, seconds)
    finally:
        os.killpg(cluster.pid, signal.SIGTERM)
        cluster.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    wrk = Wrk(Path(tempfile.mkdtemp(prefix="convserve-scaling-")))
    one = measure(1, wrk, args.seconds, args.connections)
    three = measure(3, wrk, args.seconds, args.connections)
    print(f"{available_cpus()} CPUs; 1 replica: {one['req_per_s']:.0f} req/s (p99 {one['p99_ms']:.1f} ms), "
          f"3 replicas: {three['req_per_s']:.0f} req/s (p99 {three['p99_ms']:.1f} ms): "
          f"x{three['req_per_s'] / one['req_per_s']:.2f}; failed: {one['non_2xx'] + one['connection_errors']} and "
          f"{three['non_2xx'] + three['connection_errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
