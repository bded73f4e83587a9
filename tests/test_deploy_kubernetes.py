"""The Kubernetes manifests, rendered by kustomize and validated by kubernetes-validate, and what they must hold.

Checked: kinds, CRD fields, the restricted pod security standard, sizing, settings, API keys, probes, the HPA, PDB and
monitors, and the queue-autoscaling overlay with its Prometheus adapter rule.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import PurePosixPath

import pytest
import yaml

from tests.deploy_artefacts import (
    ADAPTER_VALUES,
    API_KEYS_SECRET,
    BASE_CORE_KINDS,
    CORE_KINDS,
    CRD_KINDS,
    K8S,
    KSERVE_COMPONENT_FIELDS,
    KUBERNETES_VERSION,
    NEWEST_KUBERNETES,
    PROM,
    SIZED_IN_THE_MANIFEST,
    UID,
    by_kind,
    env_of,
    exported_metric_names,
    image_settings,
    pod_settings,
    promql_metric_names,
    promtool,
    quantity,
    run,
    secret_entries,
    secret_named,
    settings_names,
)

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
    except auth.KeyFileError:
        return  # refuses to start: the pods stay unready, the API closed
    try:
        keys.check("POST", "/v1/classify", {})
    except Unauthorized:
        return  # starts, and refuses every /v1 and /v2 request
    pytest.fail("an API_KEYS_FILE holding no key (the Secret as shipped) leaves /v1 and /v2 open: the service must "
                "refuse to start (as for an unreadable file) or refuse every request")




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
        assert settings.WORKER_HEARTBEAT_TIMEOUT <= graceful, \
            f"{owner}: a busy worker may miss its heartbeat this long before it is replaced; graceful must cover it"


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


