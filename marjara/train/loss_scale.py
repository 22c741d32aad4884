"""fp16's dynamic loss scale, read the same way from every optimizer DeepSpeed wraps for it, and
applied where DeepSpeed's engine forgets to.

Reading: ZeRO 1-3 optimizers have `cur_scale` and `loss_scale`; ZeRO-0's FP16_Optimizer (fused,
on GPUs) and FP16_UnfusedOptimizer have only `loss_scale` (a property over their loss-scale
config). All of them have `loss_scale`, so that is what is read; `loss_scaler.cur_scale` backs
up an optimizer that has neither.

Applying: DeepSpeed 0.19's `engine.backward` scales the loss only for ZeRO optimizers
(`isinstance(optimizer, ZeROOptimizer)`, deepspeed/runtime/engine.py), yet ZeRO-0's fp16
optimizers still divide the gradients by their scale in step() and look for overflow there. So
under ZeRO-0 fp16 the gradients came out 1/scale too small, fp16 gradients underflowed, clipping
saw a norm 65536x too small and overflow was never detected. loss_for_backward() multiplies the
loss by the scale for exactly those optimizers, as their own backward() would; tests/test_loss_scale.py
fails if DeepSpeed starts scaling them itself (the gradients would then be scaled twice).
"""

from __future__ import annotations

import torch


def current_loss_scale(optimizer) -> float | None:
    """The loss scale now; None when the optimizer scales no loss (bf16, fp32)."""
    scale = getattr(optimizer, "loss_scale", None)
    if scale is None:
        scale = getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    return None if scale is None else float(scale)


def engine_leaves_loss_unscaled(optimizer) -> bool:
    """An fp16 optimizer that scales gradients back in step() but that engine.backward does not
    scale the loss for (ZeRO-0's FP16_Optimizer and FP16_UnfusedOptimizer)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    config = getattr(optimizer, "loss_scale_config", None)
    return (not isinstance(optimizer, ZeROOptimizer) and config is not None
            and getattr(config, "use_grad_scaling", False) and not getattr(optimizer, "custom_loss_scaler", False))


def loss_for_backward(engine, loss: torch.Tensor) -> torch.Tensor:
    """What to pass to engine.backward: the loss, times the loss scale where the engine would not
    apply it."""
    if engine_leaves_loss_unscaled(engine.optimizer):
        return loss.float() * engine.optimizer.loss_scale
    return loss
