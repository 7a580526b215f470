#!/usr/bin/env bash
# Deploy ktrdr-run workers on a Proxmox VE node: clone the template made by
# create-template.sh, give each clone its network, its tag and its own Docker server
# certificate, start it, wait until its Docker API answers over TLS, and print the
# [[discovery.proxmox.workers]] snippet. Re-running with the same range skips the
# workers that exist. Run as root on the template's node; see --help.
set -euo pipefail

PROG=deploy-workers
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'EOF'
Usage: deploy-workers.sh --template ID --count N --first-vmid V [options]

For each VMID from V to V+N-1, on this node (run as root):
  - a container with that VMID carrying the tag: "worker V exists, skipped";
  - one left half-deployed by an earlier run (tag TAG-deploying): finished;
  - any other guest with that VMID: an error, before anything is changed;
  - otherwise: pct clone, pct set (network, tags, cores, memory, onboot), pct start,
    read its address (DHCP) or use the static one, `ktrdr-run certs issue HOSTNAME --ip
    ADDRESS -o DIR`, pct push of ca.pem, server-cert.pem and server-key.pem into
    /etc/docker/certs, restart Docker, wait until https://ADDRESS:2376/_ping answers
    with the dispatcher's client certificate, and only then set the worker tag (so
    discovery never sees a worker that is not ready).
Then prints the [[discovery.proxmox.workers]] snippet for the dispatcher's config.

Required:
  --template ID        the template from create-template.sh
  --count N            how many workers
  --first-vmid V       the first worker's VMID
Options:
  --tag TAG            the Proxmox tag discovery matches (default ktrdr-worker)
  --name-prefix NAME   host names are NAME-VMID (default ktrdr-worker)
  --cores N            CPU cores per worker (default: as the template)
  --memory MB          memory per worker (default: as the template)
  --bridge BRIDGE      network bridge (default vmbr0)
  --ip dhcp|CIDR       dhcp (default), or the first worker's address, e.g.
                       10.0.0.50/24: the next ones get .51, .52, ... (a certificate names
                       the address: with DHCP, reserve the leases)
  --gateway ADDR       the gateway with a static --ip
  --full               full clones (default: linked clones where the storage allows)
  --client-certs DIR   the dispatcher's client certificate (ca.pem, client-cert.pem,
                       client-key.pem) when `ktrdr-run certs issue` does not name it
                       (default $KTRDR_CERTS_DIR or ~/.local/state/ktrdr-run/certs)
  --wait-s SECONDS     how long to wait for each worker's Docker API (default 300)
  --dry-run            check, then print the commands instead of running them
                       (the checks' read-only queries still run)
  -h, --help           this text

Environment: KTRDR_RUN (default ktrdr-run: it must reach the CA, so run this where
`ktrdr-run certs init` was run or its certs directory was copied to), KTRDR_TLS_CHECK (a
command run as CMD ADDRESS PORT CA CERT KEY; default: curl of /_ping), PVE_NODE,
KTRDR_POLL_S.
EOF
}

TEMPLATE=""
COUNT=""
FIRST=""
TAG=ktrdr-worker
PREFIX=ktrdr-worker
CORES=""
MEMORY=""
BRIDGE=vmbr0
IP=dhcp
GATEWAY=""
FULL=0
CLIENT_CERTS="${KTRDR_CERTS_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/ktrdr-run/certs}"
WAIT_S=300
PORT=2376

mapfile -d '' ARGS < <(split_equals "$@")
set -- "${ARGS[@]}"
while [ $# -gt 0 ]; do
    case "$1" in
        --template) TEMPLATE="$(arg_value "$@")"; shift 2 ;;
        --count) COUNT="$(arg_value "$@")"; shift 2 ;;
        --first-vmid) FIRST="$(arg_value "$@")"; shift 2 ;;
        --tag) TAG="$(arg_value "$@")"; shift 2 ;;
        --name-prefix) PREFIX="$(arg_value "$@")"; shift 2 ;;
        --cores) CORES="$(arg_value "$@")"; shift 2 ;;
        --memory) MEMORY="$(arg_value "$@")"; shift 2 ;;
        --bridge) BRIDGE="$(arg_value "$@")"; shift 2 ;;
        --ip) IP="$(arg_value "$@")"; shift 2 ;;
        --gateway) GATEWAY="$(arg_value "$@")"; shift 2 ;;
        --full) FULL=1; shift ;;
        --client-certs) CLIENT_CERTS="$(arg_value "$@")"; shift 2 ;;
        --wait-s) WAIT_S="$(arg_value "$@")"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
