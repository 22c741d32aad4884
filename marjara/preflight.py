"""Pre-flight check before a multi-node launch: catch in seconds what would otherwise hang a job.

    python -m marjara.preflight --hostfile launch/hostfile --launcher pdsh --world_size 16

Checks the hostfile's syntax (the error names the bad line), that the slots add up to the
requested world size, that the launcher's tools are installed, that the master address resolves,
that a .deepspeed_env file is one safe KEY=VALUE per line (DeepSpeed pastes each value into the
remote shell command), and, for launchers that reach the other nodes over ssh, that every host
answers a non-interactive ssh within a timeout. ssh options come from PDSH_SSH_ARGS_APPEND, as for
DeepSpeed's pdsh launcher.
"""

from __future__ import annotations

import argparse

from marjara.errors import cli_entry
from marjara.launch.preflight import LAUNCHER_TOOLS, run_checks


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m marjara.preflight",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--hostfile", required=True)
    parser.add_argument("--launcher", choices=sorted(LAUNCHER_TOOLS), default="pdsh")
    parser.add_argument("--world_size", type=int, default=None,
                        help="total ranks the job expects; must equal the hostfile's slots")
    parser.add_argument("--node_rank", type=int, default=None, help="this node's rank (no_ssh)")
    parser.add_argument("--master_addr", default=None)
    parser.add_argument("--ssh_port", type=int, default=None)
    parser.add_argument("--env_file", default=None, help="a .deepspeed_env file to check")
    parser.add_argument("--timeout", type=int, default=10, help="seconds for each host's ssh check")
    parser.add_argument("--skip_ssh", action="store_true", help="do not try ssh to every host")
    args = parser.parse_args(argv)
    print(run_checks(args), flush=True)
    return 0


if __name__ == "__main__":
    main()
