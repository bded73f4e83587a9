"""Settings: every value is parsed and checked once, by service/settings.py, and a bad one stops the start.

A bad value stops it with one line naming the setting and what it allows (gunicorn, `python -m service.settings`),
never a traceback."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from service.settings import Settings, SettingsError
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
NAMES = [spec.name for spec in dataclasses.fields(Settings)]


def clean_environ(**settings: str) -> dict[str, str]:
    """This process's environment without any setting, plus the ones given."""
    return {**{key: value for key, value in os.environ.items() if key not in NAMES}, **settings}


def error_line(**environ: str) -> str:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(environ)
    (line,) = raised.value.lines
    assert str(raised.value) == line
    return line


# ---- every setting has a default that passes its own checks -----------------------------------------------------

def test_defaults_are_valid_and_described():
    assert Settings.from_env({}) == Settings()
    for spec in dataclasses.fields(Settings):
        assert spec.metadata["description"] and spec.metadata["allowed"].words, spec.name
        assert spec.metadata["allowed"].accept(spec.default) == spec.default, spec.name


def test_values_are_parsed_and_normalized():
    settings = Settings.from_env({"PORT": " 9000 ", "QUEUE_TIMEOUT": "0.25", "LOG_LEVEL": "debug", "PRECISION": "FP32",
                                  "MODEL_STORE": "/models", "INFERENCE_THREADS": "0", "MODEL_POLL_SECONDS": "0"})
    assert settings.PORT == 9000 and settings.QUEUE_TIMEOUT == 0.25 and settings.INFERENCE_THREADS == 0
    assert settings.LOG_LEVEL == "DEBUG" and settings.PRECISION == "fp32" and settings.MODEL_STORE == Path("/models")
    assert Settings.from_env({"WORKERS": ""}).WORKERS == Settings().WORKERS, "an empty variable counts as unset"
    assert Settings.from_env({"WORKERS": "9"}, WORKERS=3).WORKERS == 3, "an override wins over the environment"
    assert Settings(WORKERS="4").WORKERS == 4, "however made, values are parsed"


@pytest.mark.parametrize("name, value", [
    ("PORT", "1"), ("PORT", "65535"),
    ("HOST", "127.0.0.1"), ("HOST", "::"), ("HOST", "localhost"), ("HOST", "convserve.ml-serving.svc"),
    ("DEFAULT_MODEL", "convnet-fast"), ("DEFAULT_MODEL", "lenet_2.1"),
    ("MODEL_VERSION_POLICY", "latest"), ("MODEL_VERSION_POLICY", "convnet=4, lenet=1"),
    ("PRECISION", "int8"), ("PRECISION", "fp32"), ("GRPC_CPU_AFFINITY", "OFF"), ("GRPC_CPU_AFFINITY", "auto"),
    ("API_KEYS", "one, two"), ("API_KEYS_FILE", "/etc/convserve/api-keys/keys"),
    ("DRAIN_SECONDS", "29.5"), ("SHED_BACKOFF", "0"), ("KEEPALIVE", "1"),
    ("FORWARDED_ALLOW_IPS", "*"), ("FORWARDED_ALLOW_IPS", "10.0.0.0/8, 192.168.1.7,::1"),
    ("CORS_ORIGINS", "*"), ("CORS_ORIGINS", "https://app.example.org, http://localhost:3000"),
    ("PROMETHEUS_MULTIPROC_DIR", "/tmp/metrics"),
])
def test_allowed_values(name, value):
    Settings.from_env({name: value})


# ---- each setting's bounds: the one line names it, the value and what is allowed ---------------------------------

