#!/usr/bin/env bash
# Build a Debian bookworm base image with python3.11 offline (no image registry needed):
# debootstrap a minimal root filesystem from a Debian mirror and `docker import` it.
#
#   bash images/bootstrap-base.sh [TAG] [MIRROR]
#
# TAG defaults to ktrdr-base:bookworm-py311 (dispatcher.images.OFFLINE_BASE_IMAGE),
# MIRROR to http://deb.debian.org/debian. Needs root (debootstrap) and the docker CLI.
# Installs debootstrap with apt-get when it is missing. The root filesystem is built in
# a temporary folder that is always removed afterwards.
set -euo pipefail

TAG="${1:-ktrdr-base:bookworm-py311}"
MIRROR="${2:-http://deb.debian.org/debian}"
SUITE="${KTRDR_BASE_SUITE:-bookworm}"
PACKAGES="python3,python3-venv,ca-certificates"

log() { echo "[bootstrap-base] $*"; }
die() { echo "[bootstrap-base] error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root; run this script as root (or with sudo)"
command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed (apt-get install docker.io)"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends debootstrap debian-archive-keyring gpgv
fi

ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/ktrdr-rootfs.XXXXXX")"

cleanup() {
    # debootstrap mounts /proc and /sys inside the target; a failed run can leave them
    # mounted. Unmount everything below ROOTFS before removing it, and never cross into
    # another filesystem while removing.
    local mnt
    awk -v root="$ROOTFS" '$2 == root || index($2, root "/") == 1 { print $2 }' /proc/mounts \
        | sort -r | while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

log "debootstrap $SUITE ($PACKAGES) from $MIRROR into $ROOTFS"
started=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR"
log "debootstrap done in $((SECONDS - started)) s"

# Make it small: package caches, apt lists, docs, man pages and locales are not needed
# in a runner base (apt-get update restores the lists if someone needs apt later).
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/* \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
    "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' \
    -exec rm -rf {} + 2>/dev/null || true
[ -x "$ROOTFS/usr/bin/python3.11" ] || die "python3.11 is missing from the root filesystem"

log "importing the root filesystem as $TAG"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap $SUITE minbase + $PACKAGES from $MIRROR" \
    - "$TAG" >/dev/null
log "built $TAG: $(docker image inspect --format '{{.Size}}' "$TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
