"""Ulysses sequence parallelism (--sp_size 2) on 2 real CPU ranks against a one-rank run.

Each sp 2 launch reads the same samples as the one-rank run (one data-parallel rank in both) and
must give the same loss and the same full gradient of every parameter (1e-5, fp32), under ZeRO 0, 2
and 3, with and without --grad_checkpointing; 20 optimizer steps must give the same losses; a
resume at sp 2 continues bit-identically and a resume at sp 1 continues the same sample stream.
The trap test builds each known mistake on purpose and shows that it changes the gradients.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train_helpers import ROOT, run_ranks, run_train, train_losses

PROBE = str(ROOT / "tests" / "sp_probe.py")
# One micro-batch of 2 samples x 64 tokens; the sp 2 ranks hold 32 tokens each.
STEP = ["--model_size", "tiny", "--seq_len", "64", "--batch_size", "2", "--eval_interval", "0",
        "--sample_tokens", "0", "--max_steps", "2", "--overwrite"]
TOLERANCE = 1e-5

CASES = {
    "zero0": [],
    "zero0-checkpointing": ["--grad_checkpointing"],
    "zero2": ["--deepspeed_config", "ds_configs/zero2.json"],
    "zero2-checkpointing": ["--deepspeed_config", "ds_configs/zero2.json", "--grad_checkpointing"],
    "zero3": ["--deepspeed_config", "ds_configs/zero3.json"],
    "zero3-checkpointing": ["--deepspeed_config", "ds_configs/zero3.json", "--grad_checkpointing"],
    # the memory tricks together: tiled MLP, block inputs kept off the device
    "zero3-tiled-offloaded": ["--deepspeed_config", "ds_configs/zero3.json", "--grad_checkpointing",
                              "--offload_activations", "--tiled_mlp"],
}


def probe(out: Path, world: int, own: list[str], flags: list[str]) -> dict:
    dump = out / "probe.pt"
    args = [str(dump), *own, "--", *STEP, *flags, "--out_dir", str(out / "run")]
    for result in run_ranks(args, world, script=PROBE):
        assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(dump, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One rank, no sequence parallelism: the whole 64-token samples."""
    return probe(tmp_path_factory.mktemp("sp1"), 1, [], [])


def assert_same_step(got: dict, want: dict) -> None:
    assert abs(got["loss"] - want["loss"]) <= TOLERANCE, (got["loss"], want["loss"])
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=TOLERANCE, msg=name)


def max_grad_difference(a: dict, b: dict) -> float:
    return max((a["grads"][n] - b["grads"][n]).abs().max().item() for n in b["grads"])


@pytest.mark.parametrize("case", list(CASES))
def test_sp2_loss_and_every_gradient_equal_one_rank(case, reference, tmp_path):
    got = probe(tmp_path, 2, [], ["--sp_size", "2", *CASES[case]])
    # each rank held half of each sample: the second half's tokens are the reference's
    assert torch.equal(got["x"], reference["x"][:, :32])
    assert_same_step(got, reference)


def test_fewer_kv_heads_than_ranks_are_replicated(tmp_path):
    """One kv head (MQA) over 2 sequence ranks: each rank attends with a copy of it."""
    want = probe(tmp_path / "one", 1, ["--n_kv_heads", "1"], [])
    got = probe(tmp_path / "two", 2, ["--n_kv_heads", "1"], ["--sp_size", "2"])
    assert_same_step(got, want)


def test_every_known_trap_changes_the_gradients(reference, tmp_path):
    """The real path equals the reference; each broken variant (built in sp_probe.py) does not:
    so the equality tests above fail if one of these mistakes comes back."""
    got = probe(tmp_path, 2, ["--traps"], ["--sp_size", "2"])
    assert_same_step(got, reference)
    assert set(got["traps"]) == {"positions_from_zero", "per_rank_mean", "labels_shifted_per_shard", "unreduced"}
    for name, broken in got["traps"].items():
        assert max_grad_difference(broken, reference) > 100 * TOLERANCE, name
    # a per-rank mean also misreports the loss; unreduced gradients leave the loss itself right
    assert abs(got["traps"]["per_rank_mean"]["loss"] - reference["loss"]) > 100 * TOLERANCE


