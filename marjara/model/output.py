"""What MarjaraModel.forward returns: one small typed value, nothing left on the module.

A NamedTuple, because DeepSpeed's engine returns the module's output as it is and ZeRO-3's hooks
look for tensors inside tuples, lists and dicts (a dataclass would hide them)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    # (B, T, vocab) logits; None when targets were given (the loss is computed slice by slice and
    # the whole batch's logits never exist, marjara/model/head.py).
    logits: torch.Tensor | None
    # With targets: mean cross-entropy over the targets that are not -1, + aux_loss_coef x aux_loss.
    loss: torch.Tensor | None
    # The MoE layers' load-balancing losses, summed over layers; None for a dense model.
    aux_loss: torch.Tensor | None
    # MoE layer index -> tokens of this batch the gate sent to each expert (k per token), detached.
    expert_counts: dict[int, torch.Tensor]
    # With targets: the cross-entropy summed (fp32) over the counted targets, and their number, so
    # that a caller can average over several batches or ranks exactly (ce_sum / ce_tokens is the
    # cross-entropy part of the loss).
    ce_sum: torch.Tensor | None = None
    ce_tokens: torch.Tensor | None = None
