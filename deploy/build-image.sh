#!/usr/bin/env bash
# Build the convserve image from the repository's Dockerfile.
#
#   deploy/build-image.sh                        # -> convserve:latest
#   IMAGE=registry.example.com/convserve:1.2 deploy/build-image.sh
#   BASE=python:3.11-slim-bookworm deploy/build-image.sh
#
# Builder: `docker build` when a Docker engine answers (`docker info`), else `buildah bud --isolation chroot` (root,
# no daemon; the OCI image lands in containers-storage, where podman and buildah see it).
# Base: BASE if given. Otherwise the Dockerfile's default (python:3.11-slim-bookworm) when it is present locally or
# can be pulled; when it cannot (no route to docker.io), a local Debian base is made with deploy/make-base-image.sh
# and used instead (localhost/convserve-base:bookworm).
#
# Settings (environment): IMAGE, BASE, BUILDER=docker|buildah (force one), PULL_TIMEOUT (seconds, default 60),
# CA_BUNDLE (CA file pip trusts during the build; default $PIP_CERT or the system bundle; empty = none),
# EXTRA_BUILD_ARGS (appended to the build command, word-split).
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-convserve:latest}
BASE=${BASE:-}
PULL_TIMEOUT=${PULL_TIMEOUT:-60}
DEFAULT_BASE=$(sed -n 's/^ARG BASE=//p' Dockerfile | head -n 1)
LOCAL_BASE=${LOCAL_BASE:-localhost/convserve-base:bookworm}

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ -z "${BUILDER:-}" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        BUILDER=docker
    elif command -v buildah >/dev/null; then
        BUILDER=buildah
    else
        die "no Docker engine answers and buildah is not installed (apt-get install buildah)."
    fi
fi

# Is the image present, or can it be pulled within PULL_TIMEOUT?
have_or_pull() {
    local ref=$1
    case "$BUILDER" in
        docker)
            docker image inspect "$ref" >/dev/null 2>&1 && return 0
            timeout "$PULL_TIMEOUT" docker pull -q "$ref" >/dev/null 2>&1 ;;
        buildah)
            # An unqualified name is a docker.io name for `docker build`; say so, rather than trust registries.conf.
            local first=${ref%%/*}
            if [ "$first" != "$ref" ] && { [[ $first == *[.:]* ]] || [ "$first" = localhost ]; }; then
                :  # already names its registry
            elif [[ $ref == */* ]]; then
                ref=docker.io/$ref
            else
                ref=docker.io/library/$ref
            fi
            buildah inspect --type image "$ref" >/dev/null 2>&1 && { echo "$ref"; return 0; }
            timeout "$PULL_TIMEOUT" buildah pull --quiet "$ref" >/dev/null 2>&1 && { echo "$ref"; return 0; }
            return 1 ;;
    esac
}

if [ -z "$BASE" ]; then
    if resolved=$(have_or_pull "$DEFAULT_BASE"); then
        BASE=${resolved:-$DEFAULT_BASE}
    else
        log "$DEFAULT_BASE is not available and cannot be pulled: using a local Debian base ($LOCAL_BASE)."
        # into the store the builder reads: Docker's, or containers-storage (podman's = buildah's)
        IMPORTER=$([ "$BUILDER" = docker ] && echo docker || echo podman) BASE_IMAGE=$LOCAL_BASE \
            bash deploy/make-base-image.sh
        BASE=$LOCAL_BASE
    fi
fi

# pip in the build trusts this CA bundle (a build secret, not stored in the image): where HTTPS egress goes through
# an intercepting proxy, the host's bundle holds the proxy's CA and the base image's does not.
CA_BUNDLE=${CA_BUNDLE-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
secret_args=()
if [ -n "$CA_BUNDLE" ] && [ -s "$CA_BUNDLE" ]; then
    secret_args=(--secret "id=ca_bundle,src=$CA_BUNDLE")
fi

VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)
REVISION=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$REVISION" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then REVISION=$REVISION-dirty; fi
label_args=(--build-arg "VERSION=${VERSION:-unknown}" --build-arg "REVISION=$REVISION")

log "building $IMAGE from BASE=$BASE with $BUILDER"
start=$(date +%s)
# shellcheck disable=SC2086  # EXTRA_BUILD_ARGS is meant to be word-split
case "$BUILDER" in
    docker)
        # BuildKit for RUN --mount=type=secret (the default builder since Docker 23).
        DOCKER_BUILDKIT=1 docker build \
            --build-arg "BASE=$BASE" "${label_args[@]}" "${secret_args[@]}" -t "$IMAGE" -f Dockerfile \
            ${EXTRA_BUILD_ARGS:-} . ;;
    buildah)
        [ "$(id -u)" -eq 0 ] || die "buildah --isolation chroot needs root."
        # --format docker: the OCI format has no HEALTHCHECK; --layers: reuse unchanged steps on rebuilds.
        buildah bud --isolation chroot --format docker --layers \
            --build-arg "BASE=$BASE" "${label_args[@]}" "${secret_args[@]}" -t "$IMAGE" -f Dockerfile \
            ${EXTRA_BUILD_ARGS:-} . ;;
    *)
        die "BUILDER must be docker or buildah, not '$BUILDER'." ;;
esac
log "built $IMAGE in $(( $(date +%s) - start ))s"
