"""Real launches through the launch/ scripts on this one machine, two simulated nodes each.

Nodes are told apart by loopback addresses (127.0.0.1, 127.0.0.2) or by --node_rank alone; no
traffic leaves loopback. Every launch is bounded by a timeout and its processes are killed by PID
on the way out (see launch_helpers). The probe (tests/launch_probe.py) joins the process group the
way train.py does and reports what each rank saw.
"""

import glob
import importlib.util
import re
import subprocess
import sys

import pytest

from launch_helpers import (LAUNCH, MARKER_VAR, PROBE, REPO, describe, launch_env, loopback_sshd, missing_tools, new_marker,
                            free_port, read_reports, remove_shm_buffers, run_together, warm_shm_op,
                            write_deepspeed_env)

pytestmark = pytest.mark.slow

TWO_HOSTS = "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
TRAIN_ARGS = ["--note", "two words", "--seed", "7"]


@pytest.fixture(scope="module", autouse=True)
def shm_op_built(tmp_path_factory):
    warm_shm_op(new_marker(), tmp_path_factory.mktemp("warm"))


@pytest.fixture
def port():
    port = free_port()
    yield port
    remove_shm_buffers(port)


@pytest.fixture
def job(tmp_path):
    """A working directory with a hostfile, an output folder for reports and a marked environment."""
    (tmp_path / "hostfile").write_text(TWO_HOSTS)
    (tmp_path / "out").mkdir()
    return tmp_path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    missing = missing_tools("sshd", "ssh", "ssh-keygen", "pdsh")
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: apt-get install pdsh openssh-server openssh-client")
    with loopback_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def assert_two_ranks(reports, node_ranks=("0", "1")):
    assert sorted(reports) == [0, 1], reports
    for rank, report in reports.items():
        assert report["world_size"] == 2
        assert report["all_reduce"] == 3.0  # 1 + 2: both ranks took part
        assert report["node_rank"] == (node_ranks[rank] if node_ranks else None)
        assert report["args"][-len(TRAIN_ARGS):] == TRAIN_ARGS  # words with spaces arrive intact


