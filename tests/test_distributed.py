"""MARJARA's collectives: one helper issues them all, on the accelerator's device, at every world size.

NCCL serves CUDA tensors only; gloo, which every CPU test runs on, takes any. These tests make the
difference visible on CPU (see tests/nccl_like.py for the emulation and what it cannot see)."""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import nccl_like
from marjara import distributed
from marjara.distributed import ensure_process_group

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "marjara" / "distributed.py"
COMM_MODULES = ("torch.distributed", "deepspeed.comm")
NCCL_ERROR = "No backend type associated with device type cpu"


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def collective_calls(path: Path) -> list[str]:
    """`file:line call` for every call of a torch.distributed / deepspeed.comm collective in `path`,
    however the module was imported (`import torch.distributed as dist`, `from deepspeed import
    comm`, `from torch.distributed import all_reduce`, ...)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not (dotted := _dotted(node.func)):
            continue
        head, _, rest = dotted.partition(".")
        module, _, name = (aliases.get(head, head) + (f".{rest}" if rest else "")).rpartition(".")
        if name in nccl_like.COLLECTIVES + nccl_like.OBJECT_COLLECTIVES and module.startswith(COMM_MODULES):
            found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno} {dotted}")
    return found


def test_the_scan_finds_collectives_however_they_are_imported(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "import torch\nimport torch.distributed as dist\nimport deepspeed.comm\nfrom deepspeed import comm as dscomm\n"
        "from torch.distributed import all_gather as gather_all\nfrom marjara import distributed\n"
        "dist.all_reduce(x)\ntorch.distributed.barrier()\ndeepspeed.comm.broadcast(x, 0)\n"
        "dscomm.all_to_all_single(a, b)\ngather_all(xs, x)\ndist.broadcast_object_list([1])\n"
        "distributed.all_reduce(x)\ndist.get_rank()\n")
    assert [line.split(" ")[1] for line in collective_calls(source)] == [
        "dist.all_reduce", "torch.distributed.barrier", "deepspeed.comm.broadcast", "dscomm.all_to_all_single",
        "gather_all", "dist.broadcast_object_list"]


def test_no_module_but_the_helper_issues_a_collective():
    offenders = [call for path in sorted((ROOT / "marjara").rglob("*.py")) if path != HELPER
                 for call in collective_calls(path)]
    assert not offenders, "collectives outside marjara/distributed.py:\n" + "\n".join(offenders)


@pytest.fixture(scope="module")
def world_of_one():
    ensure_process_group()
    assert dist.get_world_size() == 1
    return dist.new_group([0], backend="cuda:gloo"), dist.new_group([0], backend="cpu:gloo")


def helper_calls(group):
    """Every helper function once, with CPU inputs; returns what they return."""
    value = torch.tensor([3.0, -1.0])
    buffer = torch.tensor([7, 8])
    return {
        "all_reduce": distributed.all_reduce(value, group=group),
        "max": distributed.all_reduce(torch.tensor([5]), op="max", group=group),
        "all_gather": distributed.all_gather(value, group=group),
        "broadcast_": distributed.broadcast_(buffer, src=0, group=group),
        "object": distributed.broadcast_object({"error": None}, src=0, group=group),
        "barrier": distributed.barrier(group=group),
        "inputs": (value, buffer),
    }


def test_a_cuda_only_group_refuses_cpu_tensors_like_nccl(world_of_one):
    cuda_only, _ = world_of_one
    with pytest.raises(RuntimeError, match=NCCL_ERROR):
        dist.all_reduce(torch.ones(1), group=cuda_only)


@pytest.mark.parametrize("call", ["all_reduce", "all_gather", "broadcast_", "object", "barrier"])
def test_the_helper_communicates_at_world_size_one(world_of_one, call):
    """A helper that skipped its collective at world size 1 would return here; it reaches the
    backend, which (serving CUDA only, on this CPU accelerator) refuses."""
    cuda_only, _ = world_of_one
    value = torch.ones(2)
    calls = {"all_reduce": lambda: distributed.all_reduce(value, group=cuda_only),
             "all_gather": lambda: distributed.all_gather(value, group=cuda_only),
             "broadcast_": lambda: distributed.broadcast_(value, src=0, group=cuda_only),
             "object": lambda: distributed.broadcast_object("x", src=0, group=cuda_only),
             "barrier": lambda: distributed.barrier(group=cuda_only)}
    with pytest.raises(RuntimeError, match=NCCL_ERROR):
        calls[call]()


def test_the_helper_returns_the_collectives_results_on_the_accelerator(world_of_one):
    _, cpu_group = world_of_one
    out = helper_calls(cpu_group)
    device = distributed.accelerator_device()
    assert out["all_reduce"].tolist() == [3.0, -1.0] and out["all_reduce"].device == device
    assert out["max"].tolist() == [5]
    assert [p.tolist() for p in out["all_gather"]] == [[3.0, -1.0]] and out["all_gather"][0].device == device
    assert out["broadcast_"] is out["inputs"][1] and out["broadcast_"].tolist() == [7, 8]
    assert out["object"] == {"error": None}
    # all_reduce reduces a copy: the caller's tensor is never the one the backend writes into
    assert out["all_reduce"].data_ptr() != out["inputs"][0].data_ptr()


def test_a_one_device_type_group_receives_only_what_the_helper_placed(world_of_one, monkeypatch):
    """Under the emulation (accelerator faked) every helper call goes through with CPU inputs,
    while a collective MARJARA's code issued on a CPU tensor directly is refused."""
    nccl_like.install(monkeypatch)
    before = dict(nccl_like.served)
    out = helper_calls(None)
    assert out["all_reduce"].tolist() == [3.0, -1.0] and out["broadcast_"].tolist() == [7, 8]
    assert nccl_like.served["tensor"] - before["tensor"] == 5  # all_reduce x2, all_gather, broadcast_, barrier
    assert nccl_like.served["object"] - before["object"] == 1
    bypass = compile("dist.all_reduce(torch.ones(1))", str(HELPER.parent / "train" / "bypass.py"), "exec")
    with pytest.raises(RuntimeError, match=NCCL_ERROR):
        exec(bypass, {"dist": dist, "torch": torch})


@pytest.mark.slow
def test_a_two_rank_training_run_passes_under_the_nccl_like_group(tmp_path):
    """Stop signal, logged means, evaluation (of the weights and the EMA), checkpoints and the
    replica check: every collective MARJARA issues reaches the group only from the helper."""
    import json
    import os
    import subprocess
    import sys

    from train_helpers import QUICK, free_port

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "nccl_like_train.py"), *QUICK, "--max_steps", "4", "--batch_size", "2",
           "--eval_interval", "2", "--save_interval", "2", "--ema_decay", "0.9",
           "--deepspeed_config", "ds_configs/zero2.json", "--out_dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "weights identical on all 2 ranks" in result.stdout
    for r in (0, 1):
        served = json.loads((out / f"nccl_like_rank{r}.json").read_text())
        assert served["tensor"] >= 4 + 2  # a stop signal per step, evaluation totals, ...
