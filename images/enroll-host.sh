#!/usr/bin/env bash
# Enrol a plain Docker host (a GPU box that is not on Proxmox) as a ktrdr-run engine, in
# one command run on that host: install Docker if it is missing, serve the Docker API on
# TCP 2376 with TLS from a certificate bundle (client certificates required), load the
# runner image, report the GPUs, and print the `ktrdr-run hosts add` line to run on the
# dispatcher's host. Idempotent: a re-run changes nothing that is already in place.
# Self-contained (copy this one file to the host); see --help.
set -euo pipefail

PROG=enroll-host

usage() {
    cat <<'EOF'
Usage: enroll-host.sh --bundle DIR --image-tar FILE [options]

On the dispatcher's host first:
  ktrdr-run certs issue gpu-box --ip 10.0.0.20 -o gpu-box-bundle
  ktrdr-run images export ktrdr-runner.tar          (--flavor cuda for GPU ops)
  scp -r gpu-box-bundle ktrdr-runner.tar enroll-host.sh root@gpu-box:
Then, as root on the new host:
  bash enroll-host.sh --bundle gpu-box-bundle --image-tar ktrdr-runner.tar

It:
  1. installs Docker (apt-get install docker.io) if dockerd is missing;
  2. copies ca.pem, server-cert.pem, server-key.pem (0600) into the cert directory;
  3. merges into daemon.json: tls, tlsverify, tlscacert/tlscert/tlskey, and hosts (the
     unix socket and tcp://LISTEN), keeping every other setting (a copy of the old file
     is kept as daemon.json.ktrdr-bak); with systemd, a drop-in for docker.service drops
     the unit's `-H fd://` (dockerd refuses hosts both as flags and in daemon.json);
  4. restarts Docker when something changed, waits until it answers, and checks that
     the TCP port refuses a client without a certificate;
  5. loads the runner image (unless the engine has that image already);
  6. with nvidia-smi: checks it and the nvidia runtime in `docker info`, and turns the
     GPUs into --gpu INDEX:MODEL:MEMORY_GB flags;
  7. prints the `ktrdr-run hosts add NAME tcp://ADDRESS:PORT ...` line.

Required:
  --bundle DIR          ca.pem, server-cert.pem, server-key.pem (ktrdr-run certs issue)
  --image-tar FILE      the runner image (ktrdr-run images export)
Options:
  --listen ADDR:PORT    where the TLS API listens (default 0.0.0.0:2376)
  --name NAME           the host's name for ktrdr-run (default: hostname -s)
  --address ADDR        the address the dispatcher reaches it at (default: the
                        --listen address, or this host's address on its default route)
  --daemon-json PATH    (default /etc/docker/daemon.json; env KTRDR_DAEMON_JSON)
  --cert-dir DIR        where the certificates go (default /etc/docker/certs;
                        env KTRDR_DOCKER_CERT_DIR)
  --docker-host URL     this engine's unix socket (default unix:///var/run/docker.sock;
                        env KTRDR_DOCKER_SOCKET)
  --restart-cmd CMD     how to restart dockerd (run with bash -c; default: systemctl
                        restart docker, with the drop-in; env KTRDR_DOCKER_RESTART)
  --wait-s SECONDS      how long to wait for Docker after the restart (default 60)
  --no-install          never install Docker (an error when it is missing)
  --dry-run             check, then print what would be written and run
  -h, --help            this text
EOF
}

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
warn() { printf '[%s] warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '[%s] error: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }
have() { command -v "$1" >/dev/null 2>&1; }

DRY_RUN=0
exec 3>&1 # what --dry-run prints goes to stdout, whatever the command's own redirection
run() {
    if [ "$DRY_RUN" -eq 1 ]; then
        { printf '+'; printf ' %q' "$@"; printf '\n'; } >&3
        return 0
    fi
    "$@" 3>&-
}

