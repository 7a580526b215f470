#!/usr/bin/env bash
# Build the ktrdr-run worker template on a Proxmox VE node: an unprivileged Debian 12 LXC
# with nesting and keyctl, Docker inside listening on TCP 2376 with TLS (client
# certificates required), the runner image loaded from a tarball, converted to a template.
# Run as root on the node; see --help.
set -euo pipefail

PROG=create-template
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'EOF'
Usage: create-template.sh --vmid ID --storage STORAGE --image-tar FILE --certs DIR [options]

Builds the worker template on this Proxmox VE node (run as root):
  1. checks that VMID is free in the cluster, STORAGE holds container volumes on this
     node, the bridge exists and a Debian 12 container template is downloaded;
  2. pct create: unprivileged Debian 12, features nesting=1,keyctl=1;
  3. installs Docker (apt-get install docker.io) inside;
  4. pushes the TLS bundle into /etc/docker/certs and a daemon.json that listens on the
     unix socket and tcp://0.0.0.0:2376 with tlsverify (a systemd drop-in drops the
     unit's `-H fd://`, which dockerd refuses next to "hosts" in daemon.json);
  5. pushes the runner image tarball and `docker load`s it;
  6. shuts the container down and converts it to a template (pct template).
Workers cloned from it get their own certificate from deploy-workers.sh.

Required:
  --vmid ID            the template's VMID (free in the cluster; e.g. 9000)
  --storage STORAGE    where its root disk goes (content 'rootdir', e.g. local-lvm)
  --image-tar FILE     the runner image: `ktrdr-run images export FILE` on the dispatcher's host
  --certs DIR          a Docker server bundle (ca.pem, server-cert.pem, server-key.pem):
                       `ktrdr-run certs issue ktrdr-template -o DIR`
Options:
  --ostemplate NAME    a container template: a volume id (local:vztmpl/debian-12-...)
                       or a file name; default: the newest debian-12-standard found on
                       this node's template storages (pveam list)
  --bridge BRIDGE      network bridge (default vmbr0)
  --ip dhcp|CIDR       the template's address while it is built (default dhcp);
                       it needs to reach the Debian mirror
  --gateway ADDR       the gateway with a static --ip
  --cores N            (default 2)
  --memory MB          (default 2048)
  --disk GB            root disk size (default 16)
  --hostname NAME      (default ktrdr-template)
  --dry-run            check, then print the commands instead of running them
                       (the checks' read-only queries still run)
  -h, --help           this text

Environment: KTRDR_RUN (default ktrdr-run), PVE_NODE (default: this host's name),
KTRDR_POLL_S (seconds between checks while waiting, default 2).
EOF
}

VMID=""
STORAGE=""
OSTEMPLATE=""
BRIDGE=vmbr0
IP=dhcp
GATEWAY=""
CORES=2
MEMORY=2048
DISK=16
CT_HOSTNAME=ktrdr-template
IMAGE_TAR=""
CERTS=""

mapfile -d '' ARGS < <(split_equals "$@")
set -- "${ARGS[@]}"
while [ $# -gt 0 ]; do
    case "$1" in
        --vmid) VMID="$(arg_value "$@")"; shift 2 ;;
        --storage) STORAGE="$(arg_value "$@")"; shift 2 ;;
        --ostemplate) OSTEMPLATE="$(arg_value "$@")"; shift 2 ;;
        --bridge) BRIDGE="$(arg_value "$@")"; shift 2 ;;
        --ip) IP="$(arg_value "$@")"; shift 2 ;;
        --gateway) GATEWAY="$(arg_value "$@")"; shift 2 ;;
        --cores) CORES="$(arg_value "$@")"; shift 2 ;;
        --memory) MEMORY="$(arg_value "$@")"; shift 2 ;;
        --disk) DISK="$(arg_value "$@")"; shift 2 ;;
        --hostname) CT_HOSTNAME="$(arg_value "$@")"; shift 2 ;;
        --image-tar) IMAGE_TAR="$(arg_value "$@")"; shift 2 ;;
        --certs) CERTS="$(arg_value "$@")"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
done