def no_ssh_command(node_rank, port):
    return [str(LAUNCH / "no_ssh.sh"), "--hostfile", "hostfile", "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "--", *TRAIN_ARGS]


def test_no_ssh_two_nodes_train(job, port):
    """The trainer itself across two simulated nodes: world size 2, node ranks 0 and 1, identical weights."""
    env = launch_env(new_marker(), TRAIN_SCRIPT=str(REPO / "train.py"))
    train_args = ["--deepspeed_config", str(REPO / "ds_configs" / "zero1.json"), "--model_size", "tiny",
                  "--max_steps", "4", "--batch_size", "2", "--seq_len", "32", "--out_dir", str(job / "ckpt"),
                  "--eval_interval", "0", "--save_interval", "0", "--log_interval", "1", "--seed", "3",
                  "--sample_tokens", "0", "--peak_tflops", "1"]
    commands = [no_ssh_command(node, port)[:-len(TRAIN_ARGS)] + train_args for node in (0, 1)]
    results = run_together(commands, [env, env], job, job, 200)
    assert [r.returncode for r in results] == [0, 0], describe(results)
    for node, result in enumerate(results):
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in result.output
    assert re.search(r"^world_size=2 ", results[0].output, re.MULTILINE)
    assert "weights identical on all 2 ranks" in results[0].output
    assert "weights identical" not in results[1].output  # only rank 0 prints


def test_no_ssh_failing_rank_stops_both_launchers(job, port):
    env = launch_env(new_marker(), PROBE_OUT_DIR=str(job / "out"), PROBE_FAIL_RANK="1")
    results = run_together([no_ssh_command(0, port), no_ssh_command(1, port)], [env, env], job, job, 150)
    assert all(r.returncode not in (0, None) for r in results), describe(results)
    assert "rank 1 fails on purpose" in results[1].output
    assert not list((job / "out").glob("rank*.json"))


def test_torchrun_two_nodes(job, port):
    env = launch_env(new_marker(), PROBE_OUT_DIR=str(job / "out"))
    commands = [[str(LAUNCH / "torchrun.sh"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                 "--master_addr", "127.0.0.1", "--master_port", str(port), "--", *TRAIN_ARGS] for node in (0, 1)]
    results = run_together(commands, [env, env], job, job, 150)
    assert [r.returncode for r in results] == [0, 0], describe(results)
    assert_two_ranks(read_reports(job / "out"))


def test_single_node_two_ranks(job, port):
    env = launch_env(new_marker(), PROBE_OUT_DIR=str(job / "out"))
    command = [str(LAUNCH / "single_node.sh"), "--gpus", "2", "--master_port", str(port), "--", *TRAIN_ARGS]
    [result] = run_together([command], [env], job, job, 150)
    assert result.returncode == 0, describe([result])
    reports = read_reports(job / "out")
    assert_two_ranks(reports, node_ranks=("0", "0"))
    assert {r["local_rank"] for r in reports.values()} == {"0", "1"}
    # DeepSpeed leaves one 66 MiB buffer per rank; train.py removes those its run created.
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []


def ssh_env(job, sshd):
    """What a user sets up: ssh options for pdsh, and .deepspeed_env for what remote ranks need."""
    env = launch_env(new_marker(), PROBE_OUT_DIR=str(job / "out"), PDSH_SSH_ARGS_APPEND=sshd.ssh_args)
    write_deepspeed_env(job, env, ["PROBE_OUT_DIR", MARKER_VAR])
    # DeepSpeed's own reader would fail on these; launch/common.sh drops them.
    dotfile = job / ".deepspeed_env"
    dotfile.write_text("# for the ranks on other nodes\n\n" + dotfile.read_text())
    return env


def assert_second_node_came_through_ssh(reports, env):
    assert reports[1]["ssh_server"] == "127.0.0.2"
    for report in reports.values():  # handed on by launch/common.sh's job env file
        assert report["torch_extensions_dir"] == env["TORCH_EXTENSIONS_DIR"]
        assert report["path"] == env["PATH"]


def test_pdsh_two_hosts_through_sshd(job, port, sshd):
    env = ssh_env(job, sshd)
    command = [str(LAUNCH / "pdsh.sh"), "--hostfile", "hostfile", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--ssh_port", str(sshd.port), "--world_size", "2", "--", *TRAIN_ARGS]
    [result] = run_together([command], [env], job, job, 150)
    assert result.returncode == 0, describe([result])
    assert "preflight ok: 2 hosts, 2 slots, launcher pdsh, all hosts answer ssh" in result.output
    reports = read_reports(job / "out")
    assert_two_ranks(reports)
    assert_second_node_came_through_ssh(reports, env)


def test_preflight_names_a_host_without_ssh(job, port, sshd):
    (job / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.3 slots=1\n")  # sshd is not on .3
    env = ssh_env(job, sshd)
    command = [str(LAUNCH / "pdsh.sh"), "--hostfile", "hostfile", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--ssh_port", str(sshd.port), "--", *TRAIN_ARGS]
    [result] = run_together([command], [env], job, job, 60)
    assert result.returncode == 2
    assert "error: not reachable by non-interactive ssh: 127.0.0.3: " in result.output
    assert "127.0.0.1:" not in result.output.split("not reachable")[1]


@pytest.mark.skipif(bool(missing_tools("mpirun", "ompi_info")), reason="needs Open MPI: apt-get install openmpi-bin")
def test_openmpi_two_hosts_through_sshd(job, port, sshd):
    env = ssh_env(job, sshd)
    # Root needs --allow-run-as-root; Open MPI's own traffic stays on loopback.
    mpi_args = "--allow-run-as-root --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo"
    command = [str(LAUNCH / "mpi.sh"), "--launcher", "openmpi", "--hostfile", "hostfile",
               "--master_addr", "127.0.0.1", "--master_port", str(port), "--ssh_port", str(sshd.port),
               "--world_size", "2", "--launcher_args", mpi_args, "--", *TRAIN_ARGS]
    [result] = run_together([command], [env], job, job, 150)
    assert result.returncode == 0, describe([result])
    reports = read_reports(job / "out")
    assert_two_ranks(reports, node_ranks=None)
    # Open MPI saw two nodes: each rank is local rank 0 on its own "host".
    assert {r["local_rank"] for r in reports.values()} == {"0"}
    assert_second_node_came_through_ssh(reports, env)



NAMESPACE_MPIRUN = """set -euo pipefail
ip link set lo up
ip link add marjara0 type veth peer name marjara1
ip addr add 10.203.0.1/24 dev marjara0
ip link set marjara0 up
ip link set marjara1 up
exec mpirun --allow-run-as-root -n 2 --bind-to none "$PYTHON" "$PROBE" "$@"
"""


def _can_unshare_network() -> bool:
    if missing_tools("unshare", "ip"):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(bool(missing_tools("mpirun")), reason="needs an MPI: apt-get install openmpi-bin")
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py: pip install -e '.[mpi]'")
@pytest.mark.skipif(not _can_unshare_network(), reason="needs unshare --net (root or CAP_SYS_ADMIN) and iproute2")
def test_bare_mpirun_uses_deepspeed_mpi_discovery(job):
    """`mpirun python train.py` with no launcher variables: mpi4py discovery fills them in.

    Discovery takes the master address from `hostname -I`, so it runs in a private network
    namespace whose only non-loopback address is a veth the test creates: nothing leaves it.
    """
    env = launch_env(new_marker(), PROBE_OUT_DIR=str(job / "out"), PYTHON=sys.executable, PROBE=str(PROBE))
    command = ["unshare", "--net", "bash", "-c", NAMESPACE_MPIRUN, "namespace-mpirun", *TRAIN_ARGS]
    [result] = run_together([command], [env], job, job, 150)
    assert result.returncode == 0, describe([result])
    reports = read_reports(job / "out")
    assert_two_ranks(reports, node_ranks=None)
    assert {r["master_addr"] for r in reports.values()} == {"10.203.0.1"}
    assert sorted(r["local_rank"] for r in reports.values()) == ["0", "1"]
