"""The launch scripts' own behaviour without a real launch: help, refusals, SLURM derivation."""

import os
import shutil
import subprocess
import sys

import pytest

from launch_helpers import LAUNCH, REPO

SCRIPTS = ["single_node.sh", "pdsh.sh", "mpi.sh", "no_ssh.sh", "torchrun.sh", "slurm_node.sh", "slurm.sbatch"]


def run_script(name, *args, env=None, cwd=None, timeout=60):
    return subprocess.run([str(LAUNCH / name), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_help_and_strict_mode(name):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower() or "sbatch" in result.stdout
    text = (LAUNCH / name).read_text()
    assert "common.sh" in text or "set -euo pipefail" in text
    assert os.access(LAUNCH / name, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_common_sets_strict_mode():
    assert "set -euo pipefail" in (LAUNCH / "common.sh").read_text()


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("no_ssh.sh", ["--master_addr", "127.0.0.1"], "--node_rank is required"),
        ("no_ssh.sh", ["--node_rank"], "--node_rank needs a value"),
        ("pdsh.sh", ["--bogus"], "unknown option --bogus (train.py arguments go after --)"),
        ("mpi.sh", ["--launcher", "lam", "--master_addr", "127.0.0.1"], "--launcher must be openmpi or mpich"),
        ("torchrun.sh", ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1"],
         "--node_rank is required"),
        ("torchrun.sh", ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "h", "--rdzv_backend", "etcd"],
         "--rdzv_backend must be static or c10d"),
        ("slurm_node.sh", [], "SLURM_JOB_ID is not set"),
    ],
)
def test_bad_arguments_fail_with_one_error_line(name, args, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = run_script(name, *args, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {expected}") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("train_arg", ["$(touch /tmp/pwned)", "a;b", "`id`", 'say "hi"', "x|y", "run-%h"])
def test_pdsh_refuses_arguments_its_remote_shell_would_reinterpret(train_arg, tmp_path):
    result = run_script("pdsh.sh", "--master_addr", "127.0.0.1", "--hostfile", str(tmp_path / "h"),
                        "--", "--note", train_arg, cwd=tmp_path)
    assert result.returncode == 2
    assert "remote shell would re-interpret" in result.stderr


def test_no_ssh_runs_the_preflight_check_first(tmp_path):
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1 gpus=1\n")
    result = run_script("no_ssh.sh", "--hostfile", "hostfile", "--node_rank", "0", "--master_addr",
                        "127.0.0.1", cwd=tmp_path, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 2
    assert "line 2 ('node-b slots=1 gpus=1'): unknown key 'gpus'" in result.stderr


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: run the command once per node of the job, SLURM_NODEID set as srun sets it.
set -euo pipefail
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_DEEPSPEED = """#!/usr/bin/env bash
# deepspeed stand-in: record the arguments and the hostfile it was given.
set -euo pipefail
printf '%s\\n' "$@" > "$FAKE_LOG/node$SLURM_NODEID.args"
while [[ $# -gt 0 ]]; do
  if [[ "$1" == --hostfile ]]; then cp "$2" "$FAKE_LOG/node$SLURM_NODEID.hostfile"; fi
  shift
done
"""


def test_slurm_script_derives_hostfile_master_and_node_rank(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("deepspeed", FAKE_DEEPSPEED)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "MASTER_PORT"}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHON=sys.executable,
        DS_ACCELERATOR="cpu",  # else every `python -m marjara.*` imports torch to find out (~3 s each)
        FAKE_LOG=str(log),
        TMPDIR=str(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="2",
        # The first node must resolve (the pre-flight check does that); the others are never looked up.
        SLURM_JOB_NODELIST="localhost,gpu-[07]",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--model_size", "tiny", "--note", "two words"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    for node in (0, 1):
        assert (log / f"node{node}.hostfile").read_text() == "localhost slots=4\ngpu-07 slots=4\n"
        args = (log / f"node{node}.args").read_text().splitlines()
        assert args[args.index("--node_rank") + 1] == str(node)
        assert args[args.index("--master_addr") + 1] == "localhost"
        assert args[args.index("--master_port") + 1] == str(20000 + 4242 % 20000)
        assert "--no_ssh" in args
        assert args[-5:] == [str(REPO / "train.py"), "--model_size", "tiny", "--note", "two words"]
