"""The mixed soak: the service as deployed, for minutes, under everything at once.

Clients classify (both models), inspect, and call /v2 infer, all with an API key; every minute a new lenet version is
published into the store (staged, then renamed) and the oldest retired, so workers load and unload versions under
load; halfway through, the key rotates as a Kubernetes Secret does (the new key added, clients move to it, the old
one removed). RSS, open files (master and workers) and the metrics folder's size are sampled after a warm-up minute
and at the end: they should stay flat, and no request should fail.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

from service import metrics_files
from tests.helpers import GunicornServer, mount_secret

KEEP_VERSIONS = 2  # published lenet versions kept in the store at once


def process_figures(server: GunicornServer) -> dict:
    """RSS (MiB) and open file descriptors of the master and each worker, and the metrics folder's size."""
    pids = [server.process.pid, *sorted(server.worker_pids())]
    rss, files = 0.0, 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rss += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
            files += len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except (OSError, StopIteration):
            pass
    return {"processes": len(pids), "rss_mib": round(rss, 1), "open_files": files,
            "metrics_folder_kib": round(metrics_files.size(str(server.metrics_dir)) / 1024, 1),
            "metrics_files": len(list(server.metrics_dir.glob("*.db")))}


class Mixed:
    """Client threads, each on its own keep-alive session, with the key they are told to use."""

    def __init__(self, url: str, payload: bytes, key: str):
        self.url, self.payload, self.key = url, payload, key
        self.outcomes: Counter = Counter()
        self.stop = threading.Event()
        tensor = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
        self.v2_body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                               "data": tensor.ravel().tolist()}]})
        self.calls = [("classify lenet", "/v1/models/lenet/classify", 0.0),
                      ("classify convnet", "/v1/models/convnet/classify", 0.0),
                      ("inspect", "/v1/inspect", 0.2),
                      ("v2 infer", "/v2/models/lenet/infer", 0.0)]
        self.threads = [threading.Thread(target=self._run, args=call, daemon=True) for call in self.calls]

    def _run(self, name: str, path: str, pause: float) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            headers = {"X-API-Key": self.key}
            if name == "v2 infer":
                headers["Content-Type"] = "application/json"
                body = self.v2_body
            else:
                headers["Content-Type"] = "image/png"
                body = self.payload
            try:
                status = session.post(self.url + path, data=body, headers=headers, timeout=30).status_code
                self.outcomes[f"{name} {status}"] += 1
            except requests.RequestException as exc:
                self.outcomes[f"{name} {type(exc).__name__}"] += 1
            if pause:
                self.stop.wait(pause)

    @property
    def failed(self) -> int:
        return sum(count for outcome, count in self.outcomes.items() if not outcome.endswith(" 200"))


def soak(work: Path, store: Path, payload: bytes, workers: int, seconds: float, publish_every: float = 60.0) -> dict:
    shutil.copytree(store, work / "store")
    store = work / "store"
    lenet = store / "lenet"
    shipped = max((p for p in lenet.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    source = work / "lenet-source"  # what each new version is a copy of: the store's own copies get retired
    shutil.copytree(shipped, source)
    first_version = int(shipped.name) + 1
    secret = work / "secret"
    secret.mkdir()
    mount_secret(secret, "soak-key-1\n", 1)
    server = GunicornServer(work, WORKERS=workers, MODEL_STORE=store, MODEL_POLL_SECONDS=2,
                            API_KEYS_FILE=secret / "keys")
    published, rotated = [], False
    try:
        server.wait_ready()
        pids = server.worker_pids()
        clients = Mixed(server.url, payload, "soak-key-1")
        for thread in clients.threads:
            thread.start()
        started = time.monotonic()
        time.sleep(min(60.0, seconds / 4))
        first = process_figures(server)
        next_publish = time.monotonic() + publish_every
        while time.monotonic() - started < seconds:
            time.sleep(1)
            if time.monotonic() >= next_publish:
                next_publish += publish_every
                version = str(first_version + len(published))
                staging = lenet / f".staging-{version}"
                shutil.copytree(source, staging)
                staging.rename(lenet / version)
                published.append(version)
                for old in sorted((p for p in lenet.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))[
                        :-KEEP_VERSIONS]:
                    shutil.rmtree(old)
            if not rotated and time.monotonic() - started >= seconds / 2:
                rotated = True
                mount_secret(secret, "soak-key-1\nsoak-key-2\n", 2)  # the new key is added ...
                time.sleep(5)
                clients.key = "soak-key-2"  # ... clients move to it ...
                time.sleep(5)
                mount_secret(secret, "soak-key-2\n", 3)  # ... and the old one is removed
        clients.stop.set()
        for thread in clients.threads:
            thread.join(30)
        last = process_figures(server)
        replaced = len(pids - server.worker_pids())
        served = requests.get(server.url + "/v1/models/lenet", headers={"X-API-Key": clients.key}, timeout=10).json()
    finally:
        server.stop()
    result = {"seconds": seconds, "published_versions": published, "serving_at_end": served.get("default_version"),
              "key_rotated": rotated, "requests": dict(sorted(clients.outcomes.items())), "failed": clients.failed,
              "workers_replaced": replaced, "start": first, "end": last}
    print(f"  soak {seconds:.0f} s: {sum(clients.outcomes.values())} requests ({clients.failed} failed), "
          f"{len(published)} versions published (serving v{result['serving_at_end']} at the end), key rotated, "
          f"{replaced} workers replaced; after the first minute -> end: RSS {first['rss_mib']} -> "
          f"{last['rss_mib']} MiB, open files {first['open_files']} -> {last['open_files']}, metrics folder "
          f"{first['metrics_folder_kib']} -> {last['metrics_folder_kib']} KiB ({last['metrics_files']} files)",
          flush=True)
    return result
