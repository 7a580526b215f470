#!/usr/bin/env python3
"""A recording fake of Proxmox VE's ``pct`` (the LXC container tool, run as root on a node).

Every call is appended to the call log first; state lives in ``$FAKE_PVE_STATE`` (see
``pvestate``). Implemented, with the checks and messages of the real command where a
script depends on them:

- ``status VMID``                        ``status: running|stopped``; a missing CT fails
- ``config VMID``                        the CT's config file (up to its first snapshot)
- ``create VMID OSTEMPLATE --opt v ...`` hostname ostype unprivileged features cores memory
                                         swap rootfs storage net0 onboot tags description;
                                         the VMID must be free in the cluster, the template
                                         volume must exist, rootfs's storage must hold rootdir
- ``clone SRC NEW --hostname H [--full 1]`` from a template (or --full), NEW must be free;
                                         the clone has the source's config, files, packages
                                         and images, and is stopped
- ``set VMID --opt v ...``               hostname net0 tags cores memory onboot description
- ``start|stop|shutdown [--timeout N]|reboot VMID``  (start: not a template, not running;
                                         an address from net0: DHCP gives 10.10.<vmid/256>.<vmid%256>)
- ``template VMID``                      only when stopped
- ``destroy VMID [--purge 1]``           only when stopped
- ``push VMID FILE DEST [--perms M] [--user U] [--group G]``  only when running
- ``exec VMID -- CMD ...``               only when running; simulates the commands the
                                         scripts run inside (``env VAR=x`` prefixes are
                                         skipped): apt-get update/install, mkdir, rm,
                                         truncate, curl, gpg, systemctl daemon-reload/
                                         restart/stop, ip (route/addr), docker info/load/
                                         version, nvidia-smi, nvidia-ctk, sh FILE (a pushed
                                         NVIDIA .run installer); any other command fails
                                         (exit 127) saying it is not simulated

Any other subcommand or option fails loudly (exit 97).
"""

from __future__ import annotations

import copy
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pvestate
from pvestate import die, unsupported

PROG = "pct"
SUBCOMMANDS = "status config create clone set start stop shutdown reboot template destroy push exec"