# ---- whole runs ----------------------------------------------------------------------------------
RUN = ["--model_size", "tiny", "--seq_len", "64", "--eval_batches", "2", "--eval_interval", "10",
       "--log_interval", "1", "--sample_tokens", "0", "--warmup_steps", "2", "--lr", "3e-3", "--max_steps", "20",
       "--save_interval", "10", "--ema_decay", "0.9", "--deepspeed_config", "ds_configs/zero2.json"]


def val_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["val/loss"] for m in lines if "val/loss" in m}


@pytest.fixture(scope="module")
def sp1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_sp1")
    run_train(RUN + ["--batch_size", "2", "--out_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def sp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_sp2")
    run_train(RUN + ["--batch_size", "2", "--sp_size", "2", "--out_dir", str(out)], nproc=2)
    return out


def test_twenty_steps_of_sp2_give_the_losses_of_sp1(sp1_run, sp2_run):
    one, two = train_losses(sp1_run), train_losses(sp2_run)
    assert sorted(two) == list(range(1, 21)) and sorted(one) == sorted(two)
    assert max(abs(one[s] - two[s]) for s in one) <= 1e-4, (one, two)
    v1, v2 = val_losses(sp1_run), val_losses(sp2_run)
    assert sorted(v2) == [10, 20] and all(abs(v1[s] - v2[s]) <= 1e-4 for s in v1), (v1, v2)
    meta = json.loads((sp2_run / "global_step20" / "marjara.json").read_text())
    assert meta["train_args"]["sp_size"] == 2


def test_resume_at_sp2_is_bit_identical(sp2_run, tmp_path):
    run_train(RUN + ["--batch_size", "2", "--sp_size", "2", "--out_dir", str(tmp_path),
                     "--resume", str(sp2_run / "global_step10")], nproc=2)
    resumed, original = train_losses(tmp_path), train_losses(sp2_run)
    assert sorted(resumed) == list(range(11, 21))
    assert all(resumed[s] == original[s] for s in resumed), (resumed, original)


def test_resume_at_sp1_continues_the_sample_stream(sp2_run, tmp_path):
    """The same global batch of 2 samples, now 1 whole sample on each of 2 data-parallel ranks."""
    result = run_train(RUN + ["--batch_size", "1", "--out_dir", str(tmp_path),
                              "--resume", str(sp2_run / "global_step10")], nproc=2)
    assert "global_batch=128 tokens" in result.stdout
    resumed, original = train_losses(tmp_path), train_losses(sp2_run)
    assert sorted(resumed) == list(range(11, 21))
    assert max(abs(resumed[s] - original[s]) for s in resumed) <= 1e-4, (resumed, original)


def test_an_sp2_checkpoint_exports_as_without_sequence_parallelism(sp1_run, sp2_run, tmp_path):
    from marjara.convert import main as convert
    from marjara.model import MarjaraModel

    models = []
    for name, run in (("sp1", sp1_run), ("sp2", sp2_run)):
        convert([str(run), str(tmp_path / name)])
        models.append(MarjaraModel.from_pretrained(tmp_path / name).state_dict())
    one, two = models
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4, msg=name)


def test_zero3_steps_at_sp2_clip_by_the_true_gradient_norm(tmp_path):
    """DeepSpeed sums the gradient norm over its mpu's model-parallel group, which for the sequence
    groups is the sequence ranks: the norm (and so clipping, active here) must still be the one-rank one."""
    flags = RUN[:RUN.index("--max_steps")] + ["--max_steps", "6", "--eval_interval", "0", "--save_interval", "0",
                                              "--deepspeed_config", "ds_configs/zero3.json", "--batch_size", "2"]
    run_train(flags + ["--out_dir", str(tmp_path / "one")])
    run_train(flags + ["--sp_size", "2", "--out_dir", str(tmp_path / "two")], nproc=2)

    def steps(out):
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m for m in lines if "train/loss" in m}
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    assert max(m["train/grad_norm"] for m in one.values()) > 1.0  # clipping at 1.0 is active
    for step, want in one.items():
        assert abs(two[step]["train/loss"] - want["train/loss"]) <= 1e-4, step
        assert abs(two[step]["train/grad_norm"] - want["train/grad_norm"]) <= 1e-3 * want["train/grad_norm"], step  # sqrt(2) if summed twice
