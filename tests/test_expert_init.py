"""Experts start distinct across expert-parallel ranks, identical across data-parallel replicas;
dense weights identical on every rank (2 real CPU ranks)."""

import os
import subprocess
import sys

import pytest
import torch

from train_helpers import ROOT, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / "expert_init_probe.py"), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = {(r, ep): torch.load(out / f"rank{r}_ep{ep}.pt", weights_only=True) for r in (0, 1) for ep in (1, 2)}
    loaded.update({(r, "learner"): torch.load(out / f"rank{r}_learner.pt", weights_only=True) for r in (0, 1)})
    return loaded


def experts_of(state, layer=1):
    prefix = f"blocks.{layer}.ffn.moe.deepspeed_moe.experts.deepspeed_experts."
    return {int(n[len(prefix):].split(".")[0]): v for n, v in state.items()
            if n.startswith(prefix) and n.endswith("w_gate_up.weight")}


def test_experts_differ_across_expert_parallel_ranks(weights):
    rank0, rank1 = experts_of(weights[0, 2]), experts_of(weights[1, 2])
    assert sorted(rank0) == [0, 1] and sorted(rank1) == [2, 3]
    every = {**rank0, **rank1}
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(every[a], every[b]), (a, b)
    # local expert i of each ep rank (global i and i + 2) came from the same draw before
    assert not torch.equal(rank0[0], rank1[2]) and not torch.equal(rank0[1], rank1[3])


def test_replicas_of_an_expert_and_dense_weights_are_identical(weights):
    # ep_size 1 on 2 ranks: every expert is replicated on both
    assert weights[0, 1].keys() == weights[1, 1].keys()
    for name in weights[0, 1]:
        assert torch.equal(weights[0, 1][name], weights[1, 1][name]), name
    dense = [n for n in weights[0, 2] if "deepspeed_experts" not in n]
    assert dense and all(torch.equal(weights[0, 2][n], weights[1, 2][n]) for n in dense)


def test_a_global_expert_starts_the_same_whatever_ep_size(weights):
    ep2 = {**weights[0, 2], **weights[1, 2]}
    for name, value in weights[0, 1].items():
        if "deepspeed_experts" in name:
            assert torch.equal(ep2[name], value), name


def test_the_trainer_starts_with_distinct_experts_and_identical_dense_weights(weights):
    rank0, rank1 = experts_of(weights[0, "learner"]), experts_of(weights[1, "learner"])
    assert sorted(rank0) == [0, 1] and sorted(rank1) == [2, 3]
    assert not torch.equal(rank0[0], rank1[2]) and not torch.equal(rank0[1], rank1[3])
    dense = [n for n in weights[0, "learner"] if "deepspeed_experts" not in n]
    assert dense and all(torch.equal(weights[0, "learner"][n], weights[1, "learner"][n]) for n in dense)