BAD_VALUES = [
    ("PORT", "abc", "a whole number from 1 to 65535"), ("PORT", "0", "from 1 to 65535"),
    ("PORT", "65536", "from 1 to 65535"), ("PORT", "80.5", "whole number"),
    ("GRPC_PORT", "-1", "a whole number from 0 to 65535"), ("GRPC_PORT", "grpc", "from 0 to 65535"),
    ("GRPC_MAX_CALLS", "0", "a whole number >= 1"), ("GRPC_CPU_AFFINITY", "on", "one of auto, off"),
    ("REPOSITORY_TIMEOUT", "0", "a number of seconds > 0"),
    ("HOST", "not a host", "an IP address or host name"), ("HOST", "-bad-", "host name"),
    ("MODEL_STORE", " ", "a readable folder"),
    ("DEFAULT_MODEL", "../etc", "a model name"), ("DEFAULT_MODEL", ".hidden", "not starting with '.'"),
    ("MODEL_POLL_SECONDS", "-1", "a number of seconds >= 0"), ("MODEL_POLL_SECONDS", "soon", "seconds"),
    ("MODEL_VERSION_POLICY", "lenet:1", "'latest', or comma-separated pins"),
    ("MODEL_VERSION_POLICY", "lenet=1,lenet=2", "each model once"), ("MODEL_VERSION_POLICY", "newest", "'latest'"),
    ("PRECISION", "fp16", "one of int8, fp32"),
    ("VERIFY_IMAGES", "2", "a whole number from 4 to 4096"), ("VERIFY_IMAGES", "all", "from 4 to 4096"),
    ("VERIFY_MAX_ACCURACY_DROP", "1.5", "a number from 0 to 1"), ("VERIFY_MAX_AGREEMENT_DROP", "-0.1", "0 to 1"),
    ("VERIFY_MAX_FLAGGED_RISE", "nan", "a number from 0 to 1"),
    ("VERIFY_MAX_PROBABILITY_DIFFERENCE", "half", "a number from 0 to 1"),
    ("WORKERS", "0", "a whole number >= 1"), ("WORKERS", "-2", ">= 1"), ("WORKERS", "two", ">= 1"),
    ("INFERENCE_THREADS", "-1", "a whole number >= 0 (0 = automatic)"),
    ("MAX_QUEUE", "0", "a whole number >= 1"), ("MAX_IMAGES_PER_INFERENCE", "0", ">= 1"),
    ("QUEUE_TIMEOUT", "0", "a number of seconds > 0"), ("QUEUE_TIMEOUT", "nan", "> 0"), ("QUEUE_TIMEOUT", "inf", "> 0"),
    ("SHED_BACKOFF", "-0.5", "a number of seconds >= 0"),
    ("INFERENCE_WATCHDOG_SECONDS", "0", "a number of seconds > 0"), ("API_KEYS_REREAD_SECONDS", "-1", "> 0"),
    ("BODY_TIMEOUT", "0", "a number of seconds > 0"),
    ("KEEPALIVE", "0", "a whole number >= 1 (seconds)"), ("KEEPALIVE", "2.5", "whole number"),
    ("WORKER_CONNECTIONS", "0", ">= 1"),
    ("WORKER_HEARTBEAT_TIMEOUT", "0", "a whole number >= 1 (seconds)"), ("GRACEFUL_TIMEOUT", "0", ">= 1"),
    ("DRAIN_SECONDS", "-1", "a number of seconds >= 0"),
    ("DRAIN_SECONDS", "30", "less than GRACEFUL_TIMEOUT (30)"),
    ("MAX_UPLOAD_BYTES", "10MB", "a whole number >= 1"), ("MAX_UPLOAD_BYTES", "0", ">= 1"),
    ("MAX_IMAGES_PER_REQUEST", "0", ">= 1"), ("MAX_IMAGE_PIXELS", "0", ">= 1"),
    ("BODY_BUFFER_BYTES", "0", ">= 1"), ("DECODE_BUDGET_BYTES", "-1", ">= 1"),
    ("ORT_INTRA_OP_THREADS", "0", "a whole number >= 1"),
    ("LOG_LEVEL", "verbose", "one of DEBUG, INFO, WARNING, ERROR"),
    ("LOG_FORMAT", "xml", "one of text, json"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "an http:// or https:// URL"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://collector/v1/traces", "an http:// or https:// URL"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "one of http/protobuf, grpc"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift", "http/protobuf, grpc, or empty"),
    ("OTEL_SDK_DISABLED", "maybe", "one of false, true"),
    ("TRACE_STAGES", "logs", "one of spans, events"),
    ("INLINE_WORK_SECONDS", "-0.001", "a number of seconds >= 0"),
    ("FORWARDED_ALLOW_IPS", "proxy.local", "'*', or comma-separated IP addresses or networks"),
    ("FORWARDED_ALLOW_IPS", "10.0.0.1/8", "networks"),
    ("CORS_ORIGINS", "https://app.example.org/", "scheme://host[:port], no path"),
    ("CORS_ORIGINS", "app.example.org", "origins"), ("CORS_ORIGINS", "*, https://a.example", "'*', or"),
]


def test_every_setting_has_bad_values_in_the_table():
    checked = {name for name, _, _ in BAD_VALUES}
    free_text = {"API_KEYS", "API_KEYS_FILE", "PROMETHEUS_MULTIPROC_DIR", "OTEL_SERVICE_NAME"}  # any path or text
    assert set(NAMES) - free_text == checked, f"add bad values for {sorted(set(NAMES) - free_text - checked)}"


@pytest.mark.parametrize("name, value, allowed", BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_setting_and_what_is_allowed(name, value, allowed):
    line = error_line(**{name: value})
    assert line.startswith(f"convserve: {name}="), line
    assert value.strip() in line and " is not allowed: " in line and allowed in line, line
    assert "\n" not in line and len(line) < 400


def test_a_value_is_shown_as_given():
    assert error_line(WORKERS="0") == "convserve: WORKERS=0 is not allowed: a whole number >= 1 (gunicorn worker " \
                                      "processes)"
    assert error_line(HOST="a b").startswith("convserve: HOST='a b' is not allowed: ")


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"WORKERS": "0", "PORT": "abc", "LOG_LEVEL": "loud"})
    assert [line.split("=")[0] for line in raised.value.lines] == \
        ["convserve: PORT", "convserve: WORKERS", "convserve: LOG_LEVEL"]