[ -n "$VMID" ] || usage_error "--vmid is required (the template's VMID, e.g. 9000)"
[ -n "$STORAGE" ] || usage_error "--storage is required (where the root disk goes, e.g. local-lvm)"
[ -n "$IMAGE_TAR" ] || usage_error "--image-tar is required (make it with: ktrdr-run images export FILE)"
[ -n "$CERTS" ] || usage_error "--certs is required (make it with: $KTRDR_RUN certs issue $CT_HOSTNAME -o DIR)"
check_vmid --vmid "$VMID"
[[ "$STORAGE" =~ ^[A-Za-z][A-Za-z0-9_.-]*$ ]] || usage_error "--storage $STORAGE: not a storage name"
check_bridge --bridge "$BRIDGE"
check_uint --cores "$CORES" 1 8192
check_uint --memory "$MEMORY" 512
check_uint --disk "$DISK" 4
check_name --hostname "$CT_HOSTNAME"
if [ "$IP" != dhcp ]; then
    check_cidr4 --ip "$IP"
fi
if [ -n "$GATEWAY" ]; then
    [ "$IP" != dhcp ] || usage_error "--gateway is for a static --ip (DHCP supplies the gateway)"
    check_ipv4 --gateway "$GATEWAY"
fi
need_file --image-tar "$IMAGE_TAR"
need_bundle --certs "$CERTS"
need_tools pct pvesh pveam perl

# --- checks (read-only) ------------------------------------------------------------------
NODE="$(pve_node)"
load_guests
taken="$(guest "$VMID")"
[ -z "$taken" ] \
    || die "--vmid $VMID: VMID $VMID is taken by $(describe_guest "$taken"); choose a free one (pvesh get /cluster/nextid)"

STORAGES="$(pvesh_tsv "/nodes/$NODE/storage" 'storage type content active enabled')" \
    || die "could not list the storages of node $NODE (pvesh get /nodes/$NODE/storage)"
line="$(awk -F'\t' -v s="$STORAGE" '$1 == s { print; exit }' <<<"$STORAGES")"
if [ -z "$line" ]; then
    die "--storage $STORAGE: node $NODE has no storage '$STORAGE' (it has: $(cut -f1 <<<"$STORAGES" | paste -sd' '))"
fi
content="$(guest_field "$line" 3)"
[[ ",$content," == *,rootdir,* ]] \
    || die "--storage $STORAGE: it does not hold container volumes (content: ${content:-none}); pick one whose content includes rootdir (e.g. local-lvm)"
[ "$(guest_field "$line" 4)" != 0 ] || die "--storage $STORAGE: the storage is not active on node $NODE"

BRIDGES="$(pvesh_tsv "/nodes/$NODE/network" 'iface type' | awk -F'\t' 'tolower($2) ~ /bridge/ { print $1 }')" \
    || die "could not list the network of node $NODE (pvesh get /nodes/$NODE/network)"
grep -Fxq -- "$BRIDGE" <<<"$BRIDGES" \
    || die "--bridge $BRIDGE: node $NODE has no bridge '$BRIDGE' (it has: $(paste -sd' ' <<<"$BRIDGES"))"

# The container template: on a storage with content vztmpl, as `pveam list` shows it.
TEMPLATE_STORAGES="$(awk -F'\t' '("," $3 ",") ~ /,vztmpl,/ && $4 != "0" { print $1 }' <<<"$STORAGES")"
[ -n "$TEMPLATE_STORAGES" ] \
    || die "--ostemplate: node $NODE has no storage for container templates (content vztmpl, e.g. local)"
AVAILABLE=""
for store in $TEMPLATE_STORAGES; do
    listed="$(pveam list "$store")" || die "pveam list $store failed"
    AVAILABLE+="$(awk 'NR > 1 && $1 ~ /:vztmpl\// { print $1 }' <<<"$listed")"$'\n'
done
DOWNLOAD_HINT="download one: pveam update && pveam available --section system | grep debian-12, then pveam download $(head -n1 <<<"$TEMPLATE_STORAGES") debian-12-standard_<version>_amd64.tar.zst"
case "$OSTEMPLATE" in
    "")
        VOLID="$(grep -E '^[^:]+:vztmpl/debian-12-standard_' <<<"$AVAILABLE" | sort -V | tail -n1 || true)"
        [ -n "$VOLID" ] \
            || die "--ostemplate: no Debian 12 container template on node $NODE (looked in: $(paste -sd' ' <<<"$TEMPLATE_STORAGES")); $DOWNLOAD_HINT"
        ;;
    *:*)
        grep -Fxq -- "$OSTEMPLATE" <<<"$AVAILABLE" \
            || die "--ostemplate $OSTEMPLATE: not on node $NODE (pveam list ${OSTEMPLATE%%:*}); $DOWNLOAD_HINT"
        VOLID="$OSTEMPLATE"
        ;;
    *)
        VOLID="$(awk -v f="$OSTEMPLATE" '{ n = split($0, p, "/"); if (p[n] == f) { print; exit } }' <<<"$AVAILABLE")"
        [ -n "$VOLID" ] \
            || die "--ostemplate $OSTEMPLATE: not on node $NODE (looked in: $(paste -sd' ' <<<"$TEMPLATE_STORAGES")); $DOWNLOAD_HINT"
        ;;