done

[ -n "$TEMPLATE" ] || usage_error "--template is required (the VMID of the template from create-template.sh)"
[ -n "$COUNT" ] || usage_error "--count is required (how many workers)"
[ -n "$FIRST" ] || usage_error "--first-vmid is required (the first worker's VMID)"
check_vmid --template "$TEMPLATE"
check_uint --count "$COUNT" 1 1000
check_vmid --first-vmid "$FIRST"
check_vmid "--first-vmid/--count" "$((FIRST + COUNT - 1))"
check_tag --tag "$TAG"
[[ "$PREFIX" =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,40})$ ]] \
    || usage_error "--name-prefix $PREFIX: letters, digits and -, at most 41 characters (host names are PREFIX-VMID)"
[ -z "$CORES" ] || check_uint --cores "$CORES" 1 8192
[ -z "$MEMORY" ] || check_uint --memory "$MEMORY" 512
check_bridge --bridge "$BRIDGE"
check_uint --wait-s "$WAIT_S" 1
IP_BASE=0
if [ "$IP" != dhcp ]; then
    check_cidr4 --ip "$IP"
    IP_BASE="$(ipv4_to_int "${IP%/*}")"
    PREFIX_LEN="${IP#*/}"
    broadcast=$((IP_BASE | ((1 << (32 - PREFIX_LEN)) - 1)))
    [ $((IP_BASE + COUNT - 1)) -lt "$broadcast" ] \
        || usage_error "--ip $IP: $COUNT addresses from ${IP%/*} do not fit in /$PREFIX_LEN"
fi
if [ -n "$GATEWAY" ]; then
    [ "$IP" != dhcp ] || usage_error "--gateway is for a static --ip (DHCP supplies the gateway)"
    check_ipv4 --gateway "$GATEWAY"
fi
DEPLOYING_TAG="$TAG-deploying"
need_tools pct pvesh perl
command -v "$KTRDR_RUN" >/dev/null 2>&1 \
    || die "$KTRDR_RUN not found: each worker's certificate comes from 'ktrdr-run certs issue'; install ktrdr-run on this node with the CA (its state's certs directory) or set KTRDR_RUN"
read -r -a TLS_CHECK <<<"${KTRDR_TLS_CHECK:-}"
if [ "${#TLS_CHECK[@]}" -eq 0 ]; then
    command -v curl >/dev/null 2>&1 || die "curl not found: it checks each worker's Docker API (apt-get install curl)"
fi

# --- checks (read-only) ------------------------------------------------------------------
NODE="$(pve_node)"
load_guests
tpl="$(guest "$TEMPLATE")"
[ -n "$tpl" ] \
    || die "--template $TEMPLATE: there is no guest $TEMPLATE in the cluster (build the template with create-template.sh --vmid $TEMPLATE ...)"
[ "$(guest_field "$tpl" 2)" = lxc ] || die "--template $TEMPLATE: $(describe_guest "$tpl") is not an LXC container"
[ "$(guest_field "$tpl" 5)" = 1 ] \
    || die "--template $TEMPLATE: CT $TEMPLATE is not a template (create-template.sh makes one; pct template $TEMPLATE converts a stopped CT)"
[ "$(guest_field "$tpl" 3)" = "$NODE" ] \
    || die "--template $TEMPLATE: the template is on node $(guest_field "$tpl" 3), this is $NODE: run this script there"

NEW=()
RESUME=()
SKIP=()
for ((i = 0; i < COUNT; i++)); do
    vmid=$((FIRST + i))
    line="$(guest "$vmid")"
    if [ -z "$line" ]; then
        NEW+=("$vmid")
        continue
    fi
    tags="$(guest_field "$line" 7)"
    if [ "$(guest_field "$line" 2)" = lxc ] && [ "$(guest_field "$line" 5)" = 0 ] && has_tag "$tags" "$TAG"; then
        SKIP+=("$vmid")
    elif [ "$(guest_field "$line" 2)" = lxc ] && [ "$(guest_field "$line" 5)" = 0 ] && has_tag "$tags" "$DEPLOYING_TAG"; then
        [ "$(guest_field "$line" 3)" = "$NODE" ] \
            || die "VMID $vmid: a half-deployed worker on node $(guest_field "$line" 3): run this script there"
        RESUME+=("$vmid")
    else
        die "--first-vmid $FIRST --count $COUNT: VMID $vmid is taken by $(describe_guest "$line"), which is not a '$TAG' worker; it is left untouched: choose another range (if an earlier run stopped right after cloning it, remove it: pct destroy $vmid --purge 1)"
    fi
