#!/usr/bin/env bash
# Pass the host's NVIDIA GPUs through to a ktrdr-run worker (an LXC container on this
# Proxmox VE node) so that Docker inside can run GPU containers: checks the host driver,
# adds the device lines to /etc/pve/lxc/<ID>.conf (once), installs the driver's user
# space and the NVIDIA container toolkit inside, and configures Docker's nvidia runtime.
# Run as root on the container's node; see --help.
set -euo pipefail

PROG=gpu-passthrough
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<'EOF'
Usage: gpu-passthrough.sh --vmid ID [--gpus all|0,1] [options]

  1. checks the host: nvidia-smi works, /dev/nvidiactl, /dev/nvidia<N> and
     /dev/nvidia-uvm exist (and says what is missing);
  2. adds to /etc/pve/lxc/ID.conf the lines it lacks (a re-run adds none):
       lxc.cgroup2.devices.allow: c 195:* rwm        (195:N per GPU with --gpus 0,1)
       lxc.cgroup2.devices.allow: c <nvidia-uvm major>:* rwm
       lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file
       ... nvidiactl, nvidia-modeset, nvidia-uvm, nvidia-uvm-tools, nvidia-caps
     and restarts the container when it added any;
  3. inside: the NVIDIA driver's user space (the same version as the host's, from
     NVIDIA's .run installer with --no-kernel-module) unless nvidia-smi already works
     there, the NVIDIA container toolkit, `nvidia-ctk runtime configure --runtime=docker`,
     no-cgroups (an unprivileged container cannot manage device cgroups), and restarts
     Docker;
  4. prints the gpus = [...] line for the worker tag's [[discovery.proxmox.workers]].

Required:
  --vmid ID            the worker container
Options:
  --gpus all|LIST      which GPUs, by the host's index (default all)
  --driver-run FILE    NVIDIA-Linux-x86_64-<version>.run to install inside (default:
                       downloaded inside from download.nvidia.com for the host's version)
  --driver-url URL     where to download the .run from instead
  --skip-driver        do not install the driver's user space inside
  --dry-run            check, then print the commands instead of running them
  -h, --help           this text

Environment: PVE_LXC_DIR (default /etc/pve/lxc), NVIDIA_DEV_DIR (where the host's device
nodes are, default /dev), PROC_DEVICES (default /proc/devices), KTRDR_POLL_S.
EOF
}

VMID=""
GPUS=all
DRIVER_RUN=""
DRIVER_URL=""
SKIP_DRIVER=0
LXC_DIR="${PVE_LXC_DIR:-/etc/pve/lxc}"
DEV="${NVIDIA_DEV_DIR:-/dev}"
PROC_DEVICES="${PROC_DEVICES:-/proc/devices}"

mapfile -d '' ARGS < <(split_equals "$@")
set -- "${ARGS[@]}"
while [ $# -gt 0 ]; do
    case "$1" in
        --vmid) VMID="$(arg_value "$@")"; shift 2 ;;
        --gpus) GPUS="$(arg_value "$@")"; shift 2 ;;
        --driver-run) DRIVER_RUN="$(arg_value "$@")"; shift 2 ;;
        --driver-url) DRIVER_URL="$(arg_value "$@")"; shift 2 ;;
        --skip-driver) SKIP_DRIVER=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
done

