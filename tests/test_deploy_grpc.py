"""gRPC in the deployment artefacts: the image's port, the base Service and Deployment, and the KServe gRPC variant.

The image exposes GRPC_PORT, the base Service and Deployment carry the port and a gRPC liveness probe, and the KServe
gRPC variant (h2c port, gRPC probes) renders and validates like the rest."""

from __future__ import annotations

import pytest

from service.settings import Settings
from tests.deploy_artefacts import (
    K8S,
    KSERVE_COMPONENT_FIELDS,
    KUBERNETES_VERSION,
    NEWEST_KUBERNETES,
    by_kind,
    pod_settings,
    render,
)

GRPC_PORT = Settings().GRPC_PORT


@pytest.fixture(scope="module")
def grpc_docs() -> list[dict]:
    return render(K8S / "overlays" / "kserve-grpc")


def test_the_base_service_routes_grpc_to_the_pods(base_docs):
    service = by_kind(base_docs, "Service")
    grpc_port = next(port for port in service["spec"]["ports"] if port["name"] == "grpc")
    assert grpc_port["targetPort"] == "grpc" and grpc_port["appProtocol"] == "kubernetes.io/h2c"
    container = by_kind(base_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    declared = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert declared["grpc"] == pod_settings(container).GRPC_PORT
    assert container["livenessProbe"]["grpc"]["port"] == declared["grpc"]


def test_the_kserve_grpc_variant_serves_h2c_with_grpc_probes(grpc_docs):
    assert sorted(doc["kind"] for doc in grpc_docs) == ["InferenceService", "PodMonitor", "Secret"]
    isvc = by_kind(grpc_docs, "InferenceService")
    container = isvc["spec"]["predictor"]["containers"][0]
    assert container["ports"] == [{"name": "h2c", "containerPort": GRPC_PORT, "protocol": "TCP"}]
    assert pod_settings(container).GRPC_PORT == GRPC_PORT
    for probe, service in (("startupProbe", "liveness"), ("livenessProbe", "liveness"),
                           ("readinessProbe", "readiness")):
        assert container[probe]["grpc"] == {"port": GRPC_PORT, "service": service}, probe
        assert "httpGet" not in container[probe]
    monitor = by_kind(grpc_docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]
    assert monitor["portNumber"] == pod_settings(container).PORT and "port" not in monitor


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, NEWEST_KUBERNETES])
def test_the_kserve_grpc_predictor_is_a_valid_pod_spec(grpc_docs, version):
    import kubernetes_validate

    predictor = dict(by_kind(grpc_docs, "InferenceService")["spec"]["predictor"])
    pod_spec = {key: value for key, value in predictor.items() if key not in KSERVE_COMPONENT_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, version, strict=True)


def test_a_broken_grpc_probe_is_caught(grpc_docs):
    import kubernetes_validate

    predictor = dict(by_kind(grpc_docs, "InferenceService")["spec"]["predictor"])
    pod_spec = {key: value for key, value in predictor.items() if key not in KSERVE_COMPONENT_FIELDS}
    container = dict(pod_spec["containers"][0])
    container["livenessProbe"] = {"grpc": {"port": "h2c"}}  # a gRPC probe takes a number, not a port name
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {**pod_spec, "containers": [container]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