done

# --- deploy -----------------------------------------------------------------------------
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/ktrdr-deploy.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
TLS_CA="" TLS_CERT="" TLS_KEY=""
declare -A ADDRESS=() RESULT=()

address_of() { # VMID INDEX: the static address, or DHCP's, read inside the container
    local vmid=$1 index=$2 out
    if [ "$IP" != dhcp ]; then
        int_to_ipv4 $((IP_BASE + index))
        return 0
    fi
    if [ "$DRY_RUN" -eq 1 ]; then
        run pct exec "$vmid" -- ip -4 -o addr show dev eth0 scope global
        printf '<address of %s>' "$vmid"
        return 0
    fi
    local deadline=$((SECONDS + WAIT_S))
    while :; do
        out="$(pct exec "$vmid" -- ip -4 -o addr show dev eth0 scope global 2>/dev/null || true)"
        out="$(awk '{ for (i = 1; i < NF; i++) if ($i == "inet") { split($(i + 1), a, "/"); print a[1]; exit } }' <<<"$out")"
        if [ -n "$out" ]; then
            printf '%s' "$out"
            return 0
        fi
        [ "$SECONDS" -lt "$deadline" ] \
            || die "worker $vmid: no IPv4 address on eth0 within $WAIT_S s (DHCP on bridge $BRIDGE?); see: pct exec $vmid -- ip addr"
        sleep "$POLL_S"
    done
}

issue_cert() { # HOSTNAME ADDRESS
    local out
    if [ "$DRY_RUN" -eq 1 ]; then
        run "$KTRDR_RUN" certs issue "$1" --ip "$2" -o "$STAGE/$1"
        return 0
    fi
    out="$("$KTRDR_RUN" certs issue "$1" --ip "$2" -o "$STAGE/$1")" \
        || die "worker $1: '$KTRDR_RUN certs issue $1 --ip $2' failed (is the CA here? run 'ktrdr-run certs init')"
    printf '%s\n' "$out" >&2
    local value
    value="$(sed -n 's/^[[:space:]]*tls_ca = "\(.*\)"[[:space:]]*$/\1/p' <<<"$out" | tail -n1)"
    [ -z "$value" ] || TLS_CA="$value"
    value="$(sed -n 's/^[[:space:]]*tls_cert = "\(.*\)"[[:space:]]*$/\1/p' <<<"$out" | tail -n1)"
    [ -z "$value" ] || TLS_CERT="$value"
    value="$(sed -n 's/^[[:space:]]*tls_key = "\(.*\)"[[:space:]]*$/\1/p' <<<"$out" | tail -n1)"
    [ -z "$value" ] || TLS_KEY="$value"
    local file
    for file in ca.pem server-cert.pem server-key.pem; do
        [ -s "$STAGE/$1/$file" ] || die "worker $1: '$KTRDR_RUN certs issue' wrote no $file into $STAGE/$1"
    done
}

client_files() {
    TLS_CA="${TLS_CA:-$CLIENT_CERTS/ca.pem}"
    TLS_CERT="${TLS_CERT:-$CLIENT_CERTS/client-cert.pem}"
    TLS_KEY="${TLS_KEY:-$CLIENT_CERTS/client-key.pem}"
}

tls_answers() { # ADDRESS CA
    if [ "${#TLS_CHECK[@]}" -gt 0 ]; then
        "${TLS_CHECK[@]}" "$1" "$PORT" "$2" "$TLS_CERT" "$TLS_KEY" >/dev/null 2>&1
    else
        local host=$1
        [[ "$host" != *:* ]] || host="[$host]"
        curl -fsS --max-time 5 --cacert "$2" --cert "$TLS_CERT" --key "$TLS_KEY" "https://$host:$PORT/_ping" >/dev/null 2>&1
    fi
}

