"""Every setting of the service: read from the environment once, each with its default, bounds and description.

These variable names are the contract: ``make serve``, the gunicorn config, the image and the Kubernetes manifests all
use them. Nothing else in the service reads the environment (prometheus_client reads PROMETHEUS_MULTIPROC_DIR itself,
which the gunicorn config sets). Every value is parsed and checked when a ``Settings`` is made, so a bad one stops the
start with one line per problem, naming the setting and what it allows::

    convserve: WORKERS=0 is not allowed: a whole number >= 1 (gunicorn worker processes)

``python -m service.settings`` checks the environment and prints the settings it gives; ``--markdown`` prints the
README's settings table, ``--readme`` rewrites it there.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from service import contract

REPO = Path(__file__).resolve().parent.parent
REPO_MODEL_STORE = REPO / "model_store"
NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"  # a model or version folder: no '/', no hidden (dot) folder


class SettingsError(ValueError):
    """Settings that cannot be used; ``lines`` has one line per problem, ready for stderr."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


# ---- what a setting allows ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Allowed:
    """What a setting accepts, in words (for the error line and the README) and as a function that turns a value, a
    string from the environment or an already typed one, into the value kept, or raises ValueError."""

    words: str
    accept: Callable[[Any], Any]


def whole(low: int, high: int | None = None, note: str = "") -> Allowed:
    def accept(value) -> int:
        number = int(value.strip()) if isinstance(value, str) else value
        if type(number) is not int or number < low or (high is not None and number > high):
            raise ValueError
        return number

    words = f"a whole number from {low} to {high}" if high is not None else f"a whole number >= {low}"
    return Allowed(words + note, accept)


def seconds(low: float = 0.0, above: bool = False, note: str = "") -> Allowed:
    def accept(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or number < low or (above and number == low):
            raise ValueError
        return number

    return Allowed(f"a number of seconds {'>' if above else '>='} {low:g}{note}", accept)


def one_of(*choices: str) -> Allowed:
    """Any case is accepted; the value kept is spelled as the choice."""
    by_key = {choice.lower(): choice for choice in choices}

    def accept(value) -> str:
        return by_key[str(value).strip().lower()]  # KeyError is a LookupError, caught as a bad value too

    return Allowed("one of " + ", ".join(choices), accept)


def share(note: str = "") -> Allowed:
    def accept(value) -> float:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError
        number = float(value)
        if not 0.0 <= number <= 1.0:  # NaN fails too
            raise ValueError
        return number

    return Allowed(f"a number from 0 to 1{note}", accept)


def text(words: str, valid: Callable[[str], bool] = lambda value: True) -> Allowed:
    def accept(value) -> str:
        if not isinstance(value, str) or not valid(value):
            raise ValueError
        return value

    return Allowed(words, accept)


def path(words: str, empty_ok: bool = False) -> Allowed:
    """A path, kept as a Path; or, where it may be empty, kept as the string given (empty = none)."""
    def accept(value) -> Path | str:
        if empty_ok and value in ("", None):
            return ""
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise ValueError
        return Path(value) if not empty_ok else str(value)

    return Allowed(words, accept)


def _version_pins(policy: str) -> dict[str, str]:
    if policy.strip() in ("", "latest"):
        return {}
    pins = {}
    for item in policy.split(","):
        name, equals, version = (part.strip() for part in item.partition("="))
        if not equals or not re.fullmatch(NAME, name) or not re.fullmatch(NAME, version) or name in pins:
            raise ValueError(item)
        pins[name] = version
    return pins


def _addresses(value: str) -> bool:
    """gunicorn's own rule for forwarded_allow_ips: '*', or IP addresses and networks (host bits unset)."""
    for item in (item.strip() for item in value.split(",") if item):
        if item != "*":
            ipaddress.ip_network(item)  # ValueError if not
    return True


def _host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]"
                            r"{0,61}[A-Za-z0-9])?)*", value) is not None


