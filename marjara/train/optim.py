"""AdamW parameter groups (decay / no-decay, MoE split) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear weights, embeddings) decay; norms' gains and biases do not. MoE expert
    parameters go into groups of their own, as DeepSpeed's ZeRO requires for expert parallelism."""
    decay, no_decay = [], []
    for param in model.parameters():  # each tied parameter appears once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    if any(hasattr(p, "allreduce") and not p.allreduce for p in decay + no_decay):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def build_adamw(groups: list[dict], cfg, skip_non_finite: bool = False) -> torch.optim.Optimizer:
    """torch's AdamW over `groups` with the lr, betas and eps of `cfg` (a TrainConfig).
    skip_non_finite: an AdamW that refuses steps with NaN/inf gradients, for where DeepSpeed runs
    the client optimizer itself (ZeRO-0 in fp32; see marjara/train/nonfinite.py)."""
    from marjara.train.nonfinite import GuardedAdamW

    kind = GuardedAdamW if skip_non_finite else torch.optim.AdamW
    optim = cfg.optim
    return kind(groups, lr=optim.lr, betas=optim.adam_betas, eps=optim.adam_eps, fused=torch.cuda.is_available())


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then cosine decay
    to min_ratio at max_steps (and flat after it)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, max_steps, min_ratio))
