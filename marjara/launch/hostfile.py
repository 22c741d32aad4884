"""DeepSpeed hostfiles (`host slots=N`): strict parsing, and derivation from a SLURM allocation.

DeepSpeed's own parser accepts `node1 slots=4x` as 4 slots and ignores unknown keys; here every
line either means exactly one host with a positive slot count or is an error naming that line.
Host names are restricted to characters that are safe in pdsh/mpirun host lists and can never be
read as a command-line option.

CLI (used by launch/slurm_node.sh):
    python -m marjara.launch.hostfile --from-slurm --out HOSTFILE [--slots N]
writes the hostfile of the current SLURM job and prints its first host (the master).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from marjara.errors import MarjaraError, cli_entry

_HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_KNOWN_KEYS = ("slots",)


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int  # 1-based line number in the hostfile, for error messages


def check_host_name(name: str, where: str) -> None:
    if not _HOST_RE.match(name):
        raise MarjaraError(
            f"{where}: bad host name {name!r} (letters, digits, '.', '-', '_' only, "
            "not starting with '-' or '.')"
        )


def _parse_line(text: str, number: int, source: str) -> Host | None:
    content = text.split("#", 1)[0].strip()
    if not content:
        return None
    where = f"{source} line {number} ({text.strip()!r})"
    name, *fields = content.split()
    check_host_name(name, where)
    slots = None
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep:
            raise MarjaraError(f"{where}: expected key=value after the host name, got {field!r}")
        if key not in _KNOWN_KEYS:
            raise MarjaraError(f"{where}: unknown key {key!r} (a line is `host slots=N`)")
        if slots is not None:
            raise MarjaraError(f"{where}: slots given twice")
        # str.isdigit() also accepts superscripts and other digits int() cannot read ('²').
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise MarjaraError(f"{where}: slots must be a positive integer, got {value!r}")
        slots = int(value)
    if slots is None:
        raise MarjaraError(f"{where}: missing slots=N (the number of GPUs on {name})")
    return Host(name, slots, number)


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    hosts: list[Host] = []
    seen: dict[str, Host] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        host = _parse_line(line, number, source)
        if host is None:
            continue
        if host.name in seen:
            raise MarjaraError(
                f"{source} line {number}: host {host.name!r} already listed on line "
                f"{seen[host.name].line} (give each host once, with all its slots)"
            )
        seen[host.name] = host
        hosts.append(host)
    if not hosts:
        raise MarjaraError(f"{source} lists no hosts (expected lines like `worker-1 slots=8`)")
    return hosts


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MarjaraError(f"hostfile {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MarjaraError(f"cannot read hostfile {path}: {exc}") from None
    return parse_hostfile(text, source=str(path))


def format_hostfile(hosts: list[tuple[str, int]]) -> str:
    return "".join(f"{name} slots={slots}\n" for name, slots in hosts)


def total_slots(hosts: list[Host]) -> int:
    return sum(host.slots for host in hosts)


# --- SLURM -----------------------------------------------------------------------------------

def _split_top_level(nodelist: str) -> list[str]:
    """Split `a[1-2,4],b` at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise MarjaraError(f"bad SLURM node list {nodelist!r}: unbalanced brackets")
    if depth:
        raise MarjaraError(f"bad SLURM node list {nodelist!r}: unbalanced brackets")
    parts.append(nodelist[start:])
    return [part for part in parts if part]


def _expand_range_list(body: str, nodelist: str) -> list[str]:
    values = []
    for item in body.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and (not high.isdigit() or int(high) < int(low))):
            raise MarjaraError(f"bad SLURM node list {nodelist!r}: bad range {item!r}")
        if not sep:
            values.append(low)
            continue
        width = len(low)  # zero padding of the lower bound, as SLURM does: 01-10
        values += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return values


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list (`gpu[01-03,07],login1`), like `scontrol show hostnames`."""
    names = []
    for part in _split_top_level(nodelist.strip()):
        pieces = re.split(r"\[([^\]]*)\]", part)  # literal, range, literal, range, ..., literal
        choices = [
            _expand_range_list(piece, nodelist) if i % 2 else [piece]
            for i, piece in enumerate(pieces)
        ]
        names += ["".join(combo) for combo in itertools.product(*choices)]
    return names


def _slots_from_slurm(env: dict[str, str]) -> int | None:
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(var, "").rsplit(":", 1)[-1]  # SLURM_GPUS_PER_NODE may be "a100:4"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def hostfile_from_slurm(env: dict[str, str], slots: int | None = None) -> list[tuple[str, int]]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise MarjaraError("SLURM_JOB_NODELIST is not set: run this inside a SLURM job (sbatch/srun)")
    slots = slots or _slots_from_slurm(env)
    if not slots:
        raise MarjaraError(
            "cannot tell the GPUs per node: request them with --gpus-per-node or pass --slots N"
        )
    names = expand_slurm_nodelist(nodelist)
    for name in names:
        check_host_name(name, "SLURM_JOB_NODELIST")
    return [(name, slots) for name in names]


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marjara.launch.hostfile", description=__doc__.split("\n")[0])
    parser.add_argument("--from-slurm", action="store_true", required=True,
                        help="derive the hostfile from SLURM_JOB_NODELIST")
    parser.add_argument("--out", required=True, help="hostfile to write")
    parser.add_argument("--slots", type=int, default=None,
                        help="slots per node (default: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE)")
    args = parser.parse_args(argv)
    if args.slots is not None and args.slots < 1:
        raise MarjaraError(f"--slots must be >= 1 (got {args.slots}); or leave it out to take SLURM's GPUs per node")
    hosts = hostfile_from_slurm(dict(os.environ), args.slots)
    try:
        Path(args.out).write_text(format_hostfile(hosts))
    except OSError as exc:
        raise MarjaraError(f"cannot write --out {args.out}: {exc.strerror}") from None
    print(hosts[0][0])
    return 0


if __name__ == "__main__":
    main()
