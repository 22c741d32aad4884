"""Machinery shared by the launch tests: ports, environments, bounded process groups, a loopback sshd.

Every process a test starts carries MARJARA_LAUNCH_TEST=<marker> in its environment (remote ranks
get it through .deepspeed_env), so teardown can find and kill exactly those processes by PID,
including ranks that pdsh or mpirun started through sshd, outside the test's process groups.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
PROBE = REPO / "tests" / "launch_probe.py"
MARKER_VAR = "MARJARA_LAUNCH_TEST"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_marker() -> str:
    return uuid.uuid4().hex


def extensions_dir() -> Path:
    """The directory torch builds DeepSpeed's ops in, spelled out so launches can pin it.

    Unset, torch uses <cache>/torch_extensions/py<ver>_<accelerator>; set, $TORCH_EXTENSIONS_DIR
    directly. Pinning it to anything else would rebuild the ops (over a minute here).
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def warm_shm_op(marker: str, log_dir: Path, timeout: float = 400) -> None:
    """Build DeepSpeed's shm comm op once (a one-rank probe) unless it is already built.

    A `lock` without a built library and with no build running is what a killed build leaves:
    every later launch would wait on it forever, so say so instead.
    """
    op_dir = extensions_dir() / "deepspeed_shm_comm"
    if (op_dir / "deepspeed_shm_comm.so").exists():
        return
    if (op_dir / "lock").exists() and not _build_running(op_dir):
        raise AssertionError(f"stale {op_dir / 'lock'} from a killed build blocks every launch: remove it")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = launch_env(marker, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()), PROBE_OUT_DIR=str(log_dir))
    [result] = run_together([[sys.executable, str(PROBE)]], [env], log_dir, log_dir, timeout)
    assert result.returncode == 0, describe([result])


def _build_running(op_dir: Path) -> bool:
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if b"deepspeed_shm_comm" in Path(cmdline).read_bytes():
                return True
        except OSError:
            continue
    return False


def launch_env(marker: str, **extra: str) -> dict[str, str]:
    env = os.environ.copy()
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PROBE_FAIL_RANK",
                "DS_ENV_FILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        env.pop(var, None)
    env.update(
        {
            MARKER_VAR: marker,
            "DS_ACCELERATOR": "cpu",
            "TRAIN_SCRIPT": str(PROBE),
            "TORCH_EXTENSIONS_DIR": str(extensions_dir()),
            # A rank whose peer never shows up gives up after a minute, not DeepSpeed's ten.
            "DEEPSPEED_TIMEOUT": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def write_deepspeed_env(directory: Path, env: dict[str, str], names: list[str]) -> None:
    """The .deepspeed_env a user would write to hand variables to the ranks on other nodes."""
    (directory / ".deepspeed_env").write_text("".join(f"{n}={env[n]}\n" for n in names))


@dataclass
class Finished:
    command: list[str]
    returncode: int
    output: str


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries this test's marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    for environ in glob.glob("/proc/[0-9]*/environ"):
        pid = int(environ.split("/")[2])
        if pid == os.getpid():
            continue
        try:
            if needle in Path(environ).read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def run_together(commands: list[list[str]], envs: list[dict[str, str]], cwd: Path, log_dir: Path,
                 timeout: float) -> list[Finished]:
    """Start the commands at once, each in its own process group; wait at most `timeout` s.

    On timeout every group is killed and the test fails with the logs. Whatever happens, no
    process started here (or by these, carrying the marker) outlives the call.
    """
    procs, logs = [], []
    try:
        for i, (cmd, env) in enumerate(zip(commands, envs)):
            log = open(log_dir / f"launcher{i}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        timed_out = any(p.poll() is None for p in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for env in envs:
            kill_marked(env[MARKER_VAR])
    results = []
    for cmd, proc, log in zip(commands, procs, logs):
        log.seek(0)
        results.append(Finished(cmd, proc.returncode, log.read()))
        log.close()
    if timed_out:
        raise AssertionError(f"launch did not finish within {timeout} s:\n" + describe(results))
    return results


def describe(results: list[Finished], tail: int = 3000) -> str:
    return "\n".join(f"$ {' '.join(r.command)}\n(exit {r.returncode})\n{r.output[-tail:]}" for r in results)


def read_reports(out_dir: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))}


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_*_{port}_*"):
        Path(path).unlink(missing_ok=True)


def missing_tools(*tools: str) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]


@dataclass
class LoopbackSshd:
    port: int
    ssh_args: str  # for PDSH_SSH_ARGS_APPEND: this throw-away key, no host key checks


@contextmanager
def loopback_sshd(workdir: Path, addresses: tuple[str, ...] = ("127.0.0.1", "127.0.0.2")):
    """A private sshd on a free port of the given loopback addresses, accepting one fresh key."""
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, client_key = workdir / "host_key", workdir / "client_key"
    for key in (host_key, client_key):
        for path in (key, key.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True,
                       stdin=subprocess.DEVNULL)
    (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text("".join(f"ListenAddress {addr}:{port}\n" for addr in addresses) + f"""\
HostKey {host_key}
AuthorizedKeysFile {workdir / 'authorized_keys'}
PidFile {workdir / 'sshd.pid'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    log = open(workdir / "sshd.log", "w")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_listening(addresses, port, proc, workdir / "sshd.log")
        ssh_args = (f"-F /dev/null -i {client_key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                    "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
        yield LoopbackSshd(port, ssh_args)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _wait_listening(addresses, port, proc, log_path, timeout=10.0):
    deadline = time.monotonic() + timeout
    pending = list(addresses)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log_path.read_text()}")
        try:
            socket.create_connection((pending[0], port), timeout=1).close()
            pending.pop(0)
        except OSError:
            time.sleep(0.1)
    if pending:
        raise RuntimeError(f"sshd not listening on {pending} port {port}: {log_path.read_text()}")
