"""The platform's everyday faults, end to end on real gunicorn, and what clients, readiness, log and metrics showed.

The faults: a store that blinks, a version copied in place, a graph replaced under a loaded version, a full or deleted
metrics folder, a stuck inference, a rotated key, SIGHUP, and a worker killed while it holds requests. Each test counts
what the clients saw, what readiness did, and what the log and the metrics said."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import requests
from onnx import TensorProto, helper

from service.metadata import sha256_of
from tests.helpers import GunicornServer, image_bytes, metric_value, mount_secret, wait_until

pytestmark = pytest.mark.slow

BLINK_SECONDS = float(os.environ.get("FAULT_STORE_BLINK_SECONDS", "10"))  # the figure
STALL_THRESHOLD = 1000.0  # an input value above this stalls the "stall" model's graph (no image normalizes there)
STALL_ITERATIONS_PER_UNIT = 10_000  # ~3.7 ms of ONNX Runtime Loop per unit above the threshold here


# ---- parts ----------------------------------------------------------------------------------------------------------

def stalling_graph(graph: bytes) -> bytes:
    """The lenet graph with an ONNX Loop whose trip count comes from the input: 1 for any image, (max - threshold)
    × STALL_ITERATIONS_PER_UNIT for a tensor holding a larger value. A real ONNX Runtime call that runs as long as
    asked (1e6 is about an hour): a wedged call, not a stand-in for one. Answers are otherwise lenet's, bit for bit."""
    model = onnx.load_from_string(graph)
    nodes = model.graph.node
    for node in nodes:
        node.output[:] = ["unstalled" if name == "probabilities" else name for name in node.output]

    def constant(name, value, dtype):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))

    scalar = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Identity", ["kept"], ["kept_out"])],
        "stall", [scalar("i", TensorProto.INT64, []), scalar("cond", TensorProto.BOOL, []),
                  scalar("kept", TensorProto.FLOAT, [])],
        [scalar("cond_out", TensorProto.BOOL, []), scalar("kept_out", TensorProto.FLOAT, [])])
    nodes.extend([
        helper.make_node("ReduceMax", ["input"], ["largest"], keepdims=0),
        constant("threshold", STALL_THRESHOLD, TensorProto.FLOAT),
        constant("per_unit", float(STALL_ITERATIONS_PER_UNIT), TensorProto.FLOAT),
        constant("once", 1, TensorProto.INT64), constant("yes", True, TensorProto.BOOL),
        constant("zero", 0.0, TensorProto.FLOAT),
        helper.make_node("Greater", ["largest", "threshold"], ["stalls"]),
        helper.make_node("Sub", ["largest", "threshold"], ["above"]),
        helper.make_node("Mul", ["above", "per_unit"], ["iterations"]),
        helper.make_node("Cast", ["iterations"], ["trips_if_stalling"], to=TensorProto.INT64),
        helper.make_node("Where", ["stalls", "trips_if_stalling", "once"], ["trips"]),
        helper.make_node("Loop", ["trips", "yes", "zero"], ["looped"], body=body),
        helper.make_node("Mul", ["looped", "zero"], ["nothing"]),
        helper.make_node("Add", ["unstalled", "nothing"], ["probabilities"]),
    ])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture()
def stall_store(lenet_store) -> Path:
    """lenet v1, and a model "stall" v1: lenet with the stalling graph (its checksum updated, verification kept)."""
    folder = lenet_store / "stall" / "1"
    shutil.copytree(lenet_store / "lenet" / "1", folder)
    (folder / "model.onnx").write_bytes(stalling_graph((folder / "model.onnx").read_bytes()))
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["files"]["model"]["sha256"] = sha256_of(folder / "model.onnx")
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return lenet_store


def stall_request(value: float) -> dict:
    data = np.zeros((1, 3, 32, 32), dtype=np.float32)
    data[0, 0, 0, 0] = value
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": data.ravel().tolist()}]}


class Clients:
    """Threads classifying in a loop until stopped, each on its own keep-alive session, counting what came back:
    statuses, error codes, and connection failures."""

    def __init__(self, url: str, count: int = 2, path: str = "/v1/classify", headers: dict | None = None):
        self.url, self.path, self.headers = url, path, headers or {}
        self.statuses: Counter = Counter()
        self.codes: Counter = Counter()
        self.failures: list[str] = []
        self.versions: Counter = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        self.payload = image_bytes()

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self):
        session = requests.Session()
        while not self._stop.is_set():
            try:
                response = session.post(self.url + self.path, data=self.payload,
                                        headers={"Content-Type": "image/png", **self.headers}, timeout=30)
            except requests.RequestException as exc:
                self.failures.append(type(exc).__name__)
                continue
            self.statuses[response.status_code] += 1
            if response.status_code == 200:
                self.versions[response.json()["version"]] += 1
            else:
                self.codes[response.json()["error"]["code"]] += 1

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.failures)


