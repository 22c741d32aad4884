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
        _, loss = engine(batch[:, :-1], batch[:, 1:])
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