def parse_opts(args: list[str], allowed: set[str], what: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        key = args[i]
        if not key.startswith("--") or key[2:] not in allowed:
            unsupported(PROG, f"{what} option {key!r}", " ".join(f"--{a}" for a in sorted(allowed)))
        if i + 1 >= len(args):
            die(PROG, f"400 not enough arguments: {key} needs a value")
        opts[key[2:]] = args[i + 1]
        i += 2
    return opts


def guest_of(state: dict[str, Any], vmid: str) -> dict[str, Any]:
    guest = state["guests"].get(vmid)
    if guest is None or guest["type"] != "lxc" or guest["node"] != state["node"]:
        die(PROG, f"Configuration file 'nodes/{state['node']}/lxc/{vmid}.conf' does not exist", 2)
    return guest


def check_free(state: dict[str, Any], vmid: str) -> None:
    if not re.fullmatch(r"[1-9][0-9]{2,8}", vmid):
        die(
            PROG,
            "400 Parameter verification failed.\n"
            "vmid: invalid format - value does not look like a valid VM ID",
        )
    other = state["guests"].get(vmid)
    if other is not None:
        kind = "CT" if other["type"] == "lxc" else "VM"
        die(PROG, f"unable to create CT {vmid} - {kind} {vmid} already exists on node '{other['node']}'")


def need_running(guest: dict[str, Any], vmid: str) -> None:
    if guest["status"] != "running":
        die(PROG, f"CT {vmid} not running")


def address(vmid: str, net0: str) -> str:
    match = re.search(r"(?:^|,)ip=([^,]+)", net0)
    ip = match.group(1) if match else ""
    if ip == "dhcp":
        number = int(vmid)
        return f"10.10.{(number >> 8) & 255}.{number & 255}"
    return ip.split("/", 1)[0] if ip and ip != "manual" else ""


def docker_start(guest: dict[str, Any]) -> None:
    """dockerd (re)starts: it reads its certificates and runtimes now."""
    docker = guest.setdefault("docker", {})
    if "docker.io" not in guest["packages"]:
        return
    docker["active"] = True
    cert = guest["pushed"].get("/etc/docker/certs/server-cert.pem")
    docker["serving_cert"] = cert["sha256"] if cert else None
    docker["runtimes"] = ["runc"] + (["nvidia"] if docker.get("nvidia_configured") else [])


def cmd_create(state: dict[str, Any], args: list[str]) -> None:
    if len(args) < 2:
        die(PROG, "400 not enough arguments: pct create <vmid> <ostemplate> [OPTIONS]")
    vmid, ostemplate = args[0], args[1]
    opts = parse_opts(
        args[2:],
        {
            "hostname",
            "ostype",
            "unprivileged",
            "features",
            "cores",
            "memory",
            "swap",
            "rootfs",
            "storage",
            "net0",
            "onboot",
            "tags",
            "description",
        },
        "create",
    )
    check_free(state, vmid)
    storage, _, volume = ostemplate.partition(":")
    if volume.removeprefix("vztmpl/") not in state["ostemplates"].get(storage, []):
        die(PROG, f"volume '{ostemplate}' does not exist")
    rootfs_storage = opts.get("rootfs", opts.get("storage", "local")).split(":", 1)[0]
    store = state["storages"].get(rootfs_storage)
    if store is None:
        die(PROG, f"storage '{rootfs_storage}' does not exist")
    if "rootdir" not in store["content"].split(","):
        die(PROG, f"storage '{rootfs_storage}' does not support container directories")
    tags = [t for t in re.split(r"[;, ]+", opts.pop("tags", "")) if t]
    guest = {
        "type": "lxc",
        "node": state["node"],
        "status": "stopped",
        "template": 0,
        "ostemplate": ostemplate,
        "config": {"arch": "amd64", **opts},
        "tags": tags,
        "pushed": {},
        "packages": [],
        "images": [],
        "ip": "",
        "docker": {},
    }
    state["guests"][vmid] = guest
    pvestate.write_conf(vmid, guest)


def cmd_clone(state: dict[str, Any], args: list[str]) -> None:
    if len(args) < 2:
        die(PROG, "400 not enough arguments: pct clone <vmid> <newid> [OPTIONS]")
    source_id, vmid = args[0], args[1]
    opts = parse_opts(args[2:], {"hostname", "full", "description", "storage"}, "clone")
    source = guest_of(state, source_id)
    check_free(state, vmid)
    if not source["template"] and opts.get("full") != "1":
        die(PROG, "parameter 'full' - linked clone is only possible from a template")
    guest = copy.deepcopy(source)
    guest.update(status="stopped", template=0, ip="")
    guest["docker"].pop("active", None)
    if "hostname" in opts:
        guest["config"]["hostname"] = opts["hostname"]
    state["guests"][vmid] = guest
    pvestate.write_conf(vmid, guest)


def cmd_set(state: dict[str, Any], args: list[str]) -> None:
    if not args:
        die(PROG, "400 not enough arguments: pct set <vmid> [OPTIONS]")
    vmid = args[0]
    opts = parse_opts(
        args[1:], {"hostname", "net0", "tags", "cores", "memory", "onboot", "description"}, "set"
    )
    guest = guest_of(state, vmid)
    if guest["template"]:
        die(PROG, f"CT {vmid} is a template")
    if "tags" in opts:
        guest["tags"] = [t for t in re.split(r"[;, ]+", opts.pop("tags")) if t]
    guest["config"].update(opts)
    pvestate.write_conf(vmid, guest)


def cmd_power(state: dict[str, Any], sub: str, args: list[str]) -> None:
    if not args:
        die(PROG, f"400 not enough arguments: pct {sub} <vmid>")
    vmid = args[0]
    parse_opts(args[1:], {"timeout", "forceStop"} if sub == "shutdown" else set(), sub)
    guest = guest_of(state, vmid)
    if sub == "start":
        if guest["template"]:
            die(PROG, f"CT {vmid} is a template and cannot be started")
        if guest["status"] == "running":
            die(PROG, f"CT {vmid} already running")
        guest["status"] = "running"
        guest["ip"] = address(vmid, guest["config"].get("net0", ""))
        docker_start(guest)
        return
    need_running(guest, vmid)
    if sub == "reboot":
        guest["ip"] = address(vmid, guest["config"].get("net0", ""))
        docker_start(guest)
        guest.setdefault("reboots", 0)
        guest["reboots"] += 1
        return
    guest["status"] = "stopped"
    guest["ip"] = ""
    guest["docker"]["active"] = False


def cmd_template(state: dict[str, Any], args: list[str]) -> None:
    if len(args) != 1:
        die(PROG, "400 wrong number of arguments: pct template <vmid>")
    guest = guest_of(state, args[0])
    if guest["status"] == "running":
        die(PROG, "you can't convert a CT to template if the CT is running")
    guest["template"] = 1
    pvestate.write_conf(args[0], guest)


def cmd_destroy(state: dict[str, Any], args: list[str]) -> None:
    if not args:
        die(PROG, "400 not enough arguments: pct destroy <vmid>")
    vmid = args[0]
    parse_opts(args[1:], {"purge", "force"}, "destroy")
    guest = guest_of(state, vmid)
    if guest["status"] == "running":
        die(PROG, f"CT {vmid} is running - destroy failed")
    del state["guests"][vmid]
    pvestate.remove_conf(vmid)


def cmd_push(state: dict[str, Any], args: list[str]) -> None:
    if len(args) < 3:
        die(PROG, "400 not enough arguments: pct push <vmid> <file> <destination> [OPTIONS]")
    vmid, source, dest = args[0], Path(args[1]), args[2]
    opts = parse_opts(args[3:], {"perms", "user", "group"}, "push")
    guest = guest_of(state, vmid)
    need_running(guest, vmid)
    if not source.is_file():
        die(PROG, f"failed to open {source} for reading")
    entry = pvestate.file_record(source, opts.get("perms", "0644"))
    entry["from"] = str(source)
    if source.suffix == ".tar" or source.name.endswith(".tar.gz"):
        entry["repo_tags"] = image_tags(source)
    guest["pushed"][dest] = entry


def image_tags(path: Path) -> list[str]:
    """The RepoTags of a ``docker save`` tarball."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            member = tar.extractfile("manifest.json")
            manifest = json.load(io.TextIOWrapper(member)) if member else []
    except (tarfile.TarError, KeyError, ValueError):
        return []
    return [tag for entry in manifest for tag in entry.get("RepoTags") or []]


def exec_in(guest: dict[str, Any], vmid: str, cmd: list[str]) -> int:
    """Simulate CMD inside the container; returns its exit status."""
    while cmd and cmd[0] == "env":
        cmd = cmd[1:]
        while cmd and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", cmd[0]):
            cmd = cmd[1:]
    if not cmd:
        return 0
    prog, args = cmd[0], cmd[1:]
    packages: list[str] = guest["packages"]
    docker = guest.setdefault("docker", {})
    if prog == "apt-get":
        if args[:1] == ["update"]:
            return 0
        if "install" in args:
            for name in args[args.index("install") + 1 :]:
                if not name.startswith("-") and name not in packages:
                    packages.append(name)
            if "docker.io" in args:
                docker_start(guest)  # the package starts the service
            return 0
    elif prog in ("mkdir", "truncate", "gpg"):
        return 0
    elif prog == "rm":
        for path in args:
            guest["pushed"].pop(path, None)
        return 0
    elif prog == "curl":
        if "-o" in args:
            guest["pushed"][args[args.index("-o") + 1]] = {"from": args[-1], "perms": "0644"}
        return 0
    elif prog == "systemctl":
        if args[:1] == ["daemon-reload"]:
            return 0
        units = args[1:]
        if not any(u.startswith("docker") for u in units):
            unsupported(
                PROG, f"exec systemctl {' '.join(args)}", "systemctl daemon-reload|restart|stop docker"
            )
        if "docker.io" not in packages:
            print("Failed to restart docker.service: Unit docker.service not found.", file=sys.stderr)
            return 5
        if args[0] == "restart":
            docker_start(guest)
            return 0
        if args[0] == "stop":
            docker["active"] = False
            return 0
    elif prog == "ip":
        if not guest["ip"]:
            return 0
        subnet = guest["ip"].rsplit(".", 1)[0]
        if args == ["-4", "route", "show", "default"]:
            print(f"default via {subnet}.1 dev eth0 proto dhcp src {guest['ip']} metric 1024")
            return 0
        if args[:4] == ["-4", "-o", "addr", "show"]:
            print(
                f"2: eth0    inet {guest['ip']}/24 brd {subnet}.255 scope global dynamic "
                "eth0\\       valid_lft 86313sec preferred_lft 86313sec"
            )
            return 0
    elif prog == "docker":
        if "docker.io" not in packages:
            print("sh: 1: docker: not found", file=sys.stderr)
            return 127
        if not docker.get("active"):
            print(
                "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                "Is the docker daemon running?",
                file=sys.stderr,
            )
            return 1
        if args[:1] in (["info"], ["version"]):
            fmt = args[args.index("--format") + 1] if "--format" in args else ""
            if "Runtimes" in fmt:
                print(json.dumps({name: {"path": name} for name in docker.get("runtimes", ["runc"])}))
            else:
                print("20.10.24+dfsg1")
            return 0
        if args[:2] == ["load", "-i"] and len(args) == 3:
            pushed = guest["pushed"].get(args[2])
            if pushed is None:
                print(f"open {args[2]}: no such file or directory", file=sys.stderr)
                return 1
            for tag in pushed.get("repo_tags", []):
                print(f"Loaded image: {tag}")
                if tag not in guest["images"]:
                    guest["images"].append(tag)
            return 0
    elif prog == "nvidia-smi":
        if not guest.get("nvidia_userspace"):
            print("sh: 1: nvidia-smi: not found", file=sys.stderr)
            return 127
        print("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)")
        return 0
    elif prog == "sh" and args and args[0] in guest["pushed"] and args[0].endswith(".run"):
        if "--no-kernel-module" not in args:
            print("ERROR: Unable to load the kernel module 'nvidia.ko' (inside a container)", file=sys.stderr)
            return 1
        guest["nvidia_userspace"] = True
        return 0
    elif prog == "nvidia-ctk":
        if "nvidia-container-toolkit" not in packages:
            print("sh: 1: nvidia-ctk: not found", file=sys.stderr)
            return 127
        if args == ["runtime", "configure", "--runtime=docker"]:
            docker["nvidia_configured"] = True
            return 0
        if args[:2] == ["config", "--set"]:
            docker.setdefault("ctk_settings", []).append(args[2])
            return 0
    print(f"fake pct exec: '{' '.join(cmd)}' is not simulated inside CT {vmid}", file=sys.stderr)
    return 127


def cmd_exec(state: dict[str, Any], args: list[str]) -> int:
    if len(args) < 3 or args[1] != "--":
        die(PROG, "400 usage: pct exec <vmid> -- <command> [args]")
    vmid = args[0]
    guest = guest_of(state, vmid)
    need_running(guest, vmid)
    guest.setdefault("exec", []).append(args[2:])
    return exec_in(guest, vmid, args[2:])


def main(argv: list[str]) -> int:
    pvestate.record(PROG, argv)
    if not argv:
        unsupported(PROG, "pct without a subcommand", SUBCOMMANDS)
    sub, args = argv[0], argv[1:]
    with pvestate.locked() as state:
        if sub == "status":
            guest = guest_of(state, args[0] if args else "")
            print(f"status: {guest['status']}")
        elif sub == "config":
            guest_of(state, args[0] if args else "")
            text = pvestate.conf_path(args[0]).read_text()
            print(text.split("\n[", 1)[0].rstrip("\n"))
        elif sub == "create":
            cmd_create(state, args)
        elif sub == "clone":
            cmd_clone(state, args)
        elif sub == "set":
            cmd_set(state, args)
        elif sub in ("start", "stop", "shutdown", "reboot"):
            cmd_power(state, sub, args)
        elif sub == "template":
            cmd_template(state, args)
        elif sub == "destroy":
            cmd_destroy(state, args)
        elif sub == "push":
            cmd_push(state, args)
        elif sub == "exec":
            return cmd_exec(state, args)
        else:
            unsupported(PROG, f"subcommand {sub!r}", SUBCOMMANDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