wait_tls() { # VMID ADDRESS CA
    if [ "$DRY_RUN" -eq 1 ]; then
        if [ "${#TLS_CHECK[@]}" -gt 0 ]; then
            run "${TLS_CHECK[@]}" "$2" "$PORT" "$3" "$TLS_CERT" "$TLS_KEY"
        else
            run curl -fsS --max-time 5 --cacert "$3" --cert "$TLS_CERT" --key "$TLS_KEY" "https://$2:$PORT/_ping"
        fi
        return 0
    fi
    local file
    for file in "$TLS_CERT" "$TLS_KEY"; do
        [ -r "$file" ] || die "the dispatcher's client certificate $file is not here (--client-certs DIR, or run 'ktrdr-run certs init')"
    done
    wait_for "$WAIT_S" "worker $1: Docker answers over TLS on $2:$PORT" tls_answers "$2" "$3" \
        || die "worker $1: Docker did not answer over TLS on $2:$PORT within $WAIT_S s; look inside: pct exec $1 -- journalctl -u docker -n 30 --no-pager (the worker keeps the tag $DEPLOYING_TAG: re-running this command finishes it)"
}

deploy_one() { # VMID INDEX new|resume
    local vmid=$1 index=$2 mode=$3 name="$PREFIX-$1" net0 address status
    log "worker $vmid ($name): $([ "$mode" = new ] && echo deploying || echo "finishing (left half-deployed by an earlier run)")"
    if [ "$mode" = new ]; then
        local clone=(pct clone "$TEMPLATE" "$vmid" --hostname "$name")
        [ "$FULL" -eq 0 ] || clone+=(--full 1)
        run "${clone[@]}"
    fi
    net0="name=eth0,bridge=$BRIDGE,ip=dhcp"
    if [ "$IP" != dhcp ]; then
        net0="name=eth0,bridge=$BRIDGE,ip=$(int_to_ipv4 $((IP_BASE + index)))/$PREFIX_LEN"
        [ -z "$GATEWAY" ] || net0+=",gw=$GATEWAY"
    fi
    local set=(pct set "$vmid" --net0 "$net0" --tags "$DEPLOYING_TAG" --onboot 1)
    [ -z "$CORES" ] || set+=(--cores "$CORES")
    [ -z "$MEMORY" ] || set+=(--memory "$MEMORY")
    run "${set[@]}"
    status=stopped
    if [ "$mode" = resume ]; then
        status="$(pct status "$vmid" | awk '{ print $2 }')"
    fi
    [ "$status" = running ] || run pct start "$vmid"
    address="$(address_of "$vmid" "$index")"
    ADDRESS[$vmid]="$address"
    issue_cert "$name" "$address"
    client_files
    run pct push "$vmid" "$STAGE/$name/ca.pem" /etc/docker/certs/ca.pem --perms 0644
    run pct push "$vmid" "$STAGE/$name/server-cert.pem" /etc/docker/certs/server-cert.pem --perms 0644
    run pct push "$vmid" "$STAGE/$name/server-key.pem" /etc/docker/certs/server-key.pem --perms 0600
    run pct exec "$vmid" -- systemctl restart docker
    wait_tls "$vmid" "$address" "$STAGE/$name/ca.pem"
    run pct set "$vmid" --tags "$TAG"
    RESULT[$vmid]=deployed
}

log "node $NODE: workers $FIRST-$((FIRST + COUNT - 1)) from template $TEMPLATE, tag $TAG"
for ((i = 0; i < COUNT; i++)); do
    vmid=$((FIRST + i))
    if [[ " ${SKIP[*]-} " == *" $vmid "* ]]; then
        line="$(guest "$vmid")"
        log "worker $vmid exists, skipped ($(guest_field "$line" 6), $(guest_field "$line" 4))"
        RESULT[$vmid]="exists, skipped ($(guest_field "$line" 4))"
    elif [[ " ${RESUME[*]-} " == *" $vmid "* ]]; then
        deploy_one "$vmid" "$i" resume
    else
        deploy_one "$vmid" "$i" new
    fi
done
client_files

log "done:"
for ((i = 0; i < COUNT; i++)); do
    vmid=$((FIRST + i))
    log "  $vmid $PREFIX-$vmid ${ADDRESS[$vmid]:-} ${RESULT[$vmid]}"
done
cat <<EOF
# For the dispatcher's ktrdr-run.toml, under its [[discovery.proxmox]] entry for this
# cluster (the TLS files as ktrdr-run certs names them: copy them to the dispatcher's
# host if it is another machine, and change the paths):
[[discovery.proxmox.workers]]
tag = "$TAG"
docker_url_template = "tcp://{address}:$PORT"
tls_ca = "$TLS_CA"
tls_cert = "$TLS_CERT"
tls_key = "$TLS_KEY"
EOF
