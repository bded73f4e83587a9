#!/usr/bin/env bash
# Build a local Python base image from Debian packages, for machines that cannot pull python:3.11-slim-bookworm.
#
#   sudo deploy/make-base-image.sh            # -> localhost/convserve-base:bookworm (skipped if it exists)
#   FORCE=1 sudo deploy/make-base-image.sh    # rebuild it
#
# debootstrap (minbase + python3, python3-venv, ca-certificates) into a temporary folder under /var/tmp, security
# updates applied, docs and apt caches removed, then imported with `podman import` (or `docker import` where a Docker
# engine answers). Python is /usr/bin/python3 (3.11 on bookworm); the Dockerfile's `python3 -m venv` works on it.
#
# Settings (environment):
#   BASE_IMAGE      image name to create            (default localhost/convserve-base:bookworm)
#   SUITE           Debian suite                    (default bookworm)
#   DEBIAN_MIRROR   Debian mirror URL               (default: the one apt uses on this machine, from /etc/apt)
#   SECURITY_MIRROR Debian security mirror URL      (default: the one apt uses on this machine; empty = no updates)
#   FORCE=1         rebuild even if the image exists
#   WORKDIR_PARENT  where the temporary root is made (default /var/tmp; never inside the repository)
#   IMPORTER        docker or podman (default: docker if an engine answers, else podman; podman's store is buildah's)
# Needs root, debootstrap, and podman or docker.
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/convserve-base:bookworm}
SUITE=${SUITE:-bookworm}
FORCE=${FORCE:-0}
WORKDIR_PARENT=${WORKDIR_PARENT:-/var/tmp}
PACKAGES=python3,python3-venv,ca-certificates

log() { printf 'make-base-image: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The first URI apt uses for a suite: deb822 *.sources stanzas first, then one-line sources.list entries.
apt_mirror_for() {
    local suite=$1 file uri
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -r "$file" ] || continue
        uri=$(awk -v suite="$suite" 'BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Types:/)  { types = $i;  sub(/^Types:/, "", types) }
                    if ($i ~ /^URIs:/)   { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:/, "", suites) }
                }
                if ((" " types " ") ~ /[ \t]deb[ \t]/ && (" " suites " ") ~ ("[ \t]" suite "[ \t]")) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$file")
        if [ -n "$uri" ]; then echo "$uri"; return 0; fi
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$file" ] || continue
        uri=$(sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$file" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }')
        if [ -n "$uri" ]; then echo "$uri"; return 0; fi
    done
    return 0
}

image_exists() {
    if [ "$IMPORTER" = docker ]; then docker image inspect "$BASE_IMAGE" >/dev/null 2>&1
    else podman image exists "$BASE_IMAGE"; fi
}

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root (run as root or with sudo)."
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)."
IMPORTER=${IMPORTER:-}
if [ -z "$IMPORTER" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        IMPORTER=docker
    elif command -v podman >/dev/null; then
        IMPORTER=podman
    else
        die "neither a Docker engine nor podman is available to import the image."
    fi
fi
case "$IMPORTER" in
    docker|podman) command -v "$IMPORTER" >/dev/null || die "IMPORTER=$IMPORTER is not installed." ;;
    *) die "IMPORTER must be docker or podman, not '$IMPORTER'." ;;
esac

if [ "$FORCE" != 1 ] && image_exists; then
    log "$BASE_IMAGE already exists ($IMPORTER); FORCE=1 rebuilds it."
    exit 0
fi

DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(apt_mirror_for "$SUITE")}
[ -n "$DEBIAN_MIRROR" ] || die "no apt source for suite '$SUITE' in /etc/apt; set DEBIAN_MIRROR."
if [ -z "${SECURITY_MIRROR+set}" ]; then SECURITY_MIRROR=$(apt_mirror_for "$SUITE-security"); fi

case "$(realpath -m "$WORKDIR_PARENT")/" in
    "$(realpath -m "$(dirname "$0")/..")"/*) die "WORKDIR_PARENT must not be inside the repository." ;;
esac
WORKDIR=$(mktemp -d "$WORKDIR_PARENT/convserve-base.XXXXXX")
ROOT=$WORKDIR/rootfs
cleanup() {
    # debootstrap may leave /proc or /sys mounted inside the root on failure: unmount before removing.
    for mount in "$ROOT/proc" "$ROOT/sys" "$ROOT/dev/pts" "$ROOT/dev"; do
        mountpoint -q "$mount" 2>/dev/null && umount -l "$mount" || true
    done
    rm -rf --one-file-system "$WORKDIR"
}
trap cleanup EXIT

log "debootstrap $SUITE from $DEBIAN_MIRROR into $ROOT"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$DEBIAN_MIRROR" >"$WORKDIR/debootstrap.log" 2>&1 \
    || { tail -n 40 "$WORKDIR/debootstrap.log" >&2; die "debootstrap failed"; }

# Keep later package installs slim too (as the official slim images do).
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/01-convserve-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat >"$ROOT/etc/apt/apt.conf.d/01-convserve-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF

{
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$DEBIAN_MIRROR" "$SUITE" "$SUITE"
    if [ -n "$SECURITY_MIRROR" ]; then
        printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$SECURITY_MIRROR" "$SUITE"
    fi
} >"$ROOT/etc/apt/sources.list.d/debian.sources"
rm -f "$ROOT/etc/apt/sources.list"

log "applying $SUITE-updates${SECURITY_MIRROR:+ and $SUITE-security} updates"
chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Options::=--force-confold upgrade && apt-get clean' \
    >"$WORKDIR/upgrade.log" 2>&1 || { tail -n 40 "$WORKDIR/upgrade.log" >&2; die "apt-get upgrade in the new root failed"; }

log "removing docs, caches and host-specific files"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/* "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old \
    "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/lintian/* "$ROOT"/var/log/* "$ROOT"/tmp/* \
    "$ROOT"/var/tmp/* "$ROOT"/root/.cache
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
# The container runtime provides these at run time; the host's must not be baked in.
: >"$ROOT/etc/resolv.conf"
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/etc/hostname"

log "importing as $BASE_IMAGE with $IMPORTER ($(du -sh --apparent-size "$ROOT" | cut -f1) uncompressed)"
tar --numeric-owner --xattrs -C "$ROOT" -cf - . | "$IMPORTER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/usr/bin/python3"]' \
    --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE" \
    - "$BASE_IMAGE" >/dev/null
log "done: $BASE_IMAGE ($(chroot "$ROOT" /usr/bin/python3 --version 2>&1))"