arg_value() {
    if [ $# -lt 2 ] || [ -z "$2" ] || [[ "$2" == --* ]]; then
        usage_error "$1 needs a value"
    fi
    printf '%s' "$2"
}

BUNDLE=""
IMAGE_TAR=""
LISTEN=0.0.0.0:2376
NAME=""
ADDRESS=""
DAEMON_JSON="${KTRDR_DAEMON_JSON:-/etc/docker/daemon.json}"
CERT_DIR="${KTRDR_DOCKER_CERT_DIR:-/etc/docker/certs}"
DOCKER_SOCK="${KTRDR_DOCKER_SOCKET:-unix:///var/run/docker.sock}"
RESTART_CMD="${KTRDR_DOCKER_RESTART:-}"
WAIT_S=60
INSTALL=1

while [ $# -gt 0 ]; do
    if [[ "$1" == --*=* ]]; then
        set -- "${1%%=*}" "${1#*=}" "${@:2}"
    fi
    case "$1" in
        --bundle) BUNDLE="$(arg_value "$@")"; shift 2 ;;
        --image-tar) IMAGE_TAR="$(arg_value "$@")"; shift 2 ;;
        --listen) LISTEN="$(arg_value "$@")"; shift 2 ;;
        --name) NAME="$(arg_value "$@")"; shift 2 ;;
        --address) ADDRESS="$(arg_value "$@")"; shift 2 ;;
        --daemon-json) DAEMON_JSON="$(arg_value "$@")"; shift 2 ;;
        --cert-dir) CERT_DIR="$(arg_value "$@")"; shift 2 ;;
        --docker-host) DOCKER_SOCK="$(arg_value "$@")"; shift 2 ;;
        --restart-cmd) RESTART_CMD="$(arg_value "$@")"; shift 2 ;;
        --wait-s) WAIT_S="$(arg_value "$@")"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
done

# --- arguments --------------------------------------------------------------------------
[ -n "$BUNDLE" ] || usage_error "--bundle is required (ca.pem, server-cert.pem, server-key.pem from: ktrdr-run certs issue HOST -o DIR)"
[ -n "$IMAGE_TAR" ] || usage_error "--image-tar is required (from: ktrdr-run images export FILE)"
[ -d "$BUNDLE" ] || usage_error "--bundle $BUNDLE: no such directory"
for file in ca.pem server-cert.pem server-key.pem; do
    [ -r "$BUNDLE/$file" ] \
        || usage_error "--bundle $BUNDLE: $file is missing (the bundle of 'ktrdr-run certs issue HOST -o DIR' has ca.pem, server-cert.pem, server-key.pem)"
done
if [ ! -f "$IMAGE_TAR" ] || [ ! -r "$IMAGE_TAR" ]; then
    usage_error "--image-tar $IMAGE_TAR: no such readable file"
fi
if [[ "$LISTEN" =~ ^\[([0-9A-Fa-f:.]+)\]:([0-9]+)$ ]] || [[ "$LISTEN" =~ ^([0-9.]+):([0-9]+)$ ]]; then
    LISTEN_HOST="${BASH_REMATCH[1]}"
    PORT="${BASH_REMATCH[2]}"
else
    usage_error "--listen $LISTEN: give ADDRESS:PORT (e.g. 0.0.0.0:2376 or [::]:2376)"
