#!/usr/bin/env bash
# Set up ktrdr-run on Debian 12: Docker engine, debootstrap, the project's .venv, and
# the runner image. Idempotent and non-interactive; run it again at any time.
#
#   bash scripts/setup.sh          # to run ktrdr-run
#   bash scripts/setup.sh --dev    # and to run its tests (adds headless Chromium, shellcheck)
#
# Environment: KTRDR_PYTHON (default python3.11), KTRDR_DOCKERD_LOG (default
# /var/log/ktrdr-dockerd.log), KTRDR_DOCKER_WAIT_S (default 60).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
PYTHON="${KTRDR_PYTHON:-python3.11}"
DOCKERD_LOG="${KTRDR_DOCKERD_LOG:-/var/log/ktrdr-dockerd.log}"
DOCKER_WAIT_S="${KTRDR_DOCKER_WAIT_S:-60}"
export DEBIAN_FRONTEND=noninteractive
DEV=0
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        *) echo "[setup] error: unknown option $arg (use --dev)" >&2; exit 2 ;;
    esac
done

log() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "run as root, or install sudo"
    SUDO=(sudo -n)
fi

# --- system packages (only what is missing) ---------------------------------------------
missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have dockerd && have docker || missing+=(docker.io)
have iptables || missing+=(iptables)
have debootstrap || missing+=(debootstrap)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
have gpgv || missing+=(gpgv)
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
have "$PYTHON" || missing+=(python3.11)
if ! have "$PYTHON" || ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3.11-venv)
fi
# the tests open the HTML backtest report in a real browser
[ "$DEV" -eq 0 ] || have chromium-headless-shell || missing+=(chromium-headless-shell fonts-dejavu-core)
# the tests run shellcheck on every script under images/ and scripts/
[ "$DEV" -eq 0 ] || have shellcheck || missing+=(shellcheck)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    # Without systemd, keep package scripts from starting services (dockerd is started
    # below, the same way on every machine): a temporary policy-rc.d that says no.
    policy=/usr/sbin/policy-rc.d
    if [ ! -d /run/systemd/system ] && [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod +x "$policy"
        trap '"${SUDO[@]}" rm -f "$policy"' EXIT
    fi
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "system packages present"
fi

# --- Docker engine ----------------------------------------------------------------------
dockerd_alive() {
    local pid
    pid="$(cat /var/run/docker.pid 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}
if docker info >/dev/null 2>&1; then
    log "Docker engine is running"
else
    if [ -d /run/systemd/system ] && have systemctl; then
        log "starting Docker with systemctl"
        "${SUDO[@]}" systemctl start docker || true
    fi
    if ! docker info >/dev/null 2>&1 && ! dockerd_alive; then
        log "starting dockerd in the background (log: $DOCKERD_LOG)"
        "${SUDO[@]}" mkdir -p "$(dirname "$DOCKERD_LOG")"
        "${SUDO[@]}" sh -c "setsid nohup dockerd >>'$DOCKERD_LOG' 2>&1 </dev/null &"
    fi
    log "waiting for the Docker engine (up to ${DOCKER_WAIT_S} s)"
    deadline=$((SECONDS + DOCKER_WAIT_S))
    until docker info >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$DOCKERD_LOG" 2>/dev/null >&2 || true
            die "the Docker engine did not answer within ${DOCKER_WAIT_S} s (see $DOCKERD_LOG)"
        fi
        sleep 1
    done
    log "Docker engine is up: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
fi

# --- the project's virtual environment --------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
log "installing ktrdr-run into .venv (pip install -e '.[dev]')"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

# --- the runner image -------------------------------------------------------------------
log "ensuring the runner image"
log "runner image"
.venv/bin/ktrdr-run images build
log "done ($ROOT)"