def test_typed_overrides_are_checked_too():
    for overrides in ({"WORKERS": 0}, {"WORKERS": True}, {"QUEUE_TIMEOUT": -1.0}, {"PORT": 8080.0}):
        with pytest.raises(SettingsError):
            Settings.from_env({}, **overrides)
    assert isinstance(SettingsError(["x"]), ValueError)


def test_version_pins():
    assert Settings().version_pins == {}
    assert Settings(MODEL_VERSION_POLICY=" convnet = 4 ,lenet=1").version_pins == {"convnet": "4", "lenet": "1"}


# ---- what the machine must have: checked at start ---------------------------------------------------------------

def test_start_problems_name_the_paths(tmp_path):
    assert Settings().start_problems() == []
    assert Settings(MODEL_STORE=tmp_path / "missing").start_problems() == \
        [f"convserve: MODEL_STORE={tmp_path / 'missing'} is not a readable folder"]
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert Settings(PROMETHEUS_MULTIPROC_DIR=str(a_file / "metrics")).start_problems() == \
        [f"convserve: PROMETHEUS_MULTIPROC_DIR={a_file / 'metrics'} is not a folder this user can write"]
    assert Settings(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "new" / "metrics")).start_problems() == []


# ---- the real start: gunicorn with its config, and `python -m service.settings` ---------------------------------

