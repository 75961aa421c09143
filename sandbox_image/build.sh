#!/usr/bin/env bash
# Build the docker sandbox image tir-sandbox:latest without pulling anything.
#
# No registry is reachable on the machines this runs on, so unless BASE_IMAGE names an image that
# is already present, a minimal Debian with python3, numpy and sympy is debootstrapped and
# `docker import`ed first (about a minute). Idempotent: the base is built once, and the final
# `docker build` is a cache hit unless runner.py, the Dockerfile or tir_envs/sandbox/cell.py changed.
#
#   sandbox_image/build.sh                         # local Debian base, then tir-sandbox:latest
#   BASE_IMAGE=python:3.12-slim sandbox_image/build.sh   # where pulling works
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CELL_DIR="$HERE/../tir_envs/sandbox"  # cell.py: how a cell runs, shared with the local kernel
IMAGE="${IMAGE:-tir-sandbox:latest}"
LOCAL_BASE="${LOCAL_BASE:-tir-sandbox-base:bookworm}"
BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}"
SUITE="${DEBIAN_SUITE:-bookworm}"

log() { echo "[build.sh] $*" >&2; }

mirror() {
    # The machine's own Debian mirror, so the build follows its apt configuration.
    local uri
    uri="$(grep -hsoE '^URIs:\s*\S+' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -v security | head -n1 || true)"
    [ -n "$uri" ] || uri="$(grep -hsoE '^deb\s+\S+' /etc/apt/sources.list | awk '{print $2}' | head -n1 || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

build_local_base() {
    command -v debootstrap >/dev/null || {
        log "installing debootstrap"
        apt-get install -y -qq debootstrap >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    }
    local root
    root="$(mktemp -d /tmp/tir-sandbox-rootfs.XXXXXX)"
    trap 'rm -rf "$root"' RETURN
    log "debootstrap $SUITE (minbase + python3-numpy + python3-sympy) from $(mirror)"
    debootstrap --variant=minbase --include=python3,python3-numpy,python3-sympy \
        "$SUITE" "$root" "$(mirror)" >/tmp/tir-sandbox-debootstrap.log 2>&1 \
        || { tail -n 30 /tmp/tir-sandbox-debootstrap.log >&2; return 1; }
    # Nothing in the sandbox needs apt, docs or translations.
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
        "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/*
    log "docker import -> $LOCAL_BASE"
    tar -C "$root" -c . | docker import - "$LOCAL_BASE" >/dev/null
}

start=$SECONDS
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [ "$BASE_IMAGE" = "$LOCAL_BASE" ]; then
        build_local_base
    else
        log "base image $BASE_IMAGE not present; trying to pull it"
        docker pull "$BASE_IMAGE"
    fi
fi
log "docker build $IMAGE on $BASE_IMAGE"
# BuildKit needs the buildx plugin; without it, ask for the classic builder instead of failing.
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
# The context, streamed as a tar: this directory's files and the package's cell module. The label
# is their digest (tir_envs/sandbox/docker.py: sources_digest), so a stale image is refused.
SOURCES="$(cat "$HERE/Dockerfile" "$HERE/runner.py" "$CELL_DIR/cell.py" | sha256sum | cut -d' ' -f1)"
tar -c -C "$HERE" Dockerfile runner.py -C "$CELL_DIR" cell.py \
    | docker build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" --label "tir-gym.sources=$SOURCES" \
        -t "$IMAGE" - >/dev/null
log "ready: $IMAGE ($((SECONDS - start)) s)"
