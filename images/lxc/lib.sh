# shellcheck shell=bash
# Helpers shared by images/lxc/*.sh (sourced, never run on its own).
#
# Every script sets PROG before sourcing this file, parses its arguments with arg_value
# and the check_* validators, and runs every command that changes something through
# `run` (which only prints it under --dry-run). Read-only queries (pvesh get, pveam list,
# pct status) always run, so that --dry-run reports the same errors a real run would.
#
# Environment (all optional):
#   KTRDR_RUN      the ktrdr-run command (default: ktrdr-run)
#   PVE_NODE       this node's name (default: `uname -n`, short), as Proxmox names it
#   KTRDR_POLL_S   seconds between checks while waiting (default 2)

PROG="${PROG:-$(basename "$0" .sh)}"
KTRDR_RUN="${KTRDR_RUN:-ktrdr-run}"
POLL_S="${KTRDR_POLL_S:-2}"
DRY_RUN=0
# What --dry-run prints goes to the script's stdout, even from inside $(...).
exec 3>&1

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
warn() { printf '[%s] warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '[%s] error: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }

# Quote one word for display only when it needs it (what --dry-run prints can be pasted).
shquote() {
    case "$1" in
        "" ) printf "''" ;;
        *[!A-Za-z0-9_./:=,@%+-]* ) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
        * ) printf '%s' "$1" ;;
    esac
}

# The command line, quoted for display.
show_cmd() {
    local first=1 word
    for word in "$@"; do
        [ "$first" -eq 1 ] || printf ' '
        first=0
        shquote "$word"
    done
    printf '\n'
}

# run CMD [ARG...]: run it; under --dry-run print it (prefixed with "+ ") instead.
run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        { printf '+ '; show_cmd "$@"; } >&3
        return 0
    fi
    "$@" 3>&-
}