def _origins(value: str) -> bool:
    items = [item.strip() for item in value.split(",") if item.strip()]
    return items == ["*"] or all(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#*]+", item) for item in items)


def _otlp_url(value: str) -> bool:
    if value == "":
        return True
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _setting(default, description: str, allowed: Allowed, shown: str | None = None):
    """``shown``: the default as the README writes it, where the value itself would not say it."""
    return field(default=default, metadata={"description": description, "allowed": allowed, "shown": shown})


# ---- the settings ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    PORT: int = _setting(8080, "TCP port gunicorn listens on", whole(1, 65535))
    GRPC_PORT: int = _setting(8081, "TCP port of the Open Inference Protocol over gRPC, served by every worker "
                                    "(SO_REUSEPORT) on HOST; 0 = off", whole(0, 65535))
    GRPC_MAX_CALLS: int = _setting(96, "gRPC calls a worker handles at once, each on a thread of its own (inference "
                                       "ones then queue as REST's do); more get RESOURCE_EXHAUSTED at once", whole(1))
    GRPC_CPU_AFFINITY: str = _setting("auto", "'auto': each worker's gRPC threads keep to a CPU of their own when "
                                              "the workers have CPUs to themselves (an affinity mask of at least "
                                              "WORKERS CPUs and no smaller cgroup CPU quota); 'off': never",
                                      one_of("auto", "off"))
    HOST: str = _setting("0.0.0.0", "address gunicorn binds to",
                         text("an IP address or host name, e.g. 0.0.0.0 (every IPv4 interface) or 127.0.0.1", _host))
    MODEL_STORE: Path = _setting(REPO_MODEL_STORE, "folder of <name>/<version>/{model.onnx,inspect.onnx,metadata.json};"
                                                   " the image sets /app/model_store",
                                 path("a readable folder (checked at start)"),
                                 shown="the repository's model_store/")
    DEFAULT_MODEL: str = _setting("convnet", "model served by /v1/classify and /v1/inspect",
                                  text("a model name: letters, digits, '.', '_' and '-', not starting with '.'",
                                       lambda value: re.fullmatch(NAME, value) is not None))
    MODEL_POLL_SECONDS: float = _setting(10.0, "every worker rescans MODEL_STORE this often: new versions load, "
                                               "removed ones unload, no restart; 0 = off", seconds())
    MODEL_VERSION_POLICY: str = _setting("latest", "which version serves: 'latest', or pins such as "
                                                   "'convnet=4,lenet=1' (models not named serve their latest)",
                                         text("'latest', or comma-separated pins <model>=<version>, each model once",
                                              lambda value: _version_pins(value) is not None))
    PRECISION: str = _setting(contract.INT8, "which graph serves: the INT8 quantized one when a model has it, or FP32",
                              one_of(*contract.PRECISIONS))
    # Verification at load (service/verification.py). A graph whose integer arithmetic is exact gives export's answers
    # to float rounding on any CPU (0 of 256 images change); the saturating U8S8 kernels of CPUs without VNNI moved
    # 2.3 points of accuracy and 4 of in-domain flags. The tolerances sit between: one image of 256 is 0.39 points.
    VERIFY_IMAGES: int = _setting(256, "images of each version's verification set that the graph about to serve runs "
                                       "at load, in every worker (more: a finer check, 1.5 ms each for INT8 convnet)",
                                  whole(4, 4096))
    VERIFY_MAX_ACCURACY_DROP: float = _setting(0.005, "a graph whose accuracy on the set is this much below export's "
                                                      "figure (0.005 = half a point) is refused", share())
    VERIFY_MAX_AGREEMENT_DROP: float = _setting(0.005, "... or whose top-1 or in-domain agreement with the FP32 "
                                                       "reference answers is this much below export's", share())
    VERIFY_MAX_FLAGGED_RISE: float = _setting(0.005, "... or that flags this much more of the labels' own images as "
                                                     "none of these than at export", share())
    VERIFY_MAX_PROBABILITY_DIFFERENCE: float = _setting(0.02, "... or whose largest probability difference from the "
                                                              "FP32 reference grows by more than this", share())
    REPOSITORY_TIMEOUT: float = _setting(120.0, "seconds a repository load or unload call waits for every worker "
                                                "to apply it (a load includes loading and verifying the model)",
                                         seconds(above=True))
    API_KEYS: str = _setting("", "comma-separated API keys; when set (or API_KEYS_FILE), /v1 and /v2 need one",
                             text("any text: keys separated by commas"), shown="(off)")
    API_KEYS_FILE: str = _setting("", "file of API keys, one per line (# comments); what a Kubernetes Secret mounts",
                                  path("a readable file holding a key (checked at start), or empty for none",
                                       empty_ok=True), shown="(off)")
    API_KEYS_REREAD_SECONDS: float = _setting(2.0, "how often API_KEYS_FILE is checked for a change (a rotated "
                                                   "Secret); a changed file is re-read, no restart",
                                              seconds(above=True))
    WORKERS: int = _setting(2, "gunicorn worker processes; one per CPU core is the measured best", whole(1))
    INFERENCE_THREADS: int = _setting(0, "real threads per worker that decode and run ONNX Runtime; 0 = the CPUs "
                                         "available (affinity mask and cgroup CPU limit) / WORKERS, at least 1",
                                      whole(0, note=" (0 = automatic)"))
    MAX_QUEUE: int = _setting(64, "requests per worker that may wait for an inference thread; more are shed at once "
                                  "(503 overloaded)", whole(1))
    MAX_IMAGES_PER_INFERENCE: int = _setting(8, "most images one ONNX Runtime call takes when waiting requests are "
                                                "batched together; 1 = no batching", whole(1))
    # Measured on a 2-core AMD EPYC VM: handing a request to an inference thread and back costs about 0.8 ms, more
    # than lenet's whole work on a small image (0.3 ms). Work estimated under this runs on the event loop instead.
    INLINE_WORK_SECONDS: float = _setting(0.001, "a request whose work is estimated below this (images of at most "
                                                 "128x128 through a graph without control flow, at its measured "
                                                 "speed) runs on the event loop when no other waits, saving the "
                                                 "hand-over to a thread; 0 = always a thread", seconds())
    QUEUE_TIMEOUT: float = _setting(1.0, "seconds a request may wait for an inference thread before 503 overloaded",
                                    seconds(above=True))
    # The slowest legitimate request measured on a 2-core Intel Xeon (AVX-512 VNNI, AMX) is 1.6 s: a 40 MP WebP,
    # decoded and classified. The default leaves room for a CPU several times slower or a throttled container
    # before a worker is called stuck.
    INFERENCE_WATCHDOG_SECONDS: float = _setting(10.0, "an inference (decode included) running longer than this per "
                                                       "request in its call marks the worker unhealthy: its requests "
                                                       "get 503 worker_unhealthy and it is replaced (gevent worker)",
                                                 seconds(above=True))
    SHED_BACKOFF: float = _setting(0.5, "after a 503 for a full queue, seconds before that connection's next request "
                                         "is read (clients ignoring Retry-After can't spin the server)", seconds())
    BODY_TIMEOUT: float = _setting(15.0, "seconds a client has to send its whole request body; then 408 "
                                         "request_timeout and the connection closes", seconds(above=True))
    KEEPALIVE: int = _setting(5, "seconds an idle keep-alive connection, or one still sending headers, stays open",
                              whole(1, note=" (seconds)"))
    WORKER_CONNECTIONS: int = _setting(1000, "open connections per worker (idle and slow ones cost a few kB each)",
                                       whole(1))
    WORKER_HEARTBEAT_TIMEOUT: int = _setting(30, "seconds a worker may go without a heartbeat before the master "
                                                 "restarts it (not a request timeout)", whole(1, note=" (seconds)"))
    GRACEFUL_TIMEOUT: int = _setting(30, "seconds workers get to finish in-flight requests on shutdown (the drain "
                                         "included)", whole(1, note=" (seconds)"))
    DRAIN_SECONDS: float = _setting(0.0, "on SIGTERM, keep serving this long with /readyz at 503 before stopping",
                                    seconds(note=", less than GRACEFUL_TIMEOUT"))
    MAX_UPLOAD_BYTES: int = _setting(10 * 1024 * 1024, "largest request body accepted (413 above)", whole(1))
    MAX_IMAGES_PER_REQUEST: int = _setting(64, "most images in one request (413 above)", whole(1))
    MAX_IMAGE_PIXELS: int = _setting(40_000_000, "most pixels in one decoded image, against decompression bombs (413)",
                                     whole(1))
    BODY_BUFFER_BYTES: int = _setting(64 * 1024 * 1024, "most request-body bytes a worker holds at once (read, "
                                                         "queued or decoding); more get 503 overloaded (one body alone "
                                                         "always fits)", whole(1))
    DECODE_BUDGET_BYTES: int = _setting(128 * 1024 * 1024, "most bytes the images of one request may take once "
                                                           "decoded, checked from their headers (413 above); with one "
                                                           "inference thread per worker this keeps a worker under "
                                                           "512 MB", whole(1))
    ORT_INTRA_OP_THREADS: int = _setting(1, "ONNX Runtime threads per inference; 1 suits one worker per core",
                                         whole(1))
    LOG_LEVEL: str = _setting("INFO", "log level of the service and gunicorn; logs go to stdout",
                              one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    LOG_FORMAT: str = _setting("text", "'text' lines for people, or 'json': one object per line (time, level, "
                                       "message, request_id; the access line adds status, model, version, stage "
                                       "timings and shed reason)", one_of("text", "json"))
    FORWARDED_ALLOW_IPS: str = _setting("127.0.0.1,::1", "peers whose X-Forwarded-* headers are believed; in "
                                                         "Kubernetes your ingress or mesh proxy, '*' only when every "
                                                         "request comes through one",
                                        text("'*', or comma-separated IP addresses or networks such as 10.0.0.0/8",
                                             _addresses))
    CORS_ORIGINS: str = _setting("", "comma-separated origins allowed by CORS (answers then vary on Origin), or '*' "
                                     "(a literal *, never a reflected origin); empty = CORS off",
                                 text("'*', or comma-separated origins such as https://app.example.org "
                                      "(scheme://host[:port], no path)", _origins), shown="(off)")
    # OpenTelemetry (service/tracing.py): the standard variables; the SDK reads the others (sampler, OTEL_BSP_*,
    # headers, resource attributes) itself.
    OTEL_EXPORTER_OTLP_ENDPOINT: str = _setting("", "OTLP collector base URL for traces (…/v1/traces is added for "
                                                    "http/protobuf); set, tracing is on", text(
                                                        "an http:// or https:// URL, or empty", _otlp_url),
                                                shown="(off)")
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: str = _setting("", "OTLP traces URL, used as given; wins over "
                                                           "OTEL_EXPORTER_OTLP_ENDPOINT", text(
                                                               "an http:// or https:// URL, or empty", _otlp_url),
                                                       shown="(off)")
    OTEL_EXPORTER_OTLP_PROTOCOL: str = _setting("http/protobuf", "OTLP transport: http/protobuf or grpc",
                                                one_of("http/protobuf", "grpc"))
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: str = _setting("", "OTLP transport for traces; wins over "
                                                           "OTEL_EXPORTER_OTLP_PROTOCOL", text(
                                                               "http/protobuf, grpc, or empty",
                                                               lambda value: value in ("", "http/protobuf", "grpc")),
                                                       shown="(OTEL_EXPORTER_OTLP_PROTOCOL)")
    TRACE_STAGES: str = _setting("spans", "each request's stages as child spans of its span, or as events on it "
                                          "(cheaper)", one_of("spans", "events"))
    OTEL_SERVICE_NAME: str = _setting("", "service.name of the spans", text("any text"), shown="convserve")
    OTEL_SDK_DISABLED: str = _setting("false", "true turns tracing off whatever the endpoints say",
                                      one_of("false", "true"))
    PROMETHEUS_MULTIPROC_DIR: str = _setting("", "metrics folder shared by workers; empty: the gunicorn config makes "
                                                 "a private one and removes it on exit",
                                             path("a folder path (emptied at start), or empty", empty_ok=True),
                                             shown="(a private temp folder)")

    def __post_init__(self):
        """Every value is checked here, however the settings were made; each one kept is the parsed one."""
        problems = []
        for spec in fields(self):
            value = getattr(self, spec.name)
            try:
                object.__setattr__(self, spec.name, spec.metadata["allowed"].accept(value))
            except (ValueError, TypeError, LookupError):
                problems.append(problem(spec.name, value, spec.metadata["allowed"].words, spec.metadata["description"]))
        if not problems and self.DRAIN_SECONDS >= self.GRACEFUL_TIMEOUT:
            problems.append(problem("DRAIN_SECONDS", f"{self.DRAIN_SECONDS:g}", "a number of seconds less than "
                                    f"GRACEFUL_TIMEOUT ({self.GRACEFUL_TIMEOUT}), which the drain is part of"))
        if problems:
            raise SettingsError(problems)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """From ``environ`` (the process's environment by default), an empty variable counting as unset; an override
        (a string or a typed value) wins over both. Raises SettingsError."""
        environ = _with_new_names(os.environ if environ is None else environ)
        values = {spec.name: environ[spec.name] for spec in fields(cls) if environ.get(spec.name, "") != ""}
        return cls(**{**values, **overrides})

    @property
    def inference_threads(self) -> int:
        """Inference never runs on more threads than cores in total: each worker takes its share."""
        return self.INFERENCE_THREADS or max(1, available_cpus() // self.WORKERS)

    def grpc_cpu(self, slot: int | None) -> int | None:
        """The CPU the gRPC threads of the worker in ``slot`` (0 .. WORKERS-1) keep to, or None (GRPC_CPU_AFFINITY)."""
        if self.GRPC_CPU_AFFINITY == "off" or slot is None:
            return None
        return cpu_of_worker(slot, self.WORKERS)

    @property
    def version_pins(self) -> dict[str, str]:
        """MODEL_VERSION_POLICY's pins: model name → version."""
        return _version_pins(self.MODEL_VERSION_POLICY)

    @property
    def tracing_enabled(self) -> bool:
        return bool(self.OTEL_EXPORTER_OTLP_ENDPOINT or self.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and \
            self.OTEL_SDK_DISABLED != "true"

    @property
    def otlp_traces_protocol(self) -> str:
        return self.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or self.OTEL_EXPORTER_OTLP_PROTOCOL

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.CORS_ORIGINS.split(",") if origin.strip()]

    def start_problems(self) -> list[str]:
        """What this machine lacks for these settings: the paths they name (not checked when a Settings is made, so
        that a manifest naming the image's paths can be checked anywhere)."""
        problems = []
        if not (self.MODEL_STORE.is_dir() and os.access(self.MODEL_STORE, os.R_OK | os.X_OK)):
            problems.append(f"convserve: MODEL_STORE={shlex.quote(str(self.MODEL_STORE))} is not a readable folder")
        if self.PROMETHEUS_MULTIPROC_DIR:  # made if missing: it, or the folder it would be made in, must be writable
            folder = Path(self.PROMETHEUS_MULTIPROC_DIR)
            existing = next(path for path in (folder, *folder.parents) if path.exists())
            if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
                problems.append(f"convserve: PROMETHEUS_MULTIPROC_DIR={shlex.quote(str(folder))} is not a folder this "
                                "user can write")
        return problems


# Settings renamed, old name → new: the old name still works for one release (0.2 drops it), with a warning at start.
RENAMED = {"BATCH_IMAGES": "MAX_IMAGES_PER_INFERENCE", "MAX_BATCH_IMAGES": "MAX_IMAGES_PER_REQUEST",
           "TIMEOUT": "WORKER_HEARTBEAT_TIMEOUT"}


def _with_new_names(environ) -> dict[str, str]:
    """``environ`` with each renamed setting under its new name; both names set to different values is an error."""
    renamed = {new: environ[old] for old, new in RENAMED.items() if environ.get(old, "") != ""}
    if not renamed:
        return environ
    clashes = [f"convserve: {old}={shlex.quote(environ[old])} and {new}={shlex.quote(environ[new])} are both set: "
               f"{old} is the old name of {new}, so unset it" for old, new in RENAMED.items()
               if environ.get(old, "") != "" and environ.get(new, "") not in ("", environ[old])]
    if clashes:
        raise SettingsError(clashes)
    return {**environ, **renamed}


def deprecation_warnings(environ: dict[str, str] | None = None) -> list[str]:
    """A line for each setting given by its old name."""
    environ = os.environ if environ is None else environ
    return [f"convserve: {old} is deprecated and goes in the next release: it is {new} now (README "
            f"\"Configuration\")" for old, new in RENAMED.items() if environ.get(old, "") != ""]


# gunicorn options that these settings own. Given on gunicorn's command line or in GUNICORN_CMD_ARGS, they would win
# over the config file without a word: --workers 4 with WORKERS=2 would also leave INFERENCE_THREADS sized for 2.
GUNICORN_OPTIONS = {"-w": "WORKERS", "--workers": "WORKERS", "-b": "HOST and PORT", "--bind": "HOST and PORT",
                    "-t": "WORKER_HEARTBEAT_TIMEOUT", "--timeout": "WORKER_HEARTBEAT_TIMEOUT",
                    "--graceful-timeout": "GRACEFUL_TIMEOUT",
                    "--keep-alive": "KEEPALIVE", "--worker-connections": "WORKER_CONNECTIONS",
                    "--log-level": "LOG_LEVEL", "--forwarded-allow-ips": "FORWARDED_ALLOW_IPS"}


def gunicorn_override_problems(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """A line for each gunicorn option in ``argv`` or GUNICORN_CMD_ARGS that would override a setting."""
    environ = os.environ if environ is None else environ
    problems = []
    for source, words in (("GUNICORN_CMD_ARGS", shlex.split(environ.get("GUNICORN_CMD_ARGS", ""))),
                          ("gunicorn's command line", argv)):
        for word in words:
            option = word.split("=", 1)[0]
            if not option.startswith("--"):
                option = option[:2]  # -w4 is -w 4
            if option in GUNICORN_OPTIONS:
                problems.append(f"convserve: {source} sets {option}, which {GUNICORN_OPTIONS[option]} owns here: set "
                                "that instead (README \"Configuration\")")
    return problems


def problem(name: str, value, allowed: str, description: str = "") -> str:
    """One line: the setting, the value given, what it allows, and (briefly) what the setting is."""
    given = shlex.quote(value) if isinstance(value, str) else str(value)
    meaning = re.split(r"[;:] | \(", description, maxsplit=1)[0]
    return f"convserve: {name}={given} is not allowed: {allowed}" + (f" ({meaning})" if meaning else "")


def stop(lines: list[str]) -> NoReturn:
    """Stop the process as a bad setting does: its lines on stderr, exit status 2, no traceback."""
    for line in lines:
        print(line, file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(2)


def prometheus_folder(environ: dict[str, str] | None = None) -> str:
    """The multiprocess metrics folder prometheus_client uses in this process, read from the environment as
    prometheus_client reads it: the gunicorn config sets it before any worker (to a private folder when the
    PROMETHEUS_MULTIPROC_DIR setting is empty); empty without gunicorn."""
    environ = os.environ if environ is None else environ
    return environ.get("PROMETHEUS_MULTIPROC_DIR") or environ.get("prometheus_multiproc_dir", "")  # its old spelling


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, narrowed by a cgroup v2 CPU quota (a Kubernetes CPU limit),
    which the affinity mask does not show. The one place the service counts CPUs."""
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


def cpu_of_worker(slot: int, workers: int, cpus: list[int] | None = None, available: int | None = None) -> int | None:
    """Worker ``slot``'s own CPU, when every worker can have one: the affinity mask holds at least ``workers`` CPUs and
    no cgroup quota shares them with other work (a Kubernetes pod with exclusive cores, a VM, a bare host). In a pod
    that gets a CPU limit on shared cores, a pinned thread could wait for its one CPU while others sit idle: None."""
    try:
        cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    except AttributeError:  # not on Linux
        return None
    available = available_cpus() if available is None else available
    if workers > len(cpus) or available < len(cpus):
        return None
    return cpus[slot % len(cpus)]


# ---- the README's table ---------------------------------------------------------------------------------------------

README = REPO / "README.md"
TABLE_BEGIN = "<!-- settings table: generated by `python -m service.settings --readme`; a test keeps it equal -->"
TABLE_END = "<!-- end of the settings table -->"


def _code(words: str) -> str:
    """Plain words as Markdown: quoted values, setting names, paths and routes in backticks (a bare <name> would be
    taken for an HTML tag)."""
    names = "|".join(spec.name for spec in fields(Settings))

    def code(match: re.Match) -> str:
        token = next(group for group in match.groups() if group)
        if match.group(3):  # a path-like token: a trailing comma or full stop is the sentence's
            token, end = re.fullmatch(r"(.*?)([,.]?)", token).groups()
            return f"`{token}`{end}" if re.search(r"\w", token) else token + end
        return f"`{token}`"

    return re.sub(rf"(?<!\w)'([^']+)'(?!\w)|\b({names})\b|([^\s;()]*[</][^\s;()]*)", code, words)


def _shown(spec) -> str:
    value = spec.default
    if spec.metadata["shown"] is not None:
        return _code(spec.metadata["shown"])
    if isinstance(value, float):
        return f"`{value:g}`"
    if spec.name.endswith("_BYTES") and value % 2**20 == 0:
        return f"`{value}` ({value // 2**20} MiB)"
    return f"`{value}`"


def markdown_table() -> str:
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for spec in fields(Settings):
        cells = [f"`{spec.name}`", _shown(spec), _code(spec.metadata["allowed"].words),
                 _code(spec.metadata["description"])]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    renamed = ", ".join(f"`{old}` → `{new}`" for old, new in RENAMED.items())
    return "\n".join(rows) + (f"\n\nRenamed in 0.1: {renamed}. The old names still work in this release, with a "
                              "warning at start.\n")


def readme_with_table(readme: str) -> str:
    """The README with the table between its markers replaced by the generated one."""
    head, begin, rest = readme.partition(TABLE_BEGIN + "\n")
    _, end, tail = rest.partition(TABLE_END)
    if not begin or not end:
        raise ValueError(f"README.md has no {TABLE_BEGIN!r} ... {TABLE_END!r} markers")
    return head + begin + markdown_table() + end + tail


USAGE = """usage: python -m service.settings [--markdown | --readme]
  (no option)  check the settings the environment gives, and print them
  --markdown   print the README's settings table
  --readme     rewrite that table in README.md"""


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        print(markdown_table(), end="")
    elif argv == ["--readme"]:
        README.write_text(readme_with_table(README.read_text()))
    elif not argv:
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            stop(exc.lines)
        for warning in deprecation_warnings():
            print(warning, file=sys.stderr)
        for spec in fields(settings):
            value = getattr(settings, spec.name)
            print(f"{spec.name}={'(set, not shown)' if spec.name == 'API_KEYS' and value else value}")
        problems = settings.start_problems()
        if problems:
            stop(problems)
    else:
        print(USAGE, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