def start(command: list[str], **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=clean_environ(**settings), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


GUNICORN = [str(Path(sys.executable).parent / "gunicorn"), "-c", "python:service.gunicorn_config"]


@pytest.mark.parametrize("setting, value, line", [
    ("WORKERS", "0", "convserve: WORKERS=0 is not allowed: a whole number >= 1 (gunicorn worker processes)"),
    ("PORT", "abc", "convserve: PORT=abc is not allowed: a whole number from 1 to 65535 (TCP port gunicorn listens "
                    "on)"),
    ("MODEL_VERSION_POLICY", "lenet:1", "convserve: MODEL_VERSION_POLICY=lenet:1 is not allowed: 'latest', or "
                                        "comma-separated pins <model>=<version>, each model once (which version "
                                        "serves)"),
    ("MODEL_STORE", "/nonexistent/store", "convserve: MODEL_STORE=/nonexistent/store is not a readable folder"),
    ("API_KEYS_FILE", "/nonexistent/keys", "convserve: API_KEYS_FILE=/nonexistent/keys: cannot read it (No such file "
                                           "or directory)."),
    ("GUNICORN_CMD_ARGS", "--workers 4", "convserve: GUNICORN_CMD_ARGS sets --workers, which WORKERS owns here: set "
                                         'that instead (README "Configuration")'),
])
def test_gunicorn_stops_with_one_line_and_no_traceback(setting, value, line):
    """`make serve` and the image's CMD: the master exits before any worker, status 2, one line on stderr."""
    result = start(GUNICORN, **{"PORT": str(free_port()), setting: value})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""


def test_gunicorn_stops_when_the_metrics_folder_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    result = start(GUNICORN, PORT=str(free_port()), PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "file" / "metrics"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == \
        [f"convserve: PROMETHEUS_MULTIPROC_DIR={tmp_path / 'file' / 'metrics'} is not a folder this user can write"]


def test_python_m_service_settings_checks_the_environment():
    bad = start([sys.executable, "-m", "service.settings"], WORKERS="0", PORT="x")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        "convserve: PORT=x is not allowed: a whole number from 1 to 65535 (TCP port gunicorn listens on)",
        "convserve: WORKERS=0 is not allowed: a whole number >= 1 (gunicorn worker processes)"]
    good = start([sys.executable, "-m", "service.settings"], WORKERS="3", API_KEYS="secret-key")
    assert good.returncode == 0, good.stderr
    assert "WORKERS=3" in good.stdout.splitlines() and len(good.stdout.splitlines()) == len(NAMES)
    assert "secret-key" not in good.stdout, "keys are never shown"


# ---- one reader of the environment, one count of CPUs -------------------------------------------------------------

def python_sources(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def test_only_the_settings_module_reads_the_environment():
    """Writes for libraries (PROMETHEUS_MULTIPROC_DIR for prometheus_client, ONNX Runtime's telemetry) are fine."""
    reads = re.compile(r"os\.getenv\(|os\.environ(?!\[[^\]]+\]\s*=)(?!\.setdefault\()")
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in python_sources("service") if path.name != "settings.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if reads.search(line)]
    assert not offenders, "read settings through service.settings:\n" + "\n".join(offenders)


def test_cpus_are_counted_in_one_place():
    counting = re.compile(r"sched_getaffinity|cpu_count\(|cpu\.max")
    offenders = [str(path.relative_to(ROOT)) for path in python_sources("service", "bench")
                 if path.name != "settings.py" and counting.search(path.read_text())]
    assert not offenders, f"use service.settings.available_cpus(): {offenders}"


# ---- the README's table is generated from the settings --------------------------------------------------------------

def test_readme_settings_table_is_the_generated_one():
    from service.settings import README, markdown_table, readme_with_table

    readme = README.read_text()
    assert readme_with_table(readme) == readme, "run: python -m service.settings --readme"
    assert markdown_table() in readme
    for name in NAMES:
        assert f"| `{name}` |" in markdown_table()


def test_markdown_puts_code_in_backticks():
    from service.settings import markdown_table

    rows = {row.split(" | ")[0].strip("| `"): row for row in markdown_table().splitlines()[2:]}
    assert "`<name>/<version>/{model.onnx,inspect.onnx,metadata.json}`" in rows["MODEL_STORE"]
    assert "`convnet=4,lenet=1`" in rows["MODEL_VERSION_POLICY"] and "`/v1/classify`" in rows["DEFAULT_MODEL"]
    assert "connection's next request" in rows["SHED_BACKOFF"], "an apostrophe is no quote"
    assert "`67108864` (64 MiB)" in rows["BODY_BUFFER_BYTES"]


# ---- settings are made once per server, in the master, and passed down -------------------------------------------

COUNTING_SITECUSTOMIZE = """
import os
from service import settings
made = settings.Settings.__post_init__
def counted(self):
    with open({record!r}, "a") as record:
        record.write(f"{{os.getpid()}}\\n")
    made(self)
settings.Settings.__post_init__ = counted
"""


def test_a_server_makes_its_settings_once_in_the_master(tmp_path):
    """Workers, requests, scrapes and the SIGTERM drain all use the master's settings, inherited at fork."""
    from tests.helpers import GunicornServer, image_bytes

    record = tmp_path / "settings-made"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(COUNTING_SITECUSTOMIZE.format(record=str(record)))
    server = GunicornServer(tmp_path, PYTHONPATH=f"{site}:{ROOT}", WORKERS=2, DRAIN_SECONDS="0.2")
    try:
        server.wait_ready()
        assert requests.post(server.url + "/v1/classify", data=image_bytes(), headers={"Content-Type": "image/png"},
                             timeout=10).status_code == 200
        assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
        workers = server.worker_pids()
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log()
    assert record.read_text().split() == [str(server.process.pid)], \
        f"settings made by {record.read_text().split()}; master {server.process.pid}, workers {sorted(workers)}"


# ---- renamed settings: the old names work for one release, with a warning -----------------------------------------

def test_an_old_setting_name_still_works_and_says_its_new_name():
    from service.settings import RENAMED, deprecation_warnings

    environ = {"BATCH_IMAGES": "4", "TIMEOUT": "40", "MAX_BATCH_IMAGES": "9"}
    settings = Settings.from_env(environ)
    assert (settings.MAX_IMAGES_PER_INFERENCE, settings.WORKER_HEARTBEAT_TIMEOUT, settings.MAX_IMAGES_PER_REQUEST) \
        == (4, 40, 9)
    assert deprecation_warnings(environ) == [
        f'convserve: {old} is deprecated and goes in the next release: it is {new} now (README "Configuration")'
        for old, new in RENAMED.items()]
    assert Settings.from_env({"TIMEOUT": "40", "WORKER_HEARTBEAT_TIMEOUT": "40"}).WORKER_HEARTBEAT_TIMEOUT == 40
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"TIMEOUT": "40", "WORKER_HEARTBEAT_TIMEOUT": "20"})
    assert raised.value.lines == ["convserve: TIMEOUT=40 and WORKER_HEARTBEAT_TIMEOUT=20 are both set: TIMEOUT is the "
                                  "old name of WORKER_HEARTBEAT_TIMEOUT, so unset it"]


