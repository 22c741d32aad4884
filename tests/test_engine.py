"""marjara.train.engine: the corrections made to DeepSpeed's engine keep training exactly as it was."""

import pytest
import torch
import torch.nn.functional as F

from marjara.model.config import ModelConfig
from marjara.distributed import ensure_process_group
from marjara.train.engine import initialize_engine
from marjara.model import MarjaraModel
from marjara.train.config import TrainConfig
from marjara.train.optim import build_adamw, parameter_groups

STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def restore_linear():
    """A ZeRO-3 engine replaces torch.nn.functional.linear process-wide (memory_efficient_linear);
    give the tests that run after these the real one back."""
    linear = F.linear
    yield
    F.linear = linear


def batches():
    return torch.randint(0, 128, (STEPS, 2, 33), generator=torch.Generator().manual_seed(1))


def new_engine(stage: int, bf16: bool = False):
    ensure_process_group()
    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=128))
    cfg = TrainConfig.from_flags({"batch_size": 2, "zero_stage": stage, "mixed_precision": "bf16" if bf16 else "fp32"},
                                 has_gpu=False)
    return initialize_engine(model=model, optimizer=build_adamw(parameter_groups(model, cfg.optim.weight_decay), cfg),
                             config=cfg.engine_config(world_size=1))


def train(engine, data) -> list[float]:
    losses = []
    for batch in data:
        loss = engine(batch[:, :-1], batch[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def engine_and_losses(stage: int, bf16: bool = False):
    engine = new_engine(stage, bf16)
    return engine, train(engine, batches())


@pytest.fixture(scope="module")
def zero0():
    return engine_and_losses(0)


def assert_masters_are_the_partitions(engine):
    zero = engine.optimizer
    assert len(zero.fp32_partitioned_groups_flat) == len(zero.fp16_partitioned_groups_flat) > 0
    for master, partition in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat):
        assert master is partition  # one fp32 copy of the partition, not two


def test_fp32_zero3_uses_its_parameter_partitions_as_masters_and_trains_as_before(zero0):
    engine, losses = engine_and_losses(3)
    assert_masters_are_the_partitions(engine)
    assert losses == pytest.approx(zero0[1], abs=1e-5)
    assert losses[-1] < losses[0]


def test_fp32_zero3_with_shared_masters_resumes_bit_identically(tmp_path):
    data = batches()
    engine = new_engine(3)
    first = train(engine, data[:2])
    engine.save_checkpoint(str(tmp_path), tag="half")
    uninterrupted = first + train(engine, data[2:])
    resumed = new_engine(3)
    resumed.load_checkpoint(str(tmp_path), tag="half")
    assert_masters_are_the_partitions(resumed)
    assert train(resumed, data[2:]) == uninterrupted[2:]


def test_bf16_zero3_keeps_separate_fp32_masters():
    engine, losses = engine_and_losses(3, bf16=True)
    zero = engine.optimizer
    for master, partition in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat):
        assert master.dtype == torch.float32 and partition.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(losses)))


def test_one_rank_zero0_skips_its_gradient_allreduce_and_zero1_keeps_it(zero0):
    assert zero0[0].enable_backward_allreduce is False
    assert engine_and_losses(1)[0].enable_backward_allreduce is True


# ZeRO-3 runs without activation checkpointing here: DeepSpeed's non_reentrant_checkpoint fails in
# ZeRO-3's backward whatever the model returns (a partitioned weight reaches the recomputation).
@pytest.mark.parametrize("stage, moe, checkpointing", [(0, True, True), (2, False, True), (3, False, False)],
                         ids=["zero0-moe-checkpointing", "zero2-checkpointing", "zero3"])
def test_the_engine_hands_back_the_models_output(stage, moe, checkpointing):
    """engine(x, y) returns the module's ModelOutput as it is (through activation checkpointing and
    ZeRO-3's hooks), with the loss, its parts and the gradients of the same model run alone."""
    from deepspeed.utils import safe_get_full_grad

    from marjara.model import ModelOutput
    from marjara.train.build import build_engine, build_model

    ensure_process_group()
    config = ModelConfig.from_preset("tiny", vocab_size=128, use_moe=moe, capacity_factor=4.0)
    cfg = TrainConfig.from_flags({"batch_size": 2, "zero_stage": stage, "grad_checkpointing": checkpointing}, has_gpu=False)
    ds_config = cfg.engine_config(world_size=1)
    torch.manual_seed(0)
    plain = MarjaraModel(config).train()
    torch.manual_seed(0)
    engine, _ = build_engine(build_model(config, checkpointing, ds_config), cfg, ds_config)
    assert (engine.module.checkpoint_fn is not None) == checkpointing
    batch = batches()[0]
    torch.manual_seed(1)  # the same gate randomness in both
    expected = plain(batch[:, :-1], batch[:, 1:])
    expected.loss.backward()
    torch.manual_seed(1)
    out = engine(batch[:, :-1], batch[:, 1:])
    assert type(out) is ModelOutput and out.logits is None
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.ce_sum, expected.ce_sum, rtol=1e-6, atol=0)
    assert int(out.ce_tokens) == int(expected.ce_tokens) == 2 * 32
    if moe:
        torch.testing.assert_close(out.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)
        assert out.expert_counts.keys() == expected.expert_counts.keys() == set(config.moe_layers)
        for layer, counts in out.expert_counts.items():
            assert torch.equal(counts, expected.expert_counts[layer])
    else:
        assert out.aux_loss is None and out.expert_counts == {}
    engine.backward(out.loss)
    for (name, param), reference in zip(engine.module.named_parameters(), plain.parameters()):
        torch.testing.assert_close(safe_get_full_grad(param), reference.grad, rtol=1e-5, atol=1e-6, msg=name)
    engine.step()
    engine.eval()
    with torch.no_grad():
        logits = engine(batch[:, :-1]).logits
    assert logits.shape == (2, 32, 128)
