#!/usr/bin/env bash
# Stop and destroy the ktrdr-run workers carrying a tag (LXC containers, not templates),
# listing them first and asking before anything is removed. Run as root on a Proxmox VE
# node; see --help.
set -euo pipefail

PROG=destroy-workers
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'EOF'
Usage: destroy-workers.sh --tag TAG [--yes] [--dry-run]

Lists the LXC containers of the cluster that carry TAG (pvesh get /cluster/resources;
templates are never included), asks for confirmation, then stops each running one on
this node (pct stop) and destroys it (pct destroy --purge 1). Workers on other nodes are
listed and left alone: run the script there too. Without a terminal to ask on, it
refuses unless --yes is given.

  --tag TAG     the workers' tag (e.g. ktrdr-worker)
  --yes         do not ask
  --dry-run     list them and print the commands instead of running them
  -h, --help    this text

Environment: PVE_NODE (default: this host's name).
EOF
}

TAG=""
YES=0
mapfile -d '' ARGS < <(split_equals "$@")
set -- "${ARGS[@]}"
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG="$(arg_value "$@")"; shift 2 ;;
        --yes) YES=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
done
[ -n "$TAG" ] || usage_error "--tag is required (the workers' tag, e.g. ktrdr-worker)"
check_tag --tag "$TAG"
need_tools pct pvesh perl

NODE="$(pve_node)"
load_guests
LOCAL=()
REMOTE=()
while IFS=$'\t' read -r vmid type node status template name tags; do
    [ -n "$vmid" ] || continue
    if [ "$type" != lxc ] || [ "$template" != 0 ] || ! has_tag "$tags" "$TAG"; then
        continue
    fi
    printf '%-8s %-10s %-9s %s\n' "$vmid" "$node" "$status" "$name"
    if [ "$node" = "$NODE" ]; then
        LOCAL+=("$vmid:$status")
    else
        REMOTE+=("$vmid ($node)")
    fi
done < <(sort -n <<<"$GUESTS")
total=$((${#LOCAL[@]} + ${#REMOTE[@]}))
if [ "$total" -eq 0 ]; then
    log "no worker carries the tag $TAG"
    exit 0
fi
log "$total worker(s) with the tag $TAG (listed above); ${#LOCAL[@]} on this node ($NODE)"

if [ "${#LOCAL[@]}" -gt 0 ] && [ "$DRY_RUN" -eq 0 ] && [ "$YES" -eq 0 ]; then
    if [ ! -t 0 ]; then
        die "refusing to destroy ${#LOCAL[@]} worker(s) without confirmation: stdin is not a terminal; pass --yes"
    fi
    read -r -p "Stop and destroy ${#LOCAL[@]} container(s) on $NODE? Type yes: " answer
    [ "$answer" = yes ] || die "not confirmed; nothing was destroyed"
fi

for entry in "${LOCAL[@]}"; do
    vmid="${entry%%:*}"
    [ "${entry#*:}" != running ] || run pct stop "$vmid"
    run pct destroy "$vmid" --purge 1
    log "destroyed worker $vmid"
done
if [ "${#REMOTE[@]}" -gt 0 ]; then
    die "left ${#REMOTE[@]} worker(s) on other nodes: ${REMOTE[*]}; run destroy-workers.sh --tag $TAG there"
fi