fi
if [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    usage_error "--listen $LISTEN: port $PORT is out of range"
fi
[[ "$DOCKER_SOCK" == unix:///* ]] || usage_error "--docker-host $DOCKER_SOCK: give this engine's unix socket (unix:///var/run/docker.sock)"
if ! [[ "$WAIT_S" =~ ^[0-9]+$ ]] || [ "$WAIT_S" -lt 1 ]; then
    usage_error "--wait-s $WAIT_S: a whole number of seconds"
fi
[[ "$DAEMON_JSON" == /* ]] || usage_error "--daemon-json $DAEMON_JSON: give an absolute path"
[[ "$CERT_DIR" == /* ]] || usage_error "--cert-dir $CERT_DIR: give an absolute path"
NAME="${NAME:-$(hostname -s)}"
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ ]] \
    || usage_error "--name $NAME: letters, digits, '_', '.', '-', starting with a letter or digit"
if [ -z "$ADDRESS" ]; then
    case "$LISTEN_HOST" in
        0.0.0.0 | "::")
            ADDRESS="$(ip -4 route get 192.0.2.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p;T;q' || true)"
            [ -n "$ADDRESS" ] || ADDRESS="$(hostname -I 2>/dev/null | awk '{ print $1 }')"
            [ -n "$ADDRESS" ] || usage_error "--address: could not tell this host's address; give it"
            ;;
        *) ADDRESS="$LISTEN_HOST" ;;
    esac
fi
URL_HOST="$ADDRESS"
[[ "$URL_HOST" != *:* ]] || URL_HOST="[$URL_HOST]"
SYSTEMD=0
if [ -z "$RESTART_CMD" ]; then
    if [ -d /run/systemd/system ] && have systemctl; then
        SYSTEMD=1
    elif [ -x /etc/init.d/docker ] && have service; then
        RESTART_CMD="service docker restart"
    else
        usage_error "--restart-cmd: there is no systemd here to restart Docker with; restart dockerd yourself (dockerd --config-file $DAEMON_JSON) and pass the command that does it"
    fi
fi
if [ "$DRY_RUN" -eq 0 ]; then
    for dir in "$(dirname "$DAEMON_JSON")" "$(dirname "$CERT_DIR")"; do
        [ -w "$dir" ] || [ ! -e "$dir" ] || die "cannot write to $dir: run this as root"
    done
fi
DOCKER=(env -u DOCKER_TLS_VERIFY -u DOCKER_CERT_PATH -u DOCKER_CONTEXT docker -H "$DOCKER_SOCK")
CHANGED=0

# --- 1. Docker --------------------------------------------------------------------------
if have dockerd && have docker; then
    log "Docker is installed ($(dockerd --version 2>/dev/null || echo '?'))"
elif [ "$INSTALL" -eq 0 ]; then
    die "Docker is not installed and --no-install was given (apt-get install docker.io, or Docker's own packages)"
elif have apt-get; then
    log "installing Docker (apt-get install docker.io)"
    run env DEBIAN_FRONTEND=noninteractive apt-get update -q
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
    CHANGED=1
else
    die "Docker is not installed and there is no apt-get here: install Docker, then run this again"
fi

# --- 2. certificates --------------------------------------------------------------------
install_file() { # SRC DEST MODE
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        return 0
    fi
    run install -D -m "$3" "$1" "$2"
    CHANGED=1
}
[ -d "$CERT_DIR" ] || run install -d -m 0755 "$CERT_DIR"
install_file "$BUNDLE/ca.pem" "$CERT_DIR/ca.pem" 0644
install_file "$BUNDLE/server-cert.pem" "$CERT_DIR/server-cert.pem" 0644
install_file "$BUNDLE/server-key.pem" "$CERT_DIR/server-key.pem" 0600
log "certificates in $CERT_DIR"

# --- 3. daemon.json ---------------------------------------------------------------------
TCP_HOST="tcp://$LISTEN"
merged_daemon_json() {
    if have python3; then
        python3 - "$DAEMON_JSON" "$DOCKER_SOCK" "$TCP_HOST" "$CERT_DIR" <<'PY'
import json, os, sys

path, sock, tcp, certs = sys.argv[1:5]
config = {}
if os.path.exists(path) and os.path.getsize(path) > 0:
    try:
        with open(path) as handle:
            config = json.load(handle)
    except ValueError as exc:
        sys.exit(f"{path} is not valid JSON ({exc}): fix it or move it away")
    if not isinstance(config, dict):
        sys.exit(f"{path} does not hold a JSON object: fix it or move it away")
hosts = [h for h in config.get("hosts", []) if isinstance(h, str)]
for host in (sock, tcp):
    if host not in hosts:
        hosts.append(host)
config.update(
    hosts=hosts,
    tls=True,
    tlsverify=True,
    tlscacert=f"{certs}/ca.pem",
    tlscert=f"{certs}/server-cert.pem",
    tlskey=f"{certs}/server-key.pem",
)
print(json.dumps(config, indent=2))
PY
    elif [ ! -s "$DAEMON_JSON" ] || [ "$(tr -d ' \n\t' <"$DAEMON_JSON")" = "{}" ]; then
        cat <<EOF
{
  "hosts": ["$DOCKER_SOCK", "$TCP_HOST"],
  "tls": true,
  "tlsverify": true,
  "tlscacert": "$CERT_DIR/ca.pem",
  "tlscert": "$CERT_DIR/server-cert.pem",
  "tlskey": "$CERT_DIR/server-key.pem"
}
EOF
    else
        echo "no python3 to merge into the existing $DAEMON_JSON: add hosts [\"$DOCKER_SOCK\", \"$TCP_HOST\"], tls and tlsverify true, tlscacert/tlscert/tlskey in $CERT_DIR yourself (or install python3)" >&2
        return 1
    fi
}
NEW_JSON="$(merged_daemon_json)" || die "cannot write $DAEMON_JSON"
if [ -f "$DAEMON_JSON" ] && [ "$(cat "$DAEMON_JSON")" = "$NEW_JSON" ]; then
    log "$DAEMON_JSON has the TLS settings already"
elif [ "$DRY_RUN" -eq 1 ]; then
    printf '+ write %s:\n%s\n' "$DAEMON_JSON" "$NEW_JSON"
    CHANGED=1
else
    mkdir -p "$(dirname "$DAEMON_JSON")"
    [ ! -s "$DAEMON_JSON" ] || cp -p "$DAEMON_JSON" "$DAEMON_JSON.ktrdr-bak"
    printf '%s\n' "$NEW_JSON" >"$DAEMON_JSON.tmp.$$"
    mv -f "$DAEMON_JSON.tmp.$$" "$DAEMON_JSON"
    log "wrote $DAEMON_JSON$([ ! -f "$DAEMON_JSON.ktrdr-bak" ] || echo " (the old one: $DAEMON_JSON.ktrdr-bak)")"
    CHANGED=1
fi

if [ "$SYSTEMD" -eq 1 ]; then
    DROPIN=/etc/systemd/system/docker.service.d/ktrdr-tls.conf
    WANT="$(printf '%s\n' \
        "# Written by ktrdr-run's enroll-host.sh: the listening sockets come from $DAEMON_JSON" \
        '# ("hosts"), and dockerd refuses -H on its command line as well.' \
        '[Service]' 'ExecStart=' \
        "ExecStart=$(command -v dockerd || echo /usr/sbin/dockerd) --config-file $DAEMON_JSON --containerd=/run/containerd/containerd.sock")"
    if [ -f "$DROPIN" ] && [ "$(cat "$DROPIN")" = "$WANT" ]; then
        :
    elif [ "$DRY_RUN" -eq 1 ]; then
        printf '+ write %s:\n%s\n' "$DROPIN" "$WANT"
        CHANGED=1
    else
        mkdir -p "$(dirname "$DROPIN")"
        printf '%s\n' "$WANT" >"$DROPIN"
        log "wrote $DROPIN"
        CHANGED=1
    fi
    run systemctl daemon-reload
fi

# --- 4. restart, wait, check TLS --------------------------------------------------------
docker_answers() { "${DOCKER[@]}" version --format '{{.Server.Version}}' >/dev/null 2>&1; }
CHECK_HOST="$LISTEN_HOST"
case "$CHECK_HOST" in 0.0.0.0) CHECK_HOST=127.0.0.1 ;; "::") CHECK_HOST=::1 ;; esac
[[ "$CHECK_HOST" != *:* ]] || CHECK_HOST="[$CHECK_HOST]"
port_listens() { (exec 3<>"/dev/tcp/${CHECK_HOST//[\[\]]/}/$PORT") 2>/dev/null; }

if [ "$CHANGED" -eq 1 ] || ! docker_answers || ! port_listens; then
    log "restarting Docker"
    if [ "$SYSTEMD" -eq 1 ]; then
        run systemctl restart docker
    else
        run bash -c "$RESTART_CMD"
    fi
else
    log "nothing changed and Docker answers: not restarting it"
fi
if [ "$DRY_RUN" -eq 0 ]; then
    deadline=$((SECONDS + WAIT_S))
    until docker_answers && port_listens; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            hint="journalctl -u docker -n 30 --no-pager"
            [ "$SYSTEMD" -eq 1 ] || hint="the log of: $RESTART_CMD"
            die "Docker did not answer on $DOCKER_SOCK and $CHECK_HOST:$PORT within $WAIT_S s after the restart ($hint)"
        fi
        sleep 1
    done
    log "Docker answers on $DOCKER_SOCK and listens on $CHECK_HOST:$PORT"
    if have curl; then
        rc=0
        curl -sk --max-time 5 "https://$CHECK_HOST:$PORT/_ping" >/dev/null 2>&1 || rc=$?
        case "$rc" in
            0) die "$CHECK_HOST:$PORT answers a client without a certificate: tlsverify is not in effect (check $DAEMON_JSON and how dockerd is started)" ;;
            7 | 28) die "nothing answers HTTPS on $CHECK_HOST:$PORT (curl exit $rc)" ;;
            *) log "TLS on $CHECK_HOST:$PORT: a client without a certificate is refused (as it should be)" ;;
        esac
    fi
fi

# --- 5. the runner image ----------------------------------------------------------------
MANIFEST="$(tar -xOf "$IMAGE_TAR" manifest.json 2>/dev/null || true)"
[ -n "$MANIFEST" ] || die "--image-tar $IMAGE_TAR: no manifest.json in it: not a 'docker save' / 'ktrdr-run images export' tarball"
TAGS="$(sed -n 's/.*"RepoTags":[[:space:]]*\[\([^]]*\)\].*/\1/p' <<<"$MANIFEST" | tr ',' '\n' | tr -d '" ' | sed '/^$/d')"
CONFIG_ID="$(sed -n 's/.*"Config":[[:space:]]*"\([^"]*\)".*/\1/p;T;q' <<<"$MANIFEST")"
CONFIG_ID="${CONFIG_ID##*/}"
CONFIG_ID="${CONFIG_ID%.json}"
[ -n "$TAGS" ] || die "--image-tar $IMAGE_TAR: the image in it has no tag (export it with ktrdr-run images export)"
loaded=1
if [ "$DRY_RUN" -eq 0 ] || docker_answers; then
    for tag in $TAGS; do
        id="$("${DOCKER[@]}" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)"
        [ "$id" = "sha256:$CONFIG_ID" ] || loaded=0
    done
else
    loaded=0
fi
if [ "$loaded" -eq 1 ]; then
    log "the engine has $(paste -sd' ' <<<"$TAGS") already: not loading it again"
else
    log "loading $(paste -sd' ' <<<"$TAGS") from $IMAGE_TAR"
    run "${DOCKER[@]}" load -i "$IMAGE_TAR" >&2
fi

# --- 6. GPUs ----------------------------------------------------------------------------
GPU_FLAGS=()
if have nvidia-smi; then
    if ! gpus="$(nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits 2>&1)"; then
        warn "nvidia-smi fails: ${gpus//$'\n'/ } (is the NVIDIA driver loaded?): enrolling without GPUs"
    elif ! runtimes="$("${DOCKER[@]}" info --format '{{json .Runtimes}}' 2>/dev/null)" || [[ "$runtimes" != *'"nvidia"'* ]]; then
        [ "$DRY_RUN" -eq 1 ] && [ -z "${runtimes:-}" ] && runtimes="(Docker not running yet)"
        warn "Docker has no nvidia runtime (runtimes: ${runtimes:-?}): install the NVIDIA container toolkit, run 'nvidia-ctk runtime configure --runtime=docker' and restart Docker, then run this again; enrolling without GPUs"
    else
        while IFS=, read -r index model memory; do
            index="${index// /}"
            model="$(sed 's/^ *//; s/ *$//' <<<"$model")"
            memory="$(awk -v m="${memory// /}" 'BEGIN { printf "%.0f", m / 1024 }')"
            GPU_FLAGS+=("--gpu" "$index:$model:$memory")
            log "GPU $index: $model, $memory GB"
        done <<<"$gpus"
        log "Docker has the nvidia runtime: $((${#GPU_FLAGS[@]} / 2)) GPU(s) ready"
    fi
else
    log "no nvidia-smi: a CPU host"
fi

# --- 7. what to run on the dispatcher's host --------------------------------------------
line="ktrdr-run hosts add $NAME tcp://$URL_HOST:$PORT"
for ((i = 0; i < ${#GPU_FLAGS[@]}; i += 2)); do
    line+=" --gpu '${GPU_FLAGS[i + 1]//\'/}'"
done
log "enrolled: the Docker API is on tcp://$URL_HOST:$PORT with TLS; on the dispatcher's host run:"
printf '%s\n' "$line"
