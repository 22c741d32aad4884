"""The pre-flight checks behind `python -m marjara.preflight` (marjara/preflight.py): each one
raises a MarjaraError naming the bad line, host or tool.

ssh options come from PDSH_SSH_ARGS_APPEND, as for DeepSpeed's pdsh launcher.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

from marjara.errors import MarjaraError
from marjara.launch.hostfile import Host, check_host_name, read_hostfile, total_slots

SSH_LAUNCHERS = ("pdsh", "openmpi", "mpich")
LAUNCHER_TOOLS = {"pdsh": "pdsh", "openmpi": "ompi_info", "mpich": "mpirun", "no_ssh": "deepspeed"}
INSTALL_HINTS = {
    "pdsh": "apt-get install pdsh openssh-client",
    "openmpi": "apt-get install openmpi-bin",
    "mpich": "apt-get install mpich (and put its mpirun first on PATH)",
    "no_ssh": "pip install deepspeed",
}

_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHELL_ACTIVE = set('"`$\\')


def check_env_file(path: str) -> None:
    try:
        lines = open(path).read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MarjaraError(f"cannot read env file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    for number, line in enumerate(lines, start=1):
        key, sep, value = line.partition("=")
        where = f"{path} line {number} ({line!r})"
        if not sep or not _ENV_KEY_RE.match(key.strip()):
            raise MarjaraError(f"{where}: expected KEY=VALUE (no comments or blank lines: DeepSpeed reads every line)")
        if _SHELL_ACTIVE & set(value):
            raise MarjaraError(f"{where}: the value holds one of \" ` $ \\, which the remote shell would expand")


def check_world_size(hosts: list[Host], world_size: int | None) -> None:
    if world_size is not None and total_slots(hosts) != world_size:
        listing = ", ".join(f"{h.name}={h.slots}" for h in hosts)
        raise MarjaraError(
            f"the hostfile has {total_slots(hosts)} slots ({listing}) but the world size asked for "
            f"is {world_size}: fix the slots or the world size"
        )


def check_equal_slots(hosts: list[Host], launcher: str) -> None:
    if len({h.slots for h in hosts}) > 1:
        raise MarjaraError(f"the {launcher} launcher needs the same slots on every host")


def check_node_rank(hosts: list[Host], node_rank: int) -> None:
    if not 0 <= node_rank < len(hosts):
        raise MarjaraError(f"--node_rank {node_rank} is outside the hostfile's {len(hosts)} hosts (0..{len(hosts) - 1})")


def check_tool(launcher: str) -> None:
    tool = LAUNCHER_TOOLS[launcher]
    if shutil.which(tool) is None:
        raise MarjaraError(f"{tool} is not on PATH, needed by the {launcher} launcher: {INSTALL_HINTS[launcher]}")


def check_master_addr(master_addr: str) -> None:
    check_host_name(master_addr, "--master_addr")
    try:
        socket.getaddrinfo(master_addr, None)
    except socket.gaierror as exc:
        raise MarjaraError(f"master address {master_addr!r} does not resolve: {exc.strerror}") from None


def ssh_command(host: str, ssh_port: int | None, connect_timeout: int) -> list[str]:
    # An argument list, never a shell string: host names cannot inject anything.
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}"]
    cmd += shlex.split(os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
    if ssh_port is not None:
        cmd += ["-p", str(ssh_port)]
    return cmd + ["--", host, "true"]


def _ssh_failure(host: str, ssh_port: int | None, timeout: int) -> str | None:
    try:
        result = subprocess.run(ssh_command(host, ssh_port, timeout), capture_output=True, text=True,
                                timeout=timeout + 5, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{host}: no answer within {timeout + 5} s"
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return f"{host}: {last_line}"
    return None


def check_ssh(hosts: list[Host], ssh_port: int | None, timeout: int) -> None:
    if shutil.which("ssh") is None:
        raise MarjaraError("ssh is not on PATH: apt-get install openssh-client")
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        failures = [f for f in pool.map(lambda h: _ssh_failure(h.name, ssh_port, timeout), hosts) if f]
    if failures:
        raise MarjaraError(
            "not reachable by non-interactive ssh: " + "; ".join(failures)
            + " (set up keys, or ssh options in PDSH_SSH_ARGS_APPEND)"
        )


def run_checks(args: argparse.Namespace) -> str:
    hosts = read_hostfile(args.hostfile)
    if args.env_file is not None:
        check_env_file(args.env_file)
    check_world_size(hosts, args.world_size)
    if args.launcher == "mpich":
        check_equal_slots(hosts, args.launcher)
    if args.node_rank is not None:
        check_node_rank(hosts, args.node_rank)
    check_tool(args.launcher)
    if args.master_addr is not None:
        check_master_addr(args.master_addr)
    reach = "ssh not used"
    if args.launcher in SSH_LAUNCHERS and not args.skip_ssh:
        check_ssh(hosts, args.ssh_port, args.timeout)
        reach = "all hosts answer ssh"
    return (f"preflight ok: {len(hosts)} hosts, {total_slots(hosts)} slots, "
            f"launcher {args.launcher}, {reach}")
