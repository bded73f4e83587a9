"""A cluster on one machine: REPLICAS service instances behind HAProxy, Prometheus scraping each, and what Kubernetes
does between them (readiness decides where requests go; a crashed pod is recreated; a rolling update).

    python deploy/cluster.py up      # make cluster: until Ctrl-C or SIGTERM, then nothing is left running
    python deploy/cluster.py roll    # make cluster-roll: a rolling update of the cluster on PORT

HAProxy is configured as deploy/README.md recommends for an ingress in front of the service: connections to the
replicas are reused (and closed by the proxy before the service's KEEPALIVE does), a 503 or a failed connection is
retried once on another replica (every service route is a pure read, so a POST is safe to resend), and timeouts
match the service's. It sends only to replicas whose /readyz answered 200 at its last check (every PROBE_SECONDS),
as an ingress follows a Service's endpoints, and it is never reloaded: client connections are never cut.

The roll is Kubernetes' for a Deployment with maxSurge 0 and maxUnavailable 1: one replica at a time is put in drain
at the proxy (an endpoint removed), waits PRESTOP_SECONDS (the preStop sleep), gets SIGTERM (the service drains
DRAIN_SECONDS and exits), and a new replica starts on its port with the store and keys as they are now; the next
one waits until the proxy sends to it again.
Everything is written under .cluster/<PORT>/: the state, the configs and every process's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PORT = int(os.environ.get("PORT") or 8080)
REPLICAS = int(os.environ.get("REPLICAS") or 3)
REPLICA_WORKERS = os.environ.get("REPLICA_WORKERS") or "1"  # one core per replica: a pod with a CPU limit of 1
PROMETHEUS_PORT = int(os.environ.get("PROMETHEUS_PORT") or PORT + 1010)
SCRAPE_SECONDS = 2
PROBE_SECONDS = 1.0  # the kubelet's readiness periodSeconds, here
PRESTOP_SECONDS = 1.0  # the Deployment's preStop sleep: the load balancer forgets the replica before SIGTERM
RECREATE_SECONDS = 3.0  # a dead pod is not replaced at once: Kubernetes schedules and starts a new one
DRAIN_SECONDS = os.environ.get("DRAIN_SECONDS") or "2"
HERE = REPO / ".cluster" / str(PORT)
STATE = HERE / "state.json"

HAPROXY = """\
global
    maxconn 8192
    log stdout format raw local0
    stats socket {here}/haproxy.sock mode 600 level admin
    tune.bufsize 262144                     # a request body up to 256 KiB is kept whole, so it can be retried

defaults
    mode http
    log global
    log-format "%Ts.%ms %ST %s %rc %Tt %{{+Q}}r"
    timeout connect 1s
    timeout client 30s
    timeout server 30s                      # QUEUE_TIMEOUT + the slowest request, with room
    timeout http-request {body_timeout}s     # BODY_TIMEOUT
    timeout http-keep-alive 4s              # below the service's KEEPALIVE (5 s): the proxy closes idle ones first
    option http-buffer-request
    retries 1
    option redispatch 1                     # the retry goes to another replica
    retry-on conn-failure empty-response response-timeout 503

frontend convserve
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    http-reuse safe
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {probe}ms fall 1 rise 1
{servers}
"""

PROMETHEUS = """\
global:
  scrape_interval: {scrape}s
  evaluation_interval: {scrape}s
rule_files:
  - {rules}
