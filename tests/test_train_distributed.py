"""Real 2-rank training runs on CPU (gloo): every ZeRO stage, MoE expert parallelism, EMA, and
resuming on another world size. One global batch (8 samples) throughout, so 1-rank and 2-rank runs
see the same data and their losses can be compared step for step."""

import pytest
import torch

from train_helpers import QUICK, ema_weights, metrics, run_train, train_losses

pytestmark = pytest.mark.slow

STEPS = 8
COMMON = QUICK + ["--max_steps", str(STEPS), "--save_interval", "4", "--ema_decay", "0.8"]


def two_ranks(tmp_factory, name, config, launcher="torchrun", extra=()):
    out = tmp_factory.mktemp(name)
    result = run_train(COMMON + ["--deepspeed_config", f"ds_configs/{config}", "--batch_size", "4",
                                 "--out_dir", str(out), *extra], nproc=2, launcher=launcher)
    return out, result


@pytest.fixture(scope="module")
def one_rank_zero2(tmp_path_factory):
    """The reference: one process, the whole global batch of 8."""
    out = tmp_path_factory.mktemp("r1")
    run_train(COMMON + ["--deepspeed_config", "ds_configs/zero2.json", "--batch_size", "8", "--out_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def two_rank_zero2(tmp_path_factory):
    return two_ranks(tmp_path_factory, "z2", "zero2.json")


@pytest.fixture(scope="module")
def two_rank_zero3(tmp_path_factory):
    return two_ranks(tmp_path_factory, "z3", "zero3.json")


def assert_trains_like_reference(out, reference, tolerance=2e-4):
    losses, expected = train_losses(out), train_losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.3, losses  # it learns
    for step in losses:
        assert losses[step] == pytest.approx(expected[step], abs=tolerance), (step, losses, expected)


def assert_same_weights(a: dict, b: dict, tolerance=2e-4):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tolerance, msg=name)


def test_zero0_two_ranks_through_the_deepspeed_launcher(tmp_path_factory, one_rank_zero2):
    out, result = two_ranks(tmp_path_factory, "z0", "zero0.json", launcher="deepspeed")
    assert_trains_like_reference(out, one_rank_zero2)
    assert "weights identical on all 2 ranks" in result.stdout


def test_zero1_two_ranks(tmp_path_factory, one_rank_zero2):
    out, result = two_ranks(tmp_path_factory, "z1", "zero1.json")
    assert_trains_like_reference(out, one_rank_zero2)
    assert "world_size=2" in result.stdout


def test_zero2_two_ranks_match_one_rank_over_the_same_global_batch(two_rank_zero2, one_rank_zero2):
    out, result = two_rank_zero2
    assert_trains_like_reference(out, one_rank_zero2)
    assert "weights identical on all 2 ranks" in result.stdout
    assert result.stdout.count("world_size=2") == 1  # only rank 0 prints


def test_zero3_two_ranks_and_its_sharded_ema_loses_no_update(two_rank_zero3, one_rank_zero2):
    out, _ = two_rank_zero3
    assert_trains_like_reference(out, one_rank_zero2)
    sharded = ema_weights(out / f"global_step{STEPS}")
    reference = ema_weights(one_rank_zero2 / f"global_step{STEPS}")
    assert_same_weights(sharded, reference)
    # Each rank kept only its half of the EMA.
    own = [torch.load(out / f"global_step{STEPS}" / f"marjara_rank{r}.pt", weights_only=True)["ema"] for r in (0, 1)]
    total = sum(t.numel() for t in reference.values())
    assert all(sum(t.numel() for t in part.values()) <= 0.6 * total for part in own)


def test_moe_expert_parallel_two_ranks_under_zero2(tmp_path_factory):
    out, result = two_ranks(tmp_path_factory, "moe", "moe_zero2.json",
                            extra=["--use_moe", "--num_experts", "4", "--ep_size", "2", "--top_k", "2",
                                   "--capacity_factor", "2.0", "--grad_checkpointing"])
    losses = train_losses(out)
    assert losses[STEPS] < losses[1] - 0.3
    aux = [m["moe/aux_loss"] for m in metrics(out)
           if "moe/aux_loss" in m]
    assert aux and all(a > 0 for a in aux)
    tag = out / f"global_step{STEPS}"
    assert len(list(tag.glob("layer_*_expert_*_model_states.pt"))) == 2 * 4  # 2 MoE layers x 4 experts
    ema = ema_weights(tag)
    assert {n for n in ema if "deepspeed_experts.3." in n}, "EMA holds every global expert"
    assert "weights identical on all 2 ranks" in result.stdout


def assert_resumed_run_continues(out, original):
    """A run resumed at step 4 of `original` logs steps 5..8 with its losses, and ends on its EMA."""
    resumed, losses = train_losses(out), train_losses(original)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(losses[step], abs=2e-4)
    assert_same_weights(ema_weights(out / f"global_step{STEPS}"), ema_weights(original / f"global_step{STEPS}"))


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_two_ranks_on_one_rank_continues_the_run(stage, request, tmp_path_factory):
    source, _ = request.getfixturevalue(f"two_rank_zero{stage}")
    out = tmp_path_factory.mktemp(f"2to1_zero{stage}")
    result = run_train(COMMON + ["--deepspeed_config", f"ds_configs/zero{stage}.json", "--batch_size", "8",
                                 "--out_dir", str(out), "--resume", str(source / "global_step4")])
    assert "universal" in result.stdout
    assert_resumed_run_continues(out, source)


def test_resume_one_rank_on_two_ranks_continues_the_run(tmp_path_factory, one_rank_zero2):
    out, _ = two_ranks(tmp_path_factory, "1to2", "zero2.json",
                       extra=["--resume", str(one_rank_zero2 / "global_step4")])
    assert_resumed_run_continues(out, one_rank_zero2)
