"""fp16's loss scale and skipped overflow steps, read from DeepSpeed's optimizer at every ZeRO
stage. DeepSpeed refuses fp16 on a CPU only because its CPU accelerator says it is unsupported;
saying otherwise (here, in the test) builds the same optimizers a GPU run gets at ZeRO 1-3, and
ZeRO-0's unfused one (a GPU gets the fused FP16_Optimizer, checked below without an engine)."""

import pytest
import torch

from marjara.distributed import ensure_process_group
from marjara.model import MarjaraModel
from marjara.model.config import ModelConfig
from marjara.train.engine import initialize_engine
from marjara.compat.deepspeed import current_loss_scale, engine_leaves_loss_unscaled, loss_for_backward, skipped_steps
from marjara.train.optim import parameter_groups


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    ensure_process_group()
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)


def fp16_engine(stage: int, config: dict):
    torch.manual_seed(0)
    model = MarjaraModel(ModelConfig.from_preset("tiny", vocab_size=256, n_layers=2))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "fp16": {"enabled": True, **config}, "zero_optimization": {"stage": stage}}
    return initialize_engine(model=model, optimizer=torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3), config=config)


def one_step(engine, batch):
    loss = engine(batch[:, :-1], batch[:, 1:]).loss
    engine.backward(loss_for_backward(engine, loss))
    engine.step()
    return loss


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_an_overflow_is_skipped_counted_and_lowers_the_scale_at_every_zero_stage(fp16_on_cpu, stage):
    # 2**40 overflows fp16 gradients on the first step: DeepSpeed skips it and halves the scale
    engine = fp16_engine(stage, {"initial_scale_power": 40, "hysteresis": 1})
    try:
        assert current_loss_scale(engine.optimizer) == 2.0**40
        one_step(engine, torch.randint(0, 256, (2, 9)))
        assert skipped_steps(engine) == 1
        assert current_loss_scale(engine.optimizer) == 2.0**39
    finally:
        engine.destroy()


def test_zero0_gradients_are_scaled_once(fp16_on_cpu):
    """ZeRO-0's fp16 optimizer gets the loss scaled by MARJARA, because DeepSpeed's engine does
    not; were DeepSpeed to start doing it, the gradients would be scaled twice and this fails."""
    batch = torch.randint(0, 256, (2, 9))
    grads = {}
    for power in (0, 8):  # a static scale of 1, then of 256
        engine = fp16_engine(0, {"loss_scale": 2.0**power})
        try:
            assert engine_leaves_loss_unscaled(engine)
            loss = engine(batch[:, :-1], batch[:, 1:]).loss
            engine.backward(loss_for_backward(engine, loss))
            grads[power] = torch.cat([p.grad.float().reshape(-1) for p in engine.module.parameters()])
        finally:
            engine.destroy()
    ratio = grads[8].abs().sum() / grads[0].abs().sum()
    assert ratio == pytest.approx(256.0, rel=1e-2)


def test_zero0s_fused_fp16_optimizer_has_no_cur_scale_but_a_loss_scale(fp16_on_cpu):
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    optimizer = FP16_Optimizer(torch.optim.AdamW([param]), deepspeed=None, dynamic_loss_scale=True,
                               initial_dynamic_scale=2**16)
    assert not hasattr(optimizer, "cur_scale")  # what the trainer used to read
    assert current_loss_scale(optimizer) == 2.0**16


def test_no_scale_without_fp16():
    assert current_loss_scale(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])) is None