scrape_configs:
  - job_name: convserve
    static_configs:
{targets}
"""


def log(message: str) -> None:
    print(f"cluster: {message}", flush=True)


class Replica:
    """One gunicorn master and its workers, in their own process group: a pod."""

    def __init__(self, index: int):
        self.index, self.port = index, PORT + 1 + index
        self.name = f"convserve-{index}"
        self.process: subprocess.Popen | None = None
        self.leaving = False  # taken out of the upstreams by a roll

    def start(self) -> None:
        env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1", "WORKERS": REPLICA_WORKERS,
               "DRAIN_SECONDS": DRAIN_SECONDS, "PROMETHEUS_MULTIPROC_DIR": "",
               # HAProxy balances HTTP here; the replicas' ports PORT+1.. would also collide with GRPC_PORT's 8081
               "GRPC_PORT": "0"}
        out = (HERE / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_config"],
                                        cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        out.close()

    def ready(self) -> bool:
        if self.leaving or self.process is None or self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=0.5) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, wait: float = 40) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        os.killpg(self.process.pid, sig)
        try:
            return self.process.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()


class Cluster:
    def __init__(self):
        self.replicas = [Replica(index) for index in range(REPLICAS)]
        self.proxy: subprocess.Popen | None = None
        self.prometheus: subprocess.Popen | None = None
        self.stopping = threading.Event()  # set by the main thread only: a signal handler must take no lock
        self.stop_requested = False  # set by the signal handlers (plain flags)
        self.roll_requested = False
        self.rolling: threading.Thread | None = None
        self.rolls = 0

    # ---- the parts ----
    def start(self) -> None:
        from service.settings import Settings

        settings = Settings.from_env()
        if HERE.exists():
            shutil.rmtree(HERE)
        HERE.mkdir(parents=True)
        for replica in self.replicas:
            replica.start()
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in self.replicas)
        (HERE / "haproxy.cfg").write_text(HAPROXY.format(here=HERE, port=PORT, probe=int(PROBE_SECONDS * 1000),
                                                         servers=servers, body_timeout=int(settings.BODY_TIMEOUT)))
        self.proxy = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f",
                                       str(HERE / "haproxy.cfg")], start_new_session=True,
                                      stdout=(HERE / "access.log").open("wb"), stderr=subprocess.STDOUT)
        targets = "\n".join(f"      - targets: ['127.0.0.1:{r.port}']\n        labels: {{namespace: local, pod: "
                            f"{r.name}}}" for r in self.replicas)
        (HERE / "prometheus.yml").write_text(PROMETHEUS.format(scrape=SCRAPE_SECONDS, targets=targets,
                                                               rules=REPO / "deploy" / "prometheus" / "rules.yml"))
        self.prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={HERE / 'prometheus.yml'}", f"--storage.tsdb.path={HERE / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"], start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=(HERE / "prometheus.log").open("wb"))
        self._save()

    def _proxy(self, command: str) -> str:
        """A command on HAProxy's runtime socket (what an ingress controller does through its API)."""
        import socket

        with socket.socket(socket.AF_UNIX) as connection:
            connection.connect(str(HERE / "haproxy.sock"))
            connection.sendall(command.encode() + b"\n")
            return connection.makefile().read()

    def routed(self) -> list[str]:
        """The replicas HAProxy sends to now: checked ready, not drained."""
        try:
            rows = self._proxy("show servers state replicas").splitlines()[2:]
        except OSError:
            return []
        # Columns: ... srv_name srv_addr srv_op_state srv_admin_state ...; op state 2 = up, admin 0 = in service
        return [row.split()[3] for row in rows if len(row.split()) > 6 and row.split()[5] == "2"
                and row.split()[6] == "0"]

    def _save(self) -> None:
        state = {"port": PORT, "controller": os.getpid(), "prometheus_port": PROMETHEUS_PORT,
                 "routed": self.routed(), "rolls": self.rolls,
                 "rolling": bool(self.rolling and self.rolling.is_alive()),
                 "replicas": [{"name": r.name, "port": r.port, "pid": r.process.pid if r.process else None}
                              for r in self.replicas]}
        staged = STATE.with_suffix(".tmp")
        staged.write_text(json.dumps(state, indent=2))
        staged.replace(STATE)

    # ---- the controller ----
    def run(self) -> None:
        dead_since: dict[str, float] = {}
        while not self.stop_requested:
            for replica in self.replicas:
                if replica.process.poll() is not None and not replica.leaving:  # a ReplicaSet recreates a pod
                    if replica.name not in dead_since:
                        dead_since[replica.name] = time.monotonic()
                        log(f"{replica.name} exited ({replica.process.returncode}); a new one starts in "
                            f"{RECREATE_SECONDS:g} s")
                    elif time.monotonic() - dead_since[replica.name] >= RECREATE_SECONDS:
                        del dead_since[replica.name]
                        replica.start()
                        log(f"{replica.name} started again")
            self._save()
            if self.roll_requested and not (self.rolling and self.rolling.is_alive()):
                self.roll_requested = False
                self.rolling = threading.Thread(target=self._roll, daemon=True)
                self.rolling.start()
                self._save()
            time.sleep(PROBE_SECONDS / 4)  # a signal cuts it short; the flags are read here

    def _roll(self) -> None:
        log("rolling update: one replica at a time")
        for replica in self.replicas:
            if self.stopping.is_set():
                return
            replica.leaving = True
            self._proxy(f"set server replicas/{replica.name} state drain")  # no new requests; in-flight ones end
            time.sleep(PRESTOP_SECONDS)
            code = replica.stop(signal.SIGTERM)
            log(f"{replica.name} drained and exited ({code}); starting its successor")
            replica.start()
            replica.leaving = False
            self._proxy(f"set server replicas/{replica.name} state ready")  # taken again once its check passes
            self._save()
            deadline = time.monotonic() + 120
            while replica.name not in self.routed() and time.monotonic() < deadline and not self.stopping.is_set():
                time.sleep(0.2)
            log(f"{replica.name} ready and routed again" if replica.name in self.routed()
                else f"{replica.name} not routed after 120 s")
        self.rolls += 1
        log("rolling update done")
        self._save()

    def stop(self) -> None:
        self.stop_requested = True
        self.stopping.set()
        for replica in self.replicas:
            replica.leaving = True
        for part in (self.proxy, self.prometheus):
            if part is not None and part.poll() is None:
                part.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            replica.stop()
        for part in (self.proxy, self.prometheus):
            if part is not None:
                try:
                    part.wait(20)
                except subprocess.TimeoutExpired:
                    part.kill()
        STATE.unlink(missing_ok=True)
        log("stopped: nothing is left running")


