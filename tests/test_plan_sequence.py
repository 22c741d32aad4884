"""The planner under Ulysses sequence parallelism (--sp_size): activation memory per rank, the
attention all-to-all's bytes and time, the recommendation's choice of sp, and its bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from marjara.model.config import ModelConfig
from marjara.planner.activations import activations
from marjara.planner.comm import Traffic, add_sequence_traffic
from marjara.planner.devices import lookup
from marjara.planner.sequence import all_to_all_bytes_per_layer
from marjara.planner.setup import Setup, zero_settings
from test_plan_cli import assert_refused_in_one_line, plan

MILLION = 1_048_576


def setup_of(config: ModelConfig, seq_len: int, checkpointing: bool, sp_size: int = 1, gpus: int = 8,
             precision: str = "bf16") -> Setup:
    return Setup(config, seq_len, precision, 0, False, False, checkpointing, 1, gpus, lookup("H200"),
                 zero_settings({}), sp_size)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_memory_per_rank_falls_as_one_over_sp(checkpointing):
    base = setup_of(ModelConfig.from_preset("1b"), MILLION, checkpointing)
    single = activations(base, 1).peak
    for n in (2, 4, 8):
        per_rank = activations(replace(base, sp_size=n), 1).peak
        # 1/N of the tokens; Ulysses' own copies (SDPA's output, the exchanged v, replicated k) add a little.
        assert 1.0 < per_rank * n / single < 1.10, n


def test_offloaded_activations_leave_the_checkpointed_inputs_on_the_host():
    config = ModelConfig.from_preset("1b")
    kept = activations(setup_of(config, MILLION, True, sp_size=2), 1)
    offloaded = activations(replace(setup_of(config, MILLION, True, sp_size=2), offload_activations=True), 1)
    inputs = config.n_layers * (MILLION // 2) * 2 * config.d_model  # bf16 block inputs of the local tokens
    assert offloaded.host == inputs
    assert kept.peak - offloaded.peak == pytest.approx(inputs)


def test_all_to_all_traffic_of_a_hand_worked_case():
    # d_model 64, 4 heads of 16, 2 kv heads, 2 layers; seq_len 8 in bf16 over sp 2: 4 local tokens.
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=8)
    sp2 = setup_of(config, 8, False, sp_size=2, gpus=2)
    # q and out 4 heads, k and v 2 heads: (4 + 4 + 2 + 2) x 16 x 2 bytes x 4 tokens, half of it sent.
    assert all_to_all_bytes_per_layer(sp2, 1) == 768
    traffic = Traffic()
    add_sequence_traffic(sp2, 1, 3, traffic)  # 2 layers x (forward + backward) x 3 micro-batches
    assert traffic.sequence_all_to_all == 768 * 2 * 2 * 3
    assert traffic.sequence_seconds == pytest.approx(9216 / 360e9)  # H200's intra-node bandwidth
    checkpointed = Traffic()
    add_sequence_traffic(replace(sp2, grad_checkpointing=True), 1, 3, checkpointed)  # + the recomputed forward
    assert checkpointed.sequence_all_to_all == 768 * 2 * 3 * 3
    # sp 4: the 2 kv heads are replicated to 4; 2 local tokens, three quarters sent.
    sp4 = setup_of(config, 8, False, sp_size=4, gpus=4)
    assert all_to_all_bytes_per_layer(sp4, 1) == 0.75 * 2 * (4 + 4 + 4 + 4) * 16 * 2
    across = Traffic()
    add_sequence_traffic(replace(sp4, nodes=2, gpus_per_node=2), 1, 1, across)  # a group spanning 2 nodes
    assert across.sequence_seconds == pytest.approx(768 * 2 * 2 / 45e9)


def test_recommendation_splits_a_million_tokens_and_not_a_short_context():
    cluster = ["--model_size", "1b", "--nodes", "1", "--gpus_per_node", "8", "--gpu", "H200", "--json"]
    long = plan(*cluster, "--seq_len", str(MILLION))
    assert long.returncode == 0, long.stderr
    result = json.loads(long.stdout)
    assert all(not c["fits"] for c in result["candidates"])  # the table is the one at sp 1
    chosen = result["recommendation"]
    assert chosen["sp_size"] > 1 and chosen["fits"] and 8 % chosen["sp_size"] == 0
    assert chosen["traffic_bytes"]["sequence_all_to_all"] > 0
    short = plan(*cluster, "--seq_len", "4096")
    assert short.returncode == 0, short.stderr
    assert json.loads(short.stdout)["recommendation"]["sp_size"] == 1


def test_a_batch_of_fewer_samples_than_gpus_is_spread_by_sequence_parallelism():
    out = plan("--model_size", "1b", "--nodes", "1", "--gpus_per_node", "8", "--gpu", "H200", "--seq_len",
               str(MILLION), "--global_batch_tokens", str(2 * MILLION), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {c["sp_size"] for c in result["candidates"]} == {4}  # 2 sequences: 2 groups of 4 GPUs
    chosen = result["recommendation"]
    assert chosen["sp_size"] == 4 and chosen["micro_batch"] * chosen["grad_accum"] * 2 == 2


def test_given_sp_size_is_planned_as_given(tmp_path):
    args = ["--model_size", "1b", "--nodes", "1", "--gpus_per_node", "8", "--gpu", "H200", "--seq_len", str(MILLION),
            "--sp_size", "8", "--grad_checkpointing"]
    out = plan(*args, "--json")
    assert out.returncode == 0, out.stderr
    chosen = json.loads(out.stdout)["recommendation"]
    assert chosen["sp_size"] == 8 and chosen["name"] == "ZeRO-0" and chosen["grad_accum"] == 1
    written = plan(*args, "--write_config", str(tmp_path / "ds.json"))
    assert f"train.py --deepspeed_config {tmp_path / 'ds.json'} --grad_checkpointing --sp_size 8" in written.stdout
    config = json.loads((tmp_path / "ds.json").read_text())
    # One data-parallel group of 8: DeepSpeed's train_batch_size counts sequences per group, not per GPU.
    assert config["train_batch_size"] == config["train_micro_batch_size_per_gpu"] == chosen["micro_batch"]
    wide = plan("--model_size", "1b", "--nodes", "1", "--gpus_per_node", "8", "--gpu", "H200", "--seq_len",
                str(MILLION), "--sp_size", "2")
    assert wide.returncode == 0, wide.stderr  # sp 2 as asked: checkpointing, then offload, make it fit
    assert "--sp_size 2" in wide.stdout and "--sp_size 4" not in wide.stdout


def test_tiled_mlp_is_said_to_be_counted_untiled():
    out = plan("--model_size", "small", "--tiled_mlp")
    assert out.returncode == 0, out.stderr
    assert "tiled MLP not modelled (its activations counted untiled: an upper bound)" in out.stdout.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--sp_size", "3"], "--sp_size 3 must divide the 8 GPUs"),
    (["--sp_size", "0"], "--sp_size must be >= 1 (got 0)"),
    (["--sp_size", "4", "--seq_len", "1026"], "--seq_len 1026 must be divisible by --sp_size 4"),
    (["--sp_size", "8", "--model_size", "large", "--gpus_per_node", "8"], "must divide the 12 attention heads"),
    (["--offload_activations"], "--offload_activations needs --grad_checkpointing"),
    (["--sp_size", "2", "--use_moe"], "--sp_size > 1 with --use_moe is not planned"),
    (["--sp_size", "2", "--global_batch_tokens", "256"], "per data-parallel group (4 groups of --sp_size 2 need at "
                                                          "least 1024)"),
])
def test_bad_sequence_parallel_input_is_one_line(args, message, tmp_path):
    assert_refused_in_one_line(args, message, tmp_path)
