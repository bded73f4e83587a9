"""The benchmark's load drivers: wrk, health probes, trickling clients and clients that honour readiness.

Health probes are timed from outside; the readiness-honouring clients stop sending during a drain. Every loop here is
bounded in time and targets 127.0.0.1 only."""

from __future__ import annotations

import http.client
import os
import re
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import requests

WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_TYPE")
"""


def parse_wrk(output: str) -> dict:
    def latency_ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests_per_s = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    total = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    connect, read, write, timeout = (int(v) for v in errors.groups()) if errors else (0, 0, 0, 0)
    return {"req_per_s": requests_per_s, "requests": total, "p50_ms": latency_ms("50"), "p99_ms": latency_ms("99"),
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
            "connection_errors": connect + read + write, "timeouts": timeout}


class Wrk:
    def __init__(self, work: Path):
        self.script = work / "post.lua"
        self.script.write_text(WRK_SCRIPT)
        self.work = work

    def run(self, url: str, payload: bytes, content_type: str, connections: int, seconds: float,
            timeout_s: float = 2.0) -> dict:
        body = self.work / f"body-{len(payload)}"
        body.write_bytes(payload)
        # wrk's own default time-out (2 s): QUEUE_TIMEOUT (1 s) + service time must fit in it.
        command = ["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
                   "--timeout", f"{timeout_s:g}s", "--latency", "-s", str(self.script), url]
        env = dict(os.environ, BENCH_BODY=str(body), BENCH_TYPE=content_type)
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        return parse_wrk(output)


class HealthProbe:
    """Times GET requests on fresh connections, as a kubelet's probes make them, every ``interval`` seconds.

    ``settle_s``: the summary's percentiles leave out probes sent in the first seconds (while a load generator's
    connections arrive all at once), and report the worst of those apart."""

    def __init__(self, port: int, paths=("/healthz", "/readyz", "/metrics"), interval: float = 0.05,
                 settle_s: float = 0.0):
        self.port, self.paths, self.interval, self.settle_s = port, paths, interval, settle_s
        self.timings: dict[str, list[float]] = {path: [] for path in paths}
        self.early: dict[str, list[float]] = {path: [] for path in paths}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    def _run(self):
        began = time.perf_counter()
        while not self._stop.is_set():
            for path in self.paths:
                started = time.perf_counter()
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                    connection.request("GET", path)
                    response = connection.getresponse()
                    response.read()
                    connection.close()
                    if response.status != 200:
                        self.failures.append(f"{path}: {response.status}")
                except OSError as exc:
                    self.failures.append(f"{path}: {type(exc).__name__}")
                elapsed_ms = (time.perf_counter() - started) * 1000
                (self.early if started - began < self.settle_s else self.timings)[path].append(elapsed_ms)
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        result = {}
        for path, values in self.timings.items():
            ordered = sorted(values)
            result[path] = {"count": len(ordered), "p50_ms": round(statistics.median(ordered), 2) if ordered else None,
                            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2)
                            if ordered else None,
                            "max_ms": round(ordered[-1], 2) if ordered else None}
            if self.settle_s:
                result[path]["first_seconds"] = {"seconds": self.settle_s, "count": len(self.early[path]),
                                                 "max_ms": round(max(self.early[path]), 2) if self.early[path]
                                                 else None}
        result["failures"] = len(self.failures)
        return result


class Tricklers:
    """``count`` connections that send headers, then a body at one byte a second (re-opened when the server closes
    them, so the count holds)."""

    def __init__(self, port: int, count: int, body_length: int = 100_000):
        self.port, self.count, self.body_length = port, count, body_length
        self.sockets: list[socket.socket] = []
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: bench\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {self.body_length}\r\n\r\n".encode())
        sock.setblocking(False)
        return sock

    def __enter__(self):
        self.sockets = [self._open() for _ in range(self.count)]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        for sock in self.sockets:
            sock.close()

    def _run(self):
        while not self._stop.wait(1.0):
            for index, sock in enumerate(self.sockets):
                try:
                    sock.send(b"\0")
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        raise ConnectionError
                except BlockingIOError:
                    pass
                except OSError:
                    sock.close()
                    self.sockets[index] = self._open()
                    self.reopened += 1


def readiness_honouring_clients(url: str, payload: bytes, content_type: str, clients: int, during,
                                notice_delay_s: float, limit_s: float = 60) -> dict:
    """``clients`` keep-alive clients classify until /readyz has said 503 for ``notice_delay_s`` (a load balancer's
    delay in noticing); ``during()`` runs meanwhile (e.g. sends SIGTERM). Counts what was served, what was served
    after readiness turned 503, and every failure."""
    not_ready = threading.Event()
    not_ready_at = [float("inf")]
    served, served_after, failures = [0], [0], []
    lock = threading.Lock()
    deadline = time.monotonic() + limit_s

    def poll():
        while not not_ready.is_set() and time.monotonic() < deadline:
            try:
                down = requests.get(f"{url}/readyz", timeout=2).status_code == 503
            except requests.RequestException:
                down = True
            if down:
                not_ready_at[0] = time.monotonic()
                not_ready.set()
            time.sleep(0.05)

    def client():
        session = requests.Session()
        while time.monotonic() < min(deadline, not_ready_at[0] + notice_delay_s):
            try:
                response = session.post(f"{url}/v1/classify", data=payload, timeout=10,
                                        headers={"Content-Type": content_type})
                with lock:
                    if response.status_code != 200:
                        failures.append(str(response.status_code))
                    else:
                        served[0] += 1
                        served_after[0] += not_ready.is_set()
            except requests.RequestException as exc:
                with lock:
                    failures.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=poll)]
    for thread in threads:
        thread.start()
    during()
    for thread in threads:
        thread.join(limit_s)
    return {"served": served[0], "served_after_not_ready": served_after[0], "failed": len(failures),
            "failures": failures[:10]}