def up() -> int:
    for tool in ("haproxy", "prometheus"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"cluster: {tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    cluster = Cluster()
    # Plain assignments only: a handler that takes a lock (Event.set) deadlocks when it interrupts the main thread
    # holding that same lock, which left a cluster running after SIGTERM once.
    signal.signal(signal.SIGTERM, lambda *_: setattr(cluster, "stop_requested", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(cluster, "stop_requested", True))
    signal.signal(signal.SIGUSR1, lambda *_: setattr(cluster, "roll_requested", True))
    cluster.start()
    log(f"{REPLICAS} replicas on ports {PORT + 1}-{PORT + REPLICAS} behind HAProxy on http://127.0.0.1:{PORT}, "
        f"Prometheus on http://127.0.0.1:{PROMETHEUS_PORT}; Ctrl-C stops everything")
    try:
        cluster.run()
    finally:
        cluster.stop()
    return 0


def roll() -> int:
    """Ask the cluster on PORT for a rolling update, and follow it until it is done."""
    try:
        state = json.loads(STATE.read_text())
        os.kill(state["controller"], 0)
    except (OSError, ValueError):
        print(f"cluster-roll: no cluster runs on PORT={PORT} (start one with `make cluster PORT={PORT}`)",
              file=sys.stderr)
        return 2
    before = state["rolls"]
    os.kill(state["controller"], signal.SIGUSR1)
    print(f"cluster-roll: rolling {len(state['replicas'])} replicas on PORT={PORT}", flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            state = json.loads(STATE.read_text())
        except (OSError, ValueError):
            print("cluster-roll: the cluster stopped", file=sys.stderr)
            return 1
        if state["rolls"] > before:
            print("cluster-roll: done; every replica was replaced", flush=True)
            return 0
    print("cluster-roll: the roll did not finish within 600 s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    commands = {"up": up, "roll": roll}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, str(REPO))
    sys.exit(commands[sys.argv[1]]())
