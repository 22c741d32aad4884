"""marjara.engine: the corrections made to DeepSpeed's engine keep training exactly as it was."""

import pytest
import torch

from marjara.config import ModelConfig
from marjara.distributed import ensure_process_group
from marjara.engine import initialize_engine
from marjara.model import MarjaraModel
from marjara.optim import build_adamw, parameter_groups

STEPS = 4


def engine_and_losses(stage: int, bf16: bool = False):
    ensure_process_group()
    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=128))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "bf16": {"enabled": bf16}, "zero_optimization": {"stage": stage}}
    engine = initialize_engine(model=model, optimizer=build_adamw(parameter_groups(model, 0.1), 1e-3),
                               config=config)
    data = torch.randint(0, 128, (STEPS, 2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for batch in data:
        _, loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return engine, losses


@pytest.fixture(scope="module")
def zero0_losses():
    return engine_and_losses(0)[1]


def test_fp32_zero3_uses_its_parameter_partitions_as_masters_and_trains_as_before(zero0_losses):
    engine, losses = engine_and_losses(3)
    zero = engine.optimizer
    assert len(zero.fp32_partitioned_groups_flat) == len(zero.fp16_partitioned_groups_flat) > 0
    for master, partition in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat):
        assert master is partition  # one fp32 copy of the partition, not two
    assert losses == pytest.approx(zero0_losses, abs=1e-5)
    assert losses[-1] < losses[0]


def test_bf16_zero3_keeps_separate_fp32_masters():
    engine, losses = engine_and_losses(3, bf16=True)
    zero = engine.optimizer
    for master, partition in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat):
        assert master.dtype == torch.float32 and partition.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(losses)))


def test_one_rank_zero0_skips_its_gradient_allreduce_and_zero1_keeps_it():
    assert engine_and_losses(0)[0].enable_backward_allreduce is False
    assert engine_and_losses(1)[0].enable_backward_allreduce is True