# VALUE=$(arg_value "$@"): the value of the option in $1 (which is $2); an error naming
# the option when it is missing. Call `shift 2` afterwards.
arg_value() {
    if [ $# -lt 2 ] || [ -z "$2" ] || [[ "$2" == --* ]]; then
        usage_error "$1 needs a value"
    fi
    printf '%s' "$2"
}

# --opt=value -> --opt value (so every script accepts both spellings). Prints the words
# NUL-separated; use: eval-free via mapfile -d ''.
split_equals() {
    local arg
    for arg in "$@"; do
        if [[ "$arg" == --*=* ]]; then
            printf '%s\0%s\0' "${arg%%=*}" "${arg#*=}"
        else
            printf '%s\0' "$arg"
        fi
    done
}

check_uint() { # FLAG VALUE MIN [MAX]
    [[ "$2" =~ ^[0-9]+$ ]] || usage_error "$1 $2: not a whole number"
    [ "$2" -ge "$3" ] || usage_error "$1 $2: must be at least $3"
    [ -z "${4-}" ] || [ "$2" -le "$4" ] || usage_error "$1 $2: must be at most $4"
}

check_vmid() { # FLAG VALUE
    [[ "$2" =~ ^[0-9]+$ ]] || usage_error "$1 $2: a VMID is a whole number (100 to 999999999)"
    check_uint "$1" "$2" 100 999999999
}

# Proxmox's tag format (pve-tag, as discovery/config.py checks it).
check_tag() { # FLAG VALUE
    [[ "$2" =~ ^[a-z0-9_][a-z0-9_+.-]*$ ]] \
        || usage_error "$1 $2: not a Proxmox tag (lower-case letters, digits and _ - + ., not starting with - + or .)"
}

check_name() { # FLAG VALUE: a host name label
    [[ "$2" =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$ ]] \
        || usage_error "$1 $2: not a host name (letters, digits and -, at most 63 characters)"
}

check_bridge() { # FLAG VALUE
    [[ "$2" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || usage_error "$1 $2: not a network bridge name (e.g. vmbr0)"
}

# An IPv4 address as a number, or nothing when it is not one.
ipv4_to_int() {
    local IFS=. a b c d octet
    [[ "$1" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || return 1
    read -r a b c d <<<"$1"
    for octet in "$a" "$b" "$c" "$d"; do [ "$octet" -le 255 ] || return 1; done
    printf '%d' $(((a << 24) | (b << 16) | (c << 8) | d))
}

int_to_ipv4() {
    printf '%d.%d.%d.%d' $((($1 >> 24) & 255)) $((($1 >> 16) & 255)) $((($1 >> 8) & 255)) $(($1 & 255))
}

check_ipv4() { # FLAG VALUE
    ipv4_to_int "$2" >/dev/null || usage_error "$1 $2: not an IPv4 address"
}

check_cidr4() { # FLAG VALUE: ADDRESS/PREFIX
    [[ "$2" == */* ]] || usage_error "$1 $2: give an address with its prefix length (e.g. 10.0.0.50/24), or dhcp"
    ipv4_to_int "${2%/*}" >/dev/null || usage_error "$1 $2: ${2%/*} is not an IPv4 address"
    if ! [[ "${2#*/}" =~ ^[0-9]+$ ]] || [ "${2#*/}" -lt 8 ] || [ "${2#*/}" -gt 30 ]; then
        usage_error "$1 $2: the prefix length must be 8 to 30"
    fi
}

need_tools() { # TOOL... : on a Proxmox VE node
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 \
            || die "$tool not found: run this on a Proxmox VE node, as root (it calls pct and pvesh)"
    done
}

need_file() { # FLAG FILE
    [ -e "$2" ] || usage_error "$1 $2: no such file"
    [ -f "$2" ] || usage_error "$1 $2: not a file"
    [ -r "$2" ] || usage_error "$1 $2: not readable"
}

# The certificate bundle of one Docker engine: ca.pem, server-cert.pem, server-key.pem.
need_bundle() { # FLAG DIR
    [ -d "$2" ] || usage_error "$1 $2: no such directory (make one with: $KTRDR_RUN certs issue HOST -o DIR)"
    local file
    for file in ca.pem server-cert.pem server-key.pem; do
        [ -r "$2/$file" ] \
            || usage_error "$1 $2: $file is missing (the bundle of '$KTRDR_RUN certs issue HOST -o DIR' has ca.pem, server-cert.pem, server-key.pem)"
    done
}

pve_node() {
    if [ -n "${PVE_NODE:-}" ]; then
        printf '%s' "$PVE_NODE"
    else
        uname -n | cut -d. -f1
    fi
}

# JSON from pvesh, as tab-separated lines (perl's JSON::PP is part of every PVE node).
# pvesh_tsv PATH 'FIELD FIELD ...' [pvesh options]
pvesh_tsv() {
    local path=$1 fields=$2 json
    shift 2
    json="$(pvesh get "$path" "$@" --output-format json)" || return 1
    printf '%s' "$json" | FIELDS="$fields" perl -MJSON::PP -0777 -ne '
        my $data = decode_json($_);
        $data = [$data] if ref($data) ne "ARRAY";
        my @fields = split / /, $ENV{FIELDS};
        for my $row (@$data) {
            my @out;
            for my $f (@fields) {
                my $v = $row->{$f};
                $v = "" unless defined $v;
                $v = ($v ? 1 : 0) if JSON::PP::is_bool($v);
                $v =~ s/[\t\n]/ /g;
                push @out, $v;
            }
            print join("\t", @out), "\n";
        }'
}

# Every guest of the cluster: vmid, type, node, status, template (0/1), name, tags.
GUESTS=""
load_guests() {
    GUESTS="$(pvesh_tsv /cluster/resources 'vmid type node status template name tags' --type vm)" \
        || die "could not list the cluster's guests (pvesh get /cluster/resources failed)"
}

# The GUESTS line of one VMID (empty when it does not exist).
guest() {
    awk -F'\t' -v id="$1" '$1 == id { print; exit }' <<<"$GUESTS"
}

guest_field() { # LINE N
    cut -f"$2" <<<"$1"
}

# Whether a ;/,/space-separated tag list (as Proxmox returns it) holds TAG.
has_tag() { # TAGS TAG
    local tag
    for tag in ${1//[;,]/ }; do
        [ "${tag,,}" = "$2" ] && return 0
    done
    return 1
}

describe_guest() { # LINE: "lxc 'name' on node pve1 (tags: a;b)"
    local type node name tags
    type="$(guest_field "$1" 2)"
    node="$(guest_field "$1" 3)"
    name="$(guest_field "$1" 6)"
    tags="$(guest_field "$1" 7)"
    printf "%s '%s' on node %s (tags: %s)" "$type" "$name" "$node" "${tags:-none}"
}

# wait_for SECONDS WHAT CMD...: run CMD until it succeeds; an error after SECONDS.
wait_for() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            return 1
        fi
        sleep "$POLL_S"
    done
    log "$what"
}

# ct_wait VMID LIMIT WHAT CMD...: run `pct exec VMID -- CMD` until it succeeds with some
# output (under --dry-run: print it once).
ct_wait() {
    local vmid=$1 limit=$2 what=$3
    shift 3
    if [ "$DRY_RUN" -eq 1 ]; then
        run pct exec "$vmid" -- "$@"
        return 0
    fi
    wait_for "$limit" "CT $vmid: $what" ct_has_output "$vmid" "$@" \
        || die "CT $vmid: $what: not within $limit s (pct exec $vmid -- $(show_cmd "$@"))"
}

ct_has_output() { # VMID CMD...
    local vmid=$1 out
    shift
    out="$(pct exec "$vmid" -- "$@" 2>/dev/null)" && [ -n "$out" ]
}

# The daemon.json of a worker: the Docker API on the unix socket and TCP 2376 with TLS,
# client certificates required (tlsverify).
docker_tls_daemon_json() { # CERT_DIR LISTEN [UNIX_SOCKET]
    local sock=${3:-unix:///var/run/docker.sock}
    cat <<EOF
{
  "hosts": ["$sock", "tcp://$2"],
  "tls": true,
  "tlsverify": true,
  "tlscacert": "$1/ca.pem",
  "tlscert": "$1/server-cert.pem",
  "tlskey": "$1/server-key.pem"
}
EOF
}

# A systemd drop-in for docker.service: Debian's unit starts `dockerd -H fd://`, and
# dockerd refuses to start when hosts are given both as flags and in daemon.json.
docker_systemd_dropin() { # DOCKERD_PATH
    cat <<EOF
# Written by ktrdr-run: the listening sockets come from /etc/docker/daemon.json
# ("hosts"), and dockerd refuses -H on its command line as well.
[Service]
ExecStart=
ExecStart=$1 --containerd=/run/containerd/containerd.sock
EOF
}
