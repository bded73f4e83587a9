"""Every setting of the service, read from the environment, each with a default and a one-line description.

These variable names are the contract: ``make serve``, the gunicorn config, the image and the Kubernetes manifests all
use them. Nothing else in the service reads the environment.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO_MODEL_STORE = Path(__file__).resolve().parent.parent / "model_store"


def _setting(default, description: str):
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class Settings:
    PORT: int = _setting(8080, "TCP port gunicorn listens on")
    HOST: str = _setting("0.0.0.0", "address gunicorn binds to")
    MODEL_STORE: Path = _setting(REPO_MODEL_STORE, "folder of <name>/<version>/{model.onnx,metadata.json}")
    DEFAULT_MODEL: str = _setting("convnet", "model served by /v1/classify and /v1/inspect")
    MODEL_POLL_SECONDS: float = _setting(10.0, "every worker rescans MODEL_STORE this often: new versions load, "
                                               "removed ones unload, no restart; 0 = off")
    MODEL_VERSION_POLICY: str = _setting("latest", "which version serves: 'latest', or pins such as "
                                                   "'convnet=4,lenet=1' (models not named serve their latest)")
    API_KEYS: str = _setting("", "comma-separated API keys; when set (or API_KEYS_FILE), /v1 and /v2 need one")
    API_KEYS_FILE: str = _setting("", "file of API keys, one per line (# comments); what a Kubernetes Secret mounts")
    WORKERS: int = _setting(2, "gunicorn worker processes; one per CPU core is the measured best")
    INFERENCE_THREADS: int = _setting(0, "real threads per worker that decode and run ONNX Runtime; "
                                         "0 = the CPUs available / WORKERS (at least 1)")
    MAX_QUEUE: int = _setting(64, "requests per worker that may wait for an inference thread; more get 503 overloaded")
    BATCH_IMAGES: int = _setting(8, "most images one ONNX Runtime call takes when waiting requests are batched "
                                    "together; 1 = no batching")
    QUEUE_TIMEOUT: float = _setting(1.0, "seconds a request may wait for an inference thread before 503 overloaded")
    SHED_BACKOFF: float = _setting(0.5, "after a 503 for a full queue, seconds before that connection's next request "
                                         "is read (clients ignoring Retry-After can't spin the server)")
    BODY_TIMEOUT: float = _setting(15.0, "seconds a client has to send its whole request body (408 after)")
    KEEPALIVE: int = _setting(5, "seconds an idle keep-alive connection, or one still sending headers, stays open")
    WORKER_CONNECTIONS: int = _setting(1000, "open connections per worker (idle and slow ones cost a few kB each)")
    TIMEOUT: int = _setting(30, "seconds a worker may go without a heartbeat before the master restarts it")
    GRACEFUL_TIMEOUT: int = _setting(30, "seconds workers get to finish in-flight requests on shutdown")
    DRAIN_SECONDS: float = _setting(0.0, "on SIGTERM, keep serving this long with /readyz at 503 before stopping")
    MAX_UPLOAD_BYTES: int = _setting(10 * 1024 * 1024, "largest request body accepted (413 above)")
    MAX_BATCH_IMAGES: int = _setting(64, "most images in one request (413 above)")
    MAX_IMAGE_PIXELS: int = _setting(40_000_000, "most pixels in one decoded image, against decompression bombs (413)")
    BODY_BUFFER_BYTES: int = _setting(64 * 1024 * 1024, "most request-body bytes a worker holds at once (read, "
                                                         "queued or decoding); more get 503 overloaded")
    DECODE_BUDGET_BYTES: int = _setting(128 * 1024 * 1024, "most bytes the images of one request may take once "
                                                           "decoded, checked from their headers (413 above)")
    ORT_INTRA_OP_THREADS: int = _setting(1, "ONNX Runtime threads per inference; 1 suits one worker per core")
    LOG_LEVEL: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    FORWARDED_ALLOW_IPS: str = _setting("127.0.0.1,::1", "addresses whose X-Forwarded-* headers are believed; in "
                                                         "Kubernetes the ingress or mesh proxy's, '*' only behind one")
    CORS_ORIGINS: str = _setting("", "comma-separated origins allowed by CORS, '*' for any; empty = CORS off")
    PROMETHEUS_MULTIPROC_DIR: str = _setting("", "metrics folder shared by workers; the gunicorn config sets one")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for spec in fields(cls):
            if spec.name in overrides:
                values[spec.name] = overrides[spec.name]
            elif spec.name in environ and environ[spec.name] != "":
                values[spec.name] = _parse(spec.name, type(spec.default), environ[spec.name])
        return cls(**values)

    @property
    def inference_threads(self) -> int:
        """Inference never runs on more threads than cores in total: each worker takes its share."""
        return self.INFERENCE_THREADS or max(1, available_cpus() // max(1, self.WORKERS))

    @property
    def version_pins(self) -> dict[str, str]:
        """MODEL_VERSION_POLICY's pins: model name → version."""
        if self.MODEL_VERSION_POLICY.strip() in ("", "latest"):
            return {}
        pins = {}
        for item in self.MODEL_VERSION_POLICY.split(","):
            name, equals, version = item.strip().partition("=")
            if not equals or not name.strip() or not version.strip():
                raise ValueError(f"MODEL_VERSION_POLICY={self.MODEL_VERSION_POLICY!r}: use 'latest' or pins such as "
                                 "'convnet=4,lenet=1'.")
            pins[name.strip()] = version.strip()
        return pins

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.CORS_ORIGINS.split(",") if origin.strip()]

    @classmethod
    def describe(cls) -> list[tuple[str, object, str]]:
        return [(f.name, f.default, f.metadata["description"]) for f in fields(cls)]


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, narrowed by a cgroup v2 CPU quota (a Kubernetes CPU limit),
    which the affinity mask does not show."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _parse(name: str, kind: type, raw: str):
    try:
        if kind is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if issubclass(kind, Path):
            return Path(raw)
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"Setting {name}={raw!r} is not a valid {kind.__name__}.") from exc