def test_python_m_service_settings_warns_of_an_old_name():
    result = start([sys.executable, "-m", "service.settings"], BATCH_IMAGES="4")
    assert result.returncode == 0, result.stderr
    assert "MAX_IMAGES_PER_INFERENCE=4" in result.stdout.splitlines()
    assert result.stderr.splitlines() == ['convserve: BATCH_IMAGES is deprecated and goes in the next release: it is '
                                          'MAX_IMAGES_PER_INFERENCE now (README "Configuration")']


def test_a_worker_gets_a_cpu_of_its_own_only_where_the_workers_have_cpus_to_themselves():
    from service.settings import cpu_of_worker

    assert [cpu_of_worker(slot, 2, cpus=[0, 1], available=2) for slot in (0, 1)] == [0, 1]
    assert [cpu_of_worker(slot, 2, cpus=[4, 7, 9], available=3) for slot in (0, 1)] == [4, 7]  # a cpuset
    assert cpu_of_worker(0, 3, cpus=[0, 1], available=2) is None  # more workers than CPUs
    assert cpu_of_worker(0, 2, cpus=list(range(16)), available=2) is None  # a CPU quota on shared cores
    assert Settings.from_env({"GRPC_CPU_AFFINITY": "off"}, WORKERS=1).grpc_cpu(0) is None
    assert Settings.from_env({}, WORKERS=1).grpc_cpu(None) is None  # a worker gunicorn gave no slot