class Poller:
    """One thread asking a path every ``every`` seconds, recording (time, status, body)."""

    def __init__(self, url: str, every: float = 0.1):
        self.url, self.every, self.seen = url, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                response = requests.get(self.url, timeout=10)
                self.seen.append((time.monotonic(), response.status_code, response.text))
            except requests.RequestException as exc:
                self.seen.append((time.monotonic(), 0, type(exc).__name__))

    @property
    def statuses(self) -> Counter:
        return Counter(status for _, status, _ in self.seen)


def worker_of(connection: http.client.HTTPConnection, server: GunicornServer) -> int:
    """The worker process holding the server side of this keep-alive connection (from /proc: socket inodes)."""
    client_port = connection.sock.getsockname()[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, remote_port = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == server.port and remote_port == client_port:
                inodes.add(fields[9])
    for pid in server.worker_pids():
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(descriptor).removeprefix("socket:[").rstrip("]") in inodes:
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds this connection")


def ask(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def connections_by_worker(server: GunicornServer, count: int = 12) -> dict[int, list[http.client.HTTPConnection]]:
    """Keep-alive connections, opened until every worker holds at least two."""
    owners: dict[int, list] = {}
    for _ in range(count * 4):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        assert ask(connection, "GET", "/healthz")[0] == 200
        owners.setdefault(worker_of(connection, server), []).append(connection)
        if len(owners) == server.workers and all(len(held) >= 2 for held in owners.values()):
            return owners
    raise AssertionError(f"connections did not reach every worker: {[len(v) for v in owners.values()]}")


def log_lines(server: GunicornServer, words: str) -> list[str]:
    return [line for line in server.log().splitlines() if words in line]


def scrape(server: GunicornServer) -> str:
    return requests.get(server.url + "/metrics", timeout=10).text


def no_worker_crashed(server: GunicornServer) -> None:
    log = server.log()
    assert "was sent" not in log and "SIGBUS" not in log and "Traceback" not in log, log[-3000:]


# ---- the store ------------------------------------------------------------------------------------------------------

def test_the_store_moved_away_under_load_changes_nothing_clients_see(tmp_path, lenet_store):
    server = GunicornServer(tmp_path, WORKERS=2, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet",
                            MODEL_POLL_SECONDS=0.5)
    server.wait_ready()
    away = lenet_store.with_name("store-away")
    try:
        with Clients(server.url) as clients, Poller(server.url + "/readyz") as readiness:
            time.sleep(1)
            lenet_store.rename(away)
            wait_until(lambda: len(log_lines(server, "model store error")) == server.workers,
                       "every worker noticing the store is gone", timeout=5)
            unknown = requests.post(server.url + "/v1/models/nosuch/classify", data=image_bytes(), timeout=10,
                                    headers={"Content-Type": "image/png"})
            time.sleep(max(0.0, BLINK_SECONDS - 1))
            away.rename(lenet_store)
            wait_until(lambda: len(log_lines(server, "model store readable again")) == server.workers,
                       "every worker seeing the store back", timeout=5)
            time.sleep(1)
        metrics = scrape(server)
    finally:
        server.stop()
        if away.exists():
            away.rename(lenet_store)
    assert clients.total > 50 and clients.failures == [] and set(clients.statuses) == {200}, clients.statuses
    assert readiness.statuses == Counter({200: len(readiness.seen)}), readiness.statuses
    assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "store_unavailable", unknown.text
    assert unknown.headers["Retry-After"] == "1" and "nosuch" in unknown.json()["error"]["message"]
    assert len(log_lines(server, "model store error")) == server.workers, "one line per worker, not one per scan"
    assert metric_value(metrics, "convserve_model_store_errors_total", reason="unreadable") == server.workers
    assert metric_value(metrics, "convserve_model_store_ok") == 1.0
    assert "unloaded model" not in server.log(), "a blink is not a removal"


def test_a_version_copied_in_place_serves_once_whole(tmp_path, lenet_store):
    """No staging folder: metadata.json first, then the graph in slow pieces, then the rest."""
    server = GunicornServer(tmp_path, WORKERS=2, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet",
                            MODEL_POLL_SECONDS=0.3)
    server.wait_ready()
    source, target = lenet_store / "lenet" / "1", lenet_store / "lenet" / "2"
    try:
        with Clients(server.url) as clients, Poller(server.url + "/readyz") as readiness:
            target.mkdir()
            shutil.copy(source / "metadata.json", target)
            graph = (source / "model.onnx").read_bytes()
            with (target / "model.onnx").open("wb") as out:
                for start in range(0, len(graph), len(graph) // 4 + 1):
                    out.write(graph[start:start + len(graph) // 4 + 1])
                    out.flush()
                    time.sleep(0.8)  # slower than a scan: every worker sees it half-written
            for path in sorted(source.iterdir()):
                if not (target / path.name).exists():
                    shutil.copy(path, target)
            wait_until(lambda: len(log_lines(server, "loaded model lenet version 2")) == server.workers
                       and clients.versions["2"] > 20, "version 2 serving in every worker", timeout=20)
    finally:
        server.stop()
    assert clients.failures == [] and set(clients.statuses) == {200}, (clients.statuses, clients.codes)
    assert set(clients.versions) == {"1", "2"}, "version 1 served until version 2 was whole"
    assert readiness.statuses == Counter({200: len(readiness.seen)}), readiness.statuses
    assert len(log_lines(server, "loaded model lenet version 2")) == server.workers
    waited = log_lines(server, "lenet version 2 is still being written") + \
        log_lines(server, "lenet version 2 failed to load")
    assert waited, "the half-written folder was looked at and not served"


def test_a_graph_replaced_by_garbage_under_a_loaded_version_keeps_serving(tmp_path, lenet_store):
    server = GunicornServer(tmp_path, WORKERS=2, MODEL_STORE=lenet_store, DEFAULT_MODEL="lenet",
                            MODEL_POLL_SECONDS=0.3)
    server.wait_ready()
    folder = lenet_store / "lenet" / "1"
    try:
        with Clients(server.url) as clients:
            time.sleep(0.5)
            for name in ("model.onnx", "inspect.onnx"):
                (folder / name).write_bytes(os.urandom(4096))
            wait_until(lambda: len(log_lines(server, "changed on disk after it loaded")) == server.workers,
                       "every worker noticing the changed files", timeout=5)
            time.sleep(0.5)
        inspected = requests.post(server.url + "/v1/inspect", data=image_bytes(),
                                  headers={"Content-Type": "image/png"}, timeout=10)
        metrics = scrape(server)
        time.sleep(1)  # more scans: the same change is not reported again
    finally:
        server.stop()
    assert clients.failures == [] and set(clients.statuses) == {200} and set(clients.versions) == {"1"}
    assert inspected.status_code == 503 and inspected.json()["error"]["code"] == "store_unavailable", inspected.text
    assert "inspect.onnx" in inspected.json()["error"]["message"] and "Retry-After" in inspected.headers
    lines = log_lines(server, "changed on disk after it loaded")
    assert len(lines) == server.workers and all("inspect.onnx" in line and "model.onnx" in line for line in lines)
    assert metric_value(metrics, "convserve_model_store_errors_total", reason="changed") == server.workers
    no_worker_crashed(server)


# ---- the metrics folder ---------------------------------------------------------------------------------------------

@pytest.fixture()
def small_tmpfs(tmp_path):
    mount = tmp_path / "metrics-tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_metrics_volume_never_stops_classification(tmp_path, small_tmpfs):
    server = GunicornServer(tmp_path, WORKERS=2, DEFAULT_MODEL="lenet", PROMETHEUS_MULTIPROC_DIR=small_tmpfs)
    server.metrics_dir = small_tmpfs
    server.wait_ready()
    filler = small_tmpfs / "filler"
    try:
        pids = server.worker_pids()
        with filler.open("wb") as out:  # the volume is now full
            try:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            except OSError:
                pass
        with Clients(server.url) as clients:
            # New series on every request kind: other routes, statuses, models, and a new worker's first files.
            for path, body in (("/v1/models/convnet/classify", image_bytes()), ("/v1/inspect", image_bytes()),
                               ("/v1/classify", b"not an image"), ("/v1/models/nosuch/classify", image_bytes())):
                for _ in range(20):
                    requests.post(server.url + path, data=body, headers={"Content-Type": "image/png"}, timeout=30)
            replaced = next(iter(pids))
            os.kill(replaced, signal.SIGTERM)
            wait_until(lambda: len(server.worker_pids()) == 2 and replaced not in server.worker_pids(),
                       "the worker restarted on a full volume", timeout=30)
            time.sleep(2)
        assert clients.failures == [] and set(clients.statuses) == {200}, (clients.statuses, clients.codes)
        assert pids - {replaced} <= server.worker_pids(), "no worker died"
        assert log_lines(server, "metrics: cannot"), "the failed writes are logged"
        assert len(log_lines(server, "metrics: cannot")) <= 2 * 3, "once per worker and kind, not per write"
        no_worker_crashed(server)
        filler.unlink()  # room again: what was kept in memory is written on a write after RETRY_SECONDS

        def exported() -> bool:
            requests.post(server.url + "/v1/classify", data=image_bytes(), headers={"Content-Type": "image/png"},
                          timeout=10)
            return log_lines(server, "every series kept in memory is written") and server.all_workers_ready()

        wait_until(exported, "the series kept in memory exported", timeout=20, interval=0.5)
    finally:
        server.stop()


def test_the_metrics_folder_deleted_under_a_running_server(tmp_path):
    server = GunicornServer(tmp_path, WORKERS=2, DEFAULT_MODEL="lenet")
    server.wait_ready()
    try:
        with Clients(server.url) as clients:
            time.sleep(0.5)
            shutil.rmtree(server.metrics_dir)
            for path in ("/v1/models/convnet/classify", "/v1/models/nosuch/classify"):  # new series, no folder
                for _ in range(10):
                    requests.post(server.url + path, data=image_bytes(), headers={"Content-Type": "image/png"},
                                  timeout=30)
            scraped = requests.get(server.url + "/metrics", timeout=10)
            replaced = next(iter(server.worker_pids()))  # its successor cannot create a single file
            os.kill(replaced, signal.SIGTERM)
            wait_until(lambda: len(server.worker_pids()) == 2 and replaced not in server.worker_pids()
                       and log_lines(server, "metrics: cannot create"), "a new worker, with no metrics files",
                       timeout=30)
            wait_until(lambda: all(requests.get(server.url + "/readyz", timeout=5).status_code == 200
                                   for _ in range(6)), "the new worker ready", timeout=30)
            time.sleep(0.5)
    finally:
        server.stop()
    assert clients.failures == [] and set(clients.statuses) == {200}, (clients.statuses, clients.codes)
    assert scraped.status_code == 503 and scraped.json()["error"]["code"] == "metrics_unavailable", scraped.text
    assert log_lines(server, "metrics: cannot create")
    no_worker_crashed(server)


def test_the_archive_is_prometheus_clients_own_format(tmp_path):
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from service import metrics_files

    entries = {mmap_key("convserve_requests_total", "convserve_requests_total",
                                      ["route"], [f"/v1/{index}"], "help"): float(index) for index in range(300)}
    (tmp_path / "counter_archive.db").write_bytes(metrics_files.encode(entries))
    read = {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(tmp_path / "counter_archive.db")}
    assert read == entries


def test_every_gauge_is_per_live_worker():
    """The folder's bound holds because a dead worker leaves only counters and histograms, which are merged: a gauge
    in another mode ("all", "max", ...) would leave a file per dead worker."""
    from prometheus_client import Gauge

    from service.metrics import EXPORTED_METRICS

    modes = {metric._name: metric._multiprocess_mode for metric in EXPORTED_METRICS if isinstance(metric, Gauge)}
    assert modes and all(mode.startswith("live") for mode in modes.values()), modes


def test_dead_workers_files_are_compacted_and_their_counts_kept(tmp_path):
    server = GunicornServer(tmp_path, WORKERS=2, DEFAULT_MODEL="lenet")
    server.wait_ready()
    try:
        for _ in range(3):
            for _ in range(10):
                assert requests.post(server.url + "/v1/classify", data=image_bytes(), timeout=30,
                                     headers={"Content-Type": "image/png"}).status_code == 200
            before = metric_value(scrape(server), "convserve_requests_total", route="/v1/classify", status="200")
            pids = server.worker_pids()
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            wait_until(lambda old=pids: not old & server.worker_pids() and len(server.worker_pids()) == 2
                       and server.all_workers_ready(), "both workers replaced", timeout=60)
            after = metric_value(scrape(server), "convserve_requests_total", route="/v1/classify", status="200")
            assert after == before, "a dead worker's counts stay"
        files = sorted(path.name for path in server.metrics_dir.glob("*.db"))
        live = {str(pid) for pid in server.worker_pids()}
    finally:
        server.stop()
    owners = {name.rsplit("_", 1)[1].removesuffix(".db") for name in files}
    assert owners == live | {"archive"}, f"6 workers lived, the folder holds the 2 live ones and one archive: {files}"


# ---- the watchdog ---------------------------------------------------------------------------------------------------

def test_a_stuck_inference_gets_its_worker_replaced(tmp_path, stall_store):
    limit = 2.0
    server = GunicornServer(tmp_path, WORKERS=2, MODEL_STORE=stall_store, DEFAULT_MODEL="lenet",
                            INFERENCE_WATCHDOG_SECONDS=limit)
    server.wait_ready()
    try:
        owners = connections_by_worker(server)
        stuck_pid = next(iter(owners))
        stuck, *watching = owners[stuck_pid]
        (healthy_pid,) = set(owners) - {stuck_pid}
        answers: dict = {}

        def send_stuck():
            started = time.monotonic()
            answers["stuck"] = ask(stuck, "POST", "/v2/models/stall/infer", json.dumps(stall_request(1e6)).encode(),
                                   {"Content-Type": "application/json"})
            answers["after"] = time.monotonic() - started

        with Clients(server.url) as clients:
            sender = threading.Thread(target=send_stuck)
            started = time.monotonic()
            sender.start()
            health = []
            while time.monotonic() - started < limit + 2:
                for connection in watching[:1] + owners[healthy_pid][:1]:
                    try:
                        health.append((worker_of(connection, server) if connection.sock else None,
                                       *ask(connection, "GET", "/healthz")))
                    except (OSError, http.client.HTTPException, AssertionError):
                        pass
                time.sleep(0.05)
            sender.join(30)
            wait_until(lambda: stuck_pid not in server.worker_pids() and len(server.worker_pids()) == 2,
                       "the stuck worker replaced", timeout=15)
            replaced_after = time.monotonic() - started
            server.wait_ready(30)
            time.sleep(1)
        metrics = scrape(server)
    finally:
        server.stop()
    status, body = answers["stuck"]
    assert status == 503 and "out of service" in body["error"], body
    assert limit <= answers["after"] < limit + 2, "answered when the watchdog tripped"
    assert replaced_after < limit + 10, "replaced within the limit plus one probe period (10 s)"
    unhealthy = [body for pid, status, body in health if status == 503]
    assert unhealthy and all(body["status"] == "unhealthy" and "INFERENCE_WATCHDOG_SECONDS" in body["reason"]
                             for body in unhealthy), health
    assert all(status == 200 for pid, status, _ in health if pid == healthy_pid), "the other worker stays healthy"
    assert clients.failures == [], clients.failures
    # Requests the stuck worker held: shed after QUEUE_TIMEOUT, or answered worker_unhealthy when it tripped.
    assert set(clients.statuses) <= {200, 503} and set(clients.codes) <= {"worker_unhealthy", "overloaded"}
    assert clients.statuses[200] > 20
    assert len(log_lines(server, f"worker {stuck_pid} out of service: an inference (stall v1")) == 1
    assert len(log_lines(server, f"worker {stuck_pid} exits: a stuck")) == 1
    assert metric_value(metrics, "convserve_watchdog_trips_total") == 1.0, "the dead worker's count is kept"


def test_a_worker_killed_holding_requests_fails_only_those(tmp_path, stall_store):
    server = GunicornServer(tmp_path, WORKERS=2, MODEL_STORE=stall_store, DEFAULT_MODEL="lenet")
    server.wait_ready()
    try:
        owners = connections_by_worker(server, count=16)
        victim = next(iter(owners))
        held = owners[victim][:4]
        outcomes: list = []

        def send(connection, slow):
            try:
                if slow:  # ~1.5 s on the thread: the classify requests behind it wait, then run as one batch
                    outcomes.append(ask(connection, "POST", "/v2/models/stall/infer",
                                        json.dumps(stall_request(STALL_THRESHOLD + 400)).encode())[0])
                else:
                    outcomes.append(ask(connection, "POST", "/v1/classify", image_bytes(),
                                        {"Content-Type": "image/png"})[0])
            except (OSError, http.client.HTTPException) as exc:
                outcomes.append(type(exc).__name__)

        with Clients(server.url) as clients:
            senders = [threading.Thread(target=send, args=(connection, index == 0))
                       for index, connection in enumerate(held)]
            for sender in senders:
                sender.start()
                time.sleep(0.1)
            time.sleep(0.3)
            os.kill(victim, signal.SIGKILL)
            for sender in senders:
                sender.join(30)
            wait_until(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids(),
                       "the killed worker replaced", timeout=30)
            server.wait_ready(30)
            time.sleep(1)
    finally:
        server.stop()
    assert len(outcomes) == len(held) and all(not isinstance(outcome, int) for outcome in outcomes), \
        f"the {len(held)} requests the killed worker held fail as dropped connections: {outcomes}"
    # The load's own requests: only those on the killed worker's connections at the moment it died can fail.
    assert len(clients.failures) <= 2 and set(clients.statuses) == {200}, (clients.failures, clients.statuses)
    assert f"(pid:{victim}) was sent SIGKILL" in server.log() or f"pid:{victim}" in server.log()


# ---- keys and signals -----------------------------------------------------------------------------------------------

def test_a_rotated_key_takes_effect_without_a_restart(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    mount_secret(secret, "old-key\n", 1)
    server = GunicornServer(tmp_path, WORKERS=2, DEFAULT_MODEL="lenet", API_KEYS_FILE=secret / "keys")
    server.wait_ready()

    def works(key: str) -> int:
        return requests.post(server.url + "/v1/classify", data=image_bytes(), timeout=10,
                             headers={"Content-Type": "image/png", "X-API-Key": key}).status_code

    try:
        pids = server.worker_pids()
        with Clients(server.url, headers={"X-API-Key": "old-key"}) as clients:
            time.sleep(0.5)
            assert works("old-key") == 200 and works("new-key") == 401
            mount_secret(secret, "# rotated\nnew-key\n", 2)
            rotated = time.monotonic()
            wait_until(lambda: all(works("new-key") == 200 and works("old-key") == 401 for _ in range(6)),
                       "the new key working and the old one refused in every worker", timeout=5)
            took = time.monotonic() - rotated
            mount_secret(secret, "# emptied by mistake\n", 3)  # a broken Secret: the keys in force stay
            time.sleep(3)
            assert all(works("new-key") == 200 for _ in range(6))
        metrics = scrape(server)
        assert server.worker_pids() == pids, "no restart"
    finally:
        server.stop()
    assert took < 5
    assert clients.failures == [] and set(clients.statuses) <= {200, 401}, clients.statuses
    assert clients.statuses[200] > 10 and clients.statuses[401] > 10, "old key: served, then refused"
    assert len(log_lines(server, "API keys re-read")) == server.workers
    assert len(log_lines(server, "holds no key")) == server.workers
    assert metric_value(metrics, "convserve_api_key_reloads_total", result="ok") == server.workers
    assert metric_value(metrics, "convserve_api_key_reloads_total", result="failed") == server.workers


def test_sighup_replaces_every_worker_and_drops_nothing(tmp_path):
    server = GunicornServer(tmp_path, WORKERS=2, DEFAULT_MODEL="lenet")
    server.wait_ready()
    try:
        pids = server.worker_pids()
        with Clients(server.url) as clients, Poller(server.url + "/readyz") as readiness:
            time.sleep(1)
            server.process.send_signal(signal.SIGHUP)
            wait_until(lambda: not pids & server.worker_pids() and len(server.worker_pids()) == 2
                       and server.all_workers_ready(), "every worker replaced", timeout=60)
            time.sleep(1)
    finally:
        server.stop()
    assert clients.failures == [] and set(clients.statuses) == {200}, (clients.failures, clients.statuses)
    assert readiness.statuses[0] == 0, "readiness always answered"
    # An old worker answers 503 "shutting down" until its loop closes the listener (once a second): the readiness a
    # probe may see for about a second, while the new workers serve.
    not_ready = [(at, json.loads(body)["reason"]) for at, status, body in readiness.seen if status == 503]
    assert all(reason == "shutting down" for _, reason in not_ready), not_ready
    assert not not_ready or not_ready[-1][0] - not_ready[0][0] < 2.0, f"{len(not_ready)} of {len(readiness.seen)}"
    assert "Hang up" in server.log()
