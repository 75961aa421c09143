#!/usr/bin/env bash
# Make a Docker engine and the tir-sandbox image available, for CI and for the docker tests.
#
# Idempotent, so CI can call it on every run: installs docker.io if dockerd is missing, starts
# dockerd in the background if `docker info` fails (waiting up to DOCKERD_WAIT seconds), removes
# sandbox containers left by crashed runs, then builds the images (sandbox_image/build.sh: the
# debootstrap base only when absent, the sandbox image a cache hit unless its files changed).
# Needs root for the install and for dockerd. Exit status is non-zero if any step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERD_WAIT="${DOCKERD_WAIT:-60}"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/tir-dockerd.log}"

log() { echo "[docker_engine.sh] $*" >&2; }

if ! command -v dockerd >/dev/null 2>&1; then
    log "installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    if pgrep -x dockerd >/dev/null 2>&1; then
        log "dockerd is running but not answering yet"
    else
        log "starting dockerd (log: $DOCKERD_LOG)"
        nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    for ((i = 0; i < DOCKERD_WAIT; i++)); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        log "dockerd did not come up within ${DOCKERD_WAIT}s; last log lines:"
        tail -n 20 "$DOCKERD_LOG" >&2 || true
        exit 1
    fi
fi
log "engine up: $(docker version --format 'server {{.Server.Version}}' 2>/dev/null)"

leftovers="$(docker ps -aq --filter label=tir-gym.sandbox)"
if [ -n "$leftovers" ]; then
    log "removing leftover sandbox containers"
    # shellcheck disable=SC2086
    docker rm -f $leftovers >/dev/null || true
fi

"$ROOT/sandbox_image/build.sh"
