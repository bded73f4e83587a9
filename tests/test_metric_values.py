"""MappedValue and Histogram (service/metrics_files.py) write what prometheus_client's own multiprocess value does.

The same files and exposition, one file per process after a fork, no lost update between threads. Each case runs in a
fresh interpreter, since prometheus_client picks its value class when it is first imported.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The same updates through one value class into one folder; prints the folder's exposition as prometheus_client's
# own collector reads it.
UPDATES = """
import os, sys
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from service import metrics_files
from service.metrics_files import Histogram  # prometheus_client's own observe over the stock values
metrics_files.install()
if sys.argv[1] == "stock":
    values.ValueClass = values.MultiProcessValue()
assert values.ValueClass.__name__ == {"stock": "MmapedValue", "mapped": "MappedValue"}[sys.argv[1]]
requests = Counter("requests_total", "Requests.", ["route", "status"])
latency = Histogram("latency_seconds", "Latency.", ["route"], buckets=(0.001, 0.01, 0.1, 1.0))
gauges = {mode: Gauge(f"g_{mode}", "A gauge.", multiprocess_mode=mode)
          for mode in ("all", "liveall", "livesum", "max", "min", "mostrecent", "livemostrecent")}
for step in range(1, 40):
    requests.labels(f"/r{step % 3}", str(200 + step % 2)).inc(step % 5)
    latency.labels(f"/r{step % 2}").observe(step / 997)
edges = latency.labels("/edges")
for amount in (0.0, -1.0, 0.001, 0.01, 0.1, 1.0, 1.0000001, 5.0, float("inf"), float("nan")):
    edges.observe(amount)  # on a bound, between, past the last, negative, infinite, NaN (no bucket)
try:
    latency.observe(1.0)
except ValueError as error:  # a parent with labels: prometheus_client's own refusal
    print("refused:", error)
    for mode, gauge in gauges.items():
        gauge.inc(step) if step % 3 and "mostrecent" not in mode else gauge.set(step / 7)
    gauges["livesum"].dec(1)
print(generate_latest(MultiProcessCollector(CollectorRegistry(), path=os.environ["PROMETHEUS_MULTIPROC_DIR"])).decode())
"""


def run(script: str, folder: Path, *args: str) -> str:
    folder.mkdir()
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(ROOT),
                                              "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_same_updates_give_prometheus_clients_own_exposition(tmp_path: Path):
    def exposition(kind: str) -> list[str]:  # line order follows the folder's listing; pids are the processes'
        lines = run(UPDATES, tmp_path / kind, kind).splitlines()
        return sorted(re.sub(r'pid="\d+"', 'pid="-"', line) for line in lines)

    stock, mapped = exposition("stock"), exposition("mapped")
    assert 'requests_total{route="/r1",status="200"} 14.0' in stock, stock
    assert 'latency_seconds_bucket{le="0.01",route="/r1"} 5.0' in stock and 'g_all{pid="-"} 5.571428571428571' in stock
    assert 'latency_seconds_bucket{le="0.001",route="/edges"} 3.0' in stock  # -1, 0 and 0.001 itself
    assert 'latency_seconds_bucket{le="1.0",route="/edges"} 6.0' in stock
    assert 'latency_seconds_bucket{le="+Inf",route="/edges"} 9.0' in stock  # NaN in no bucket
    assert any(line.startswith("refused: histogram metric is missing label values") for line in stock), stock
    assert mapped == stock
    # The files themselves hold the same keys and values (the collector reads nothing else).
    from prometheus_client.mmap_dict import MmapedDict

    def entries(folder: Path) -> dict:
        return {(path.name.split("_")[0], key): repr(value) for path in sorted(folder.glob("*.db"))
                for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))}

    assert entries(tmp_path / "mapped") == entries(tmp_path / "stock")


FORK = """
import json, os, sys, threading
from prometheus_client import Counter, Gauge, values
from service import metrics_files
metrics_files.install()
assert values.ValueClass is metrics_files.MappedValue
requests = Counter("requests_total", "Requests.")
in_flight = Gauge("in_flight", "In flight.", multiprocess_mode="livesum")
requests.inc(5)
in_flight.inc(2)
holder = threading.Thread(target=lambda: [requests.inc() for _ in range(20000)])
holder.start()  # updating (taking the values' lock) while the process forks
child = os.fork()
if child == 0:
    requests.inc(1)
    in_flight.inc(7)
    os._exit(0 if requests._value.get() == 1 else 3)
_, status = os.waitpid(child, 0)
holder.join()
sys.setswitchinterval(1e-6)  # the threads interleave as finely as the interpreter lets them
threads = [threading.Thread(target=lambda: [requests.inc() for _ in range(5000)]) for _ in range(8)]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
print(json.dumps({"status": status, "parent": os.getpid(), "child": child}))
"""


def test_a_forked_process_writes_its_own_file_from_zero_and_threads_lose_no_update(tmp_path: Path):
    from prometheus_client.mmap_dict import MmapedDict

    pids = json.loads(run(FORK, tmp_path / "metrics"))
    assert pids["status"] == 0, "the child did not start from 0 in a file of its own"

    def value(kind: str, pid: int, name: str) -> float:
        path = tmp_path / "metrics" / f"{kind}_{pid}.db"
        return {json.loads(key)[1]: value for key, value, _, _ in
                MmapedDict.read_all_values_from_file(str(path))}[name]

    assert value("counter", pids["child"], "requests_total") == 1
    assert value("gauge_livesum", pids["child"], "in_flight") == 7
    # The parent's file has only the parent's updates: 5, the thread's 20,000 and 8 threads' 5,000 each.
    assert value("counter", pids["parent"], "requests_total") == 5 + 20000 + 8 * 5000
    assert value("gauge_livesum", pids["parent"], "in_flight") == 2


def test_the_values_stay_in_the_guarded_files(tmp_path: Path):
    """A value with no room in its file is kept in memory and written once there is room (GuardedFile's promise),
    through MappedValue as through the stock value."""
    script = textwrap.dedent("""
        import os
        from prometheus_client import Counter
        from service import metrics_files
        metrics_files.install()
        counter = Counter("kept_total", "Kept.")
        file = counter._value._file
        file._positions.clear()
        file._m = None  # the file could not be mapped (a full volume): values wait in memory
        file._attach = lambda: False
        counter.inc(3)
        assert file._unplaced and counter._value.get() == 3, file._unplaced
        del file._attach
        metrics_files._next_retry[0] = 0.0
        counter.inc(1)  # the next write places every pending value
        assert not file._unplaced and not metrics_files._pending
        from prometheus_client.mmap_dict import MmapedDict
        values = {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(file._fname)}
        print(list(values.values()))
    """)
    assert run(script, tmp_path / "metrics").strip() == "[4.0]"
