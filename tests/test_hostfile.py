"""Hostfile parsing, SLURM node-list expansion and the pre-flight checks (no launches)."""

import argparse
import shutil

import pytest

from marjara import preflight as preflight_cli
from marjara.launch import hostfile, preflight
from marjara.errors import MarjaraError
from marjara.launch.hostfile import Host, expand_slurm_nodelist, hostfile_from_slurm, parse_hostfile
from launch_helpers import free_port


def test_parses_hosts_comments_and_blank_lines():
    text = "# cluster\n\nworker-1 slots=8\n  worker-2   slots=4   # older node\nn_3.lab slots=1\n"
    assert parse_hostfile(text) == [
        Host("worker-1", 8, 3), Host("worker-2", 4, 4), Host("n_3.lab", 1, 5),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a slots=1\nb slots=2 gpus=2\n", r"line 2 .*unknown key 'gpus'"),
        ("a slots=1\nb\n", r"line 2 .*missing slots=N"),
        ("a slots=4x\n", r"line 1 .*slots must be a positive integer, got '4x'"),
        ("a slots=0\n", r"line 1 .*positive integer"),
        ("a slots=1 slots=2\n", r"line 1 .*slots given twice"),
        ("a 8\n", r"line 1 .*expected key=value"),
        ("a slots=1\n\nb slots=1\na slots=2\n", r"line 4: host 'a' already listed on line 1"),
        ("", r"lists no hosts"),
        ("# only a comment\n\n", r"lists no hosts"),
        ("-oProxyCommand=touch slots=1\n", r"line 1 .*bad host name '-oProxyCommand=touch'"),
        ("a;reboot slots=1\n", r"bad host name 'a;reboot'"),
        ("a,b slots=1\n", r"bad host name 'a,b'"),
        ("$(id) slots=1\n", r"bad host name"),
    ],
)
def test_bad_hostfiles_name_the_line(text, expected):
    with pytest.raises(MarjaraError, match=expected):
        parse_hostfile(text)


def test_missing_hostfile(tmp_path):
    with pytest.raises(MarjaraError, match="does not exist"):
        hostfile.read_hostfile(tmp_path / "nope")