esac
case "$VOLID" in
    *debian-12*) ;;
    *) warn "--ostemplate $VOLID does not look like Debian 12: the steps below assume Debian 12 (apt-get, docker.io)" ;;
esac

NET0="name=eth0,bridge=$BRIDGE,ip=$IP"
[ -z "$GATEWAY" ] || NET0+=",gw=$GATEWAY"
log "node $NODE: CT $VMID from $VOLID on $STORAGE (${DISK} GB), $CORES cores, $MEMORY MB, $NET0"

# --- build ------------------------------------------------------------------------------
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/ktrdr-template.XXXXXX")"
CREATED=0
on_exit() {
    local rc=$?
    rm -rf "$STAGE"
    if [ "$rc" -ne 0 ] && [ "$CREATED" -eq 1 ]; then
        log "stopped: CT $VMID is left half-built for inspection; remove it with: pct stop $VMID; pct destroy $VMID --purge 1"
    fi
}
trap on_exit EXIT

docker_tls_daemon_json /etc/docker/certs 0.0.0.0:2376 >"$STAGE/daemon.json"
docker_systemd_dropin /usr/sbin/dockerd >"$STAGE/ktrdr-tls.conf"

log "1/6 creating CT $VMID"
run pct create "$VMID" "$VOLID" --hostname "$CT_HOSTNAME" --ostype debian --unprivileged 1 \
    --features nesting=1,keyctl=1 --cores "$CORES" --memory "$MEMORY" --swap 512 \
    --rootfs "$STORAGE:$DISK" --net0 "$NET0" --onboot 0 --tags ktrdr-template
CREATED=1
run pct start "$VMID"
ct_wait "$VMID" 120 "the network is up" ip -4 route show default

log "2/6 installing Docker"
run pct exec "$VMID" -- env DEBIAN_FRONTEND=noninteractive apt-get update -q
run pct exec "$VMID" -- env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    docker.io apparmor ca-certificates curl

log "3/6 the Docker API on tcp://0.0.0.0:2376 with TLS"
run pct exec "$VMID" -- mkdir -p /etc/docker/certs /etc/systemd/system/docker.service.d
run pct push "$VMID" "$CERTS/ca.pem" /etc/docker/certs/ca.pem --perms 0644
run pct push "$VMID" "$CERTS/server-cert.pem" /etc/docker/certs/server-cert.pem --perms 0644
run pct push "$VMID" "$CERTS/server-key.pem" /etc/docker/certs/server-key.pem --perms 0600
run pct push "$VMID" "$STAGE/daemon.json" /etc/docker/daemon.json --perms 0644
run pct push "$VMID" "$STAGE/ktrdr-tls.conf" /etc/systemd/system/docker.service.d/ktrdr-tls.conf --perms 0644
run pct exec "$VMID" -- systemctl daemon-reload
run pct exec "$VMID" -- systemctl restart docker
ct_wait "$VMID" 60 "Docker answers" docker info --format '{{.ServerVersion}}'

log "4/6 loading the runner image"
run pct push "$VMID" "$IMAGE_TAR" /root/ktrdr-runner-image.tar --perms 0600
run pct exec "$VMID" -- docker load -i /root/ktrdr-runner-image.tar >&2
run pct exec "$VMID" -- rm -f /root/ktrdr-runner-image.tar

log "5/6 making it cloneable"
# Clones must not share Docker's engine id or the machine id (DHCP client ids, journald).
run pct exec "$VMID" -- systemctl stop docker.socket docker.service
run pct exec "$VMID" -- rm -f /var/lib/docker/engine-id /var/lib/dbus/machine-id
run pct exec "$VMID" -- truncate -s 0 /etc/machine-id
run pct shutdown "$VMID" --timeout 120

log "6/6 converting CT $VMID to a template"
run pct template "$VMID"
CREATED=0
log "template $VMID is ready; next: deploy-workers.sh --template $VMID --count 3 --first-vmid <VMID>"
