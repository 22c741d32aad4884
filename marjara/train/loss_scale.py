"""fp16's dynamic loss scale, read the same way from every optimizer DeepSpeed wraps for it.

ZeRO 1-3 optimizers have `cur_scale` and `loss_scale`; ZeRO-0's FP16_Optimizer (fused, on GPUs)
and FP16_UnfusedOptimizer have only `loss_scale` (a property over their loss-scale config). All of
them have `loss_scale`, so that is what is read; `loss_scaler.cur_scale` backs up an optimizer
that has neither. Where DeepSpeed's engine forgets to apply the scale (ZeRO-0), see
marjara.compat.loss_for_backward.
"""

from __future__ import annotations


def current_loss_scale(optimizer) -> float | None:
    """The loss scale now; None when the optimizer scales no loss (bf16, fp32)."""
    scale = getattr(optimizer, "loss_scale", None)
    if scale is None:
        scale = getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    return None if scale is None else float(scale)