[ -n "$VMID" ] || usage_error "--vmid is required (the worker container's VMID)"
check_vmid --vmid "$VMID"
[[ "$GPUS" == all || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || usage_error "--gpus $GPUS: all, or GPU indexes separated by commas (e.g. 0,1)"
[ -z "$DRIVER_RUN" ] || need_file --driver-run "$DRIVER_RUN"
[ -z "$DRIVER_RUN" ] || [ -z "$DRIVER_URL" ] || usage_error "--driver-run and --driver-url: give one of them"
[ "$SKIP_DRIVER" -eq 0 ] || [ -z "$DRIVER_RUN$DRIVER_URL" ] \
    || usage_error "--skip-driver: then --driver-run/--driver-url have nothing to do"
need_tools pct

# --- the host's driver ------------------------------------------------------------------
problems=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
    problems+=("nvidia-smi not found: the NVIDIA driver is not installed on this host (install it on the Proxmox host first, with the headers of the running kernel: apt-get install pve-headers-\$(uname -r), then NVIDIA's .run installer)")
elif ! smi="$(nvidia-smi -L 2>&1)"; then
    problems+=("nvidia-smi fails: ${smi//$'\n'/ } (is the nvidia module loaded? lsmod | grep nvidia; dmesg | grep -i nvidia)")
fi
[ -e "$DEV/nvidiactl" ] || problems+=("$DEV/nvidiactl is missing (the nvidia kernel module is not loaded: modprobe nvidia)")
HOST_GPUS=()
for node in "$DEV"/nvidia[0-9]*; do
    [ -e "$node" ] || continue
    HOST_GPUS+=("${node#"$DEV"/nvidia}")
done
mapfile -t HOST_GPUS < <(printf '%s\n' "${HOST_GPUS[@]}" | grep -E '^[0-9]+$' | sort -n || true)
[ "${#HOST_GPUS[@]}" -gt 0 ] || problems+=("no $DEV/nvidia<N> device node (nvidia-smi creates them; is a GPU bound to the nvidia driver? lspci -k | grep -A3 -i nvidia)")
[ -e "$DEV/nvidia-uvm" ] \
    || problems+=("$DEV/nvidia-uvm is missing (CUDA needs it): nvidia-modprobe -u -c=0, and add nvidia-uvm to /etc/modules-load.d/nvidia.conf so that it is there after a reboot")
UVM_MAJOR="$(awk '$2 == "nvidia-uvm" { print $1; exit }' "$PROC_DEVICES" 2>/dev/null || true)"
[ -n "$UVM_MAJOR" ] || problems+=("nvidia-uvm is not in $PROC_DEVICES (modprobe nvidia-uvm)")
CAPS_MAJOR="$(awk '$2 == "nvidia-caps" { print $1; exit }' "$PROC_DEVICES" 2>/dev/null || true)"
if [ "${#problems[@]}" -gt 0 ]; then
    printf '[%s] error: the host is not ready for GPU passthrough:\n' "$PROG" >&2
    printf '  - %s\n' "${problems[@]}" >&2
    exit 1
fi

if [ "$GPUS" = all ]; then
    SELECTED=("${HOST_GPUS[@]}")
else
    IFS=, read -r -a SELECTED <<<"$GPUS"
    for idx in "${SELECTED[@]}"; do
        [ -e "$DEV/nvidia$idx" ] \
            || usage_error "--gpus $GPUS: there is no GPU $idx ($DEV/nvidia$idx); this host has: ${HOST_GPUS[*]}"
    done
fi

CONF="$LXC_DIR/$VMID.conf"
[ -f "$CONF" ] || die "--vmid $VMID: no container $VMID on this node ($CONF does not exist)"

# --- the container's config -------------------------------------------------------------
LINES=()
if [ "$GPUS" = all ]; then
    LINES+=("lxc.cgroup2.devices.allow: c 195:* rwm")
else
    for idx in "${SELECTED[@]}"; do LINES+=("lxc.cgroup2.devices.allow: c 195:$idx rwm"); done
    LINES+=("lxc.cgroup2.devices.allow: c 195:254 rwm" "lxc.cgroup2.devices.allow: c 195:255 rwm")
fi
LINES+=("lxc.cgroup2.devices.allow: c $UVM_MAJOR:* rwm")
[ -z "$CAPS_MAJOR" ] || LINES+=("lxc.cgroup2.devices.allow: c $CAPS_MAJOR:* rwm")
for idx in "${SELECTED[@]}"; do
    LINES+=("lxc.mount.entry: /dev/nvidia$idx dev/nvidia$idx none bind,optional,create=file")
done
for name in nvidiactl nvidia-modeset nvidia-uvm nvidia-uvm-tools; do
    [ ! -e "$DEV/$name" ] || LINES+=("lxc.mount.entry: /dev/$name dev/$name none bind,optional,create=file")
done
[ ! -d "$DEV/nvidia-caps" ] || LINES+=("lxc.mount.entry: /dev/nvidia-caps dev/nvidia-caps none bind,optional,create=dir")

# The container's own section ends where the first [snapshot] section starts.
MAIN="$(awk '/^\[/ { exit } { print }' "$CONF")"
MISSING=()
for entry in "${LINES[@]}"; do
    grep -Fxq -- "$entry" <<<"$MAIN" || MISSING+=("$entry")
done
if [ "${#MISSING[@]}" -eq 0 ]; then
    log "$CONF already has the GPU lines"
elif [ "$DRY_RUN" -eq 1 ]; then
    printf '+ add to %s:\n' "$CONF"
    printf '    %s\n' "${MISSING[@]}"
else
    # Before any snapshot section, through a temporary file in the same directory (as
    # Proxmox writes its own config files on /etc/pve).
    tmp="$CONF.tmp.$$"
    printf '%s\n' "${MISSING[@]}" | awk -v lines=/dev/stdin '
        !done && /^\[/ { while ((getline l < lines) > 0) print l; done = 1 }
        { print }
        END { if (!done) while ((getline l < lines) > 0) print l }' "$CONF" >"$tmp"
    mv -f "$tmp" "$CONF"
    log "added ${#MISSING[@]} line(s) to $CONF"
fi

# --- inside the container ---------------------------------------------------------------
STATUS="$(pct status "$VMID" | awk '{ print $2 }')"
if [ "$STATUS" != running ]; then
    run pct start "$VMID"
elif [ "${#MISSING[@]}" -gt 0 ]; then
    log "restarting CT $VMID so that it gets the devices"
    run pct reboot "$VMID"
fi
ct_wait "$VMID" 120 "the network is up" ip -4 route show default
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/ktrdr-gpu.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
run pct exec "$VMID" -- env DEBIAN_FRONTEND=noninteractive apt-get update -q
run pct exec "$VMID" -- env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    ca-certificates curl gpg

# (awk reads all of it: `head` would leave nvidia-smi writing to a closed pipe)
HOST_VERSION="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | awk 'NR == 1 { gsub(/ /, ""); print }')"
if [ "$SKIP_DRIVER" -eq 1 ]; then
    log "not installing the driver's user space inside (--skip-driver)"
elif [ "$DRY_RUN" -eq 0 ] && pct exec "$VMID" -- nvidia-smi -L >/dev/null 2>&1; then
    log "the driver's user space works inside CT $VMID"
else
    [ "$DRY_RUN" -eq 0 ] || printf '# unless "pct exec %s -- nvidia-smi -L" works already:\n' "$VMID"
    log "installing the NVIDIA driver $HOST_VERSION's user space inside CT $VMID"
    if [ -n "$DRIVER_RUN" ]; then
        run pct push "$VMID" "$DRIVER_RUN" /root/nvidia-driver.run --perms 0755
    else
        url="${DRIVER_URL:-https://download.nvidia.com/XFree86/Linux-x86_64/$HOST_VERSION/NVIDIA-Linux-x86_64-$HOST_VERSION.run}"
        run pct exec "$VMID" -- curl -fsSL -o /root/nvidia-driver.run "$url"
    fi
    run pct exec "$VMID" -- sh /root/nvidia-driver.run --silent --no-kernel-module
    run pct exec "$VMID" -- rm -f /root/nvidia-driver.run
    if [ "$DRY_RUN" -eq 0 ] && ! pct exec "$VMID" -- nvidia-smi -L >/dev/null 2>&1; then
        die "CT $VMID: nvidia-smi does not work inside after installing the driver's user space: it must be version $HOST_VERSION, as on the host (--driver-run FILE)"
    fi
fi

log "installing the NVIDIA container toolkit inside CT $VMID"
KEYRING=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
# shellcheck disable=SC2016 # $(ARCH) is apt's, not the shell's
printf 'deb [signed-by=%s] https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /\n' "$KEYRING" \
    >"$STAGE/nvidia-container-toolkit.list"
run pct exec "$VMID" -- curl -fsSL -o /root/nvidia-container-toolkit.gpgkey https://nvidia.github.io/libnvidia-container/gpgkey
run pct exec "$VMID" -- gpg --batch --yes --dearmor -o "$KEYRING" /root/nvidia-container-toolkit.gpgkey
run pct push "$VMID" "$STAGE/nvidia-container-toolkit.list" /etc/apt/sources.list.d/nvidia-container-toolkit.list --perms 0644
run pct exec "$VMID" -- env DEBIAN_FRONTEND=noninteractive apt-get update -q
run pct exec "$VMID" -- env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nvidia-container-toolkit
run pct exec "$VMID" -- nvidia-ctk runtime configure --runtime=docker
run pct exec "$VMID" -- nvidia-ctk config --set nvidia-container-cli.no-cgroups --in-place
run pct exec "$VMID" -- systemctl restart docker
docker_has_nvidia() {
    local runtimes
    runtimes="$(pct exec "$VMID" -- docker info --format '{{json .Runtimes}}' 2>/dev/null)" \
        && [[ "$runtimes" == *'"nvidia"'* ]]
}
if [ "$DRY_RUN" -eq 0 ]; then
    wait_for 60 "CT $VMID: Docker has the nvidia runtime" docker_has_nvidia \
        || die "CT $VMID: Docker does not list the nvidia runtime after nvidia-ctk runtime configure; look inside: pct exec $VMID -- cat /etc/docker/daemon.json; pct exec $VMID -- journalctl -u docker -n 30 --no-pager"
fi

# --- what the dispatcher's config says --------------------------------------------------
ENTRIES=()
while IFS=, read -r index name memory; do
    index="${index// /}"
    name="$(sed 's/^ *//; s/ *$//; s/"/\\"/g' <<<"$name")"
    memory="${memory// /}"
    [[ " ${SELECTED[*]} " == *" $index "* ]] || continue
    ENTRIES+=("{ index = $index, model = \"$name\", memory_gb = $(awk -v m="$memory" 'BEGIN { printf "%.0f", m / 1024 }') }")
done < <(nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits)
log "CT $VMID has GPUs ${SELECTED[*]}; Docker inside runs them with --gpus / device requests"
joined="$(printf '%s, ' "${ENTRIES[@]}")"
cat <<EOF
# Every worker with a tag has the same GPUs: give GPU workers a tag of their own, and in
# its [[discovery.proxmox.workers]] entry (check the indexes inside with
# pct exec $VMID -- nvidia-smi -L):
gpus = [${joined%, }]
EOF