@pytest.mark.parametrize(
    ("nodelist", "names"),
    [
        ("node7", ["node7"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("rack[1-2]-n[8-9]", ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
        ("x[098-100].lab,y", ["x098.lab", "x099.lab", "x100.lab", "y"]),
    ],
)
def test_expands_slurm_nodelists(nodelist, names):
    assert expand_slurm_nodelist(nodelist) == names


@pytest.mark.parametrize("nodelist", ["gpu[01-03", "gpu]1[", "gpu[a-b]", "gpu[1-]"])
def test_bad_slurm_nodelists(nodelist):
    with pytest.raises(MarjaraError, match="bad SLURM node list"):
        expand_slurm_nodelist(nodelist)


def test_hostfile_from_slurm_environment():
    env = {"SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_GPUS_ON_NODE": "4"}
    assert hostfile_from_slurm(env) == [("gpu1", 4), ("gpu2", 4)]
    assert hostfile_from_slurm({"SLURM_NODELIST": "g1", "SLURM_GPUS_PER_NODE": "a100:8"}) == [("g1", 8)]
    assert hostfile_from_slurm({"SLURM_JOB_NODELIST": "g1"}, slots=2) == [("g1", 2)]
    with pytest.raises(MarjaraError, match="GPUs per node"):
        hostfile_from_slurm({"SLURM_JOB_NODELIST": "g1"})
    with pytest.raises(MarjaraError, match="inside a SLURM job"):
        hostfile_from_slurm({})


def test_hostfile_cli_writes_slurm_hostfile_and_prints_master(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "cn[08-09]")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    assert hostfile.main(["--from-slurm", "--out", str(tmp_path / "h")]) == 0
    assert capsys.readouterr().out == "cn08\n"
    assert (tmp_path / "h").read_text() == "cn08 slots=2\ncn09 slots=2\n"
    assert parse_hostfile((tmp_path / "h").read_text()) == [Host("cn08", 2, 1), Host("cn09", 2, 2)]


def _hosts(*slots):
    return [Host(f"h{i}", s, i + 1) for i, s in enumerate(slots)]


def test_world_size_must_match_slots():
    preflight.check_world_size(_hosts(2, 2), 4)
    preflight.check_world_size(_hosts(2, 2), None)
    with pytest.raises(MarjaraError, match=r"4 slots \(h0=2, h1=2\) but the world size asked for is 8"):
        preflight.check_world_size(_hosts(2, 2), 8)


def test_mpich_needs_equal_slots_and_node_rank_in_range():
    preflight.check_equal_slots(_hosts(2, 2), "mpich")
    with pytest.raises(MarjaraError, match="same slots on every host"):
        preflight.check_equal_slots(_hosts(2, 1), "mpich")
    preflight.check_node_rank(_hosts(1, 1), 1)
    with pytest.raises(MarjaraError, match="outside the hostfile's 2 hosts"):
        preflight.check_node_rank(_hosts(1, 1), 2)


def test_env_file_lines_must_be_safe_for_the_remote_shell(tmp_path):
    good = tmp_path / "good"
    good.write_text("PATH=/opt/venv/bin:/usr/bin\nNCCL_SOCKET_IFNAME=eth0\nNOTE=two words\n")
    preflight.check_env_file(str(good))
    for line, expected in [
        ("# comment", "expected KEY=VALUE"),
        ("", "expected KEY=VALUE"),
        ("1BAD=x", "expected KEY=VALUE"),
        ("X=$(reboot)", "remote shell would expand"),
        ('X=a"b', "remote shell would expand"),
        ("X=`id`", "remote shell would expand"),
    ]:
        bad = tmp_path / "bad"
        bad.write_text(f"A=1\n{line}\n")
        with pytest.raises(MarjaraError, match=rf"line 2 .*{expected}"):
            preflight.check_env_file(str(bad))


def test_ssh_command_is_an_argument_list_with_the_host_after_double_dash(monkeypatch):
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", "-i /k/id -o StrictHostKeyChecking=no")
    cmd = preflight.ssh_command("worker-1", 2222, 5)
    assert cmd[-3:] == ["--", "worker-1", "true"]
    assert cmd[:5] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    assert ["-i", "/k/id"] == cmd[5:7] and ["-p", "2222"] == cmd[-5:-3]


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the ssh client (apt-get install openssh-client)")
def test_ssh_check_names_the_unreachable_host(monkeypatch):
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", "-F /dev/null -o StrictHostKeyChecking=no")
    closed_port = free_port()  # nothing listens there
    with pytest.raises(MarjaraError, match=r"not reachable by non-interactive ssh: 127\.0\.0\.1: .*refused"):
        preflight.check_ssh([Host("127.0.0.1", 1, 1)], closed_port, timeout=5)


def _args(**overrides):
    base = dict(hostfile=None, launcher="no_ssh", world_size=None, node_rank=None, master_addr=None,
                ssh_port=None, timeout=5, skip_ssh=False, env_file=None)
    return argparse.Namespace(**{**base, **overrides})


def test_run_checks_reports_a_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "check_tool", lambda launcher: None)
    hostfile_path = tmp_path / "hostfile"
    hostfile_path.write_text("a slots=2\nb slots=2\n")
    summary = preflight.run_checks(_args(hostfile=hostfile_path, world_size=4, node_rank=1,
                                         master_addr="127.0.0.1"))
    assert summary == "preflight ok: 2 hosts, 4 slots, launcher no_ssh, ssh not used"
    with pytest.raises(MarjaraError, match="world size asked for is 3"):
        preflight.run_checks(_args(hostfile=hostfile_path, world_size=3))
    with pytest.raises(MarjaraError, match="bad host name"):
        preflight.run_checks(_args(hostfile=hostfile_path, master_addr="-oProxyCommand=x"))


def test_missing_launcher_tool_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MarjaraError, match="pdsh is not on PATH.*apt-get install pdsh"):
        preflight.check_tool("pdsh")


def test_cli_prints_error_line_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "hostfile"
    bad.write_text("a slots=1\nb slot=1\n")
    with pytest.raises(SystemExit) as exit_info:
        preflight_cli.main(["--hostfile", str(bad), "--launcher", "no_ssh"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2 ('b slot=1'): unknown key 'slot'" in err
    assert err.count("\n") == 1
