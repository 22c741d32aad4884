"""A mixture-of-experts layer in plain PyTorch, for inference: no process group, deep-copyable.

DeepSpeed's MoE layer (deepspeed.moe.layer.MoE) builds its expert groups from DeepSpeed's process
group and keeps the group handles, so a model made of them needs a process group and cannot be
copied. Inference needs neither expert parallelism nor DeepSpeed's capacity buffers: this layer
holds every expert itself, under the same parameter names and shapes as DeepSpeed's layer (a
state dict moves between the two as it is), and routes the way MARJARA's MoE layers route in eval
mode (marjara/model/ffn.py): every token to its top-k experts, no capacity limit, no noise. top-1
weights the expert by its softmax probability, top-2 renormalises the two (DeepSpeed's top1gating
and top2gating). The aux loss and the expert counts are DeepSpeed's formulas too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from marjara.errors import MarjaraError


class _Gate(nn.Module):
    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(d_model, num_experts, bias=False)


class _Experts(nn.Module):
    def __init__(self, experts: list[nn.Module]) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(experts)


class _Router(nn.Module):
    """Named as DeepSpeed's MOELayer (`deepspeed_moe`): a gate and the experts."""

    def __init__(self, gate: _Gate, experts: _Experts) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts


class InferenceMoE(nn.Module):
    """forward(x) -> (output, aux_loss, expert_counts), as deepspeed.moe.layer.MoE returns them."""

    def __init__(self, d_model: int, make_expert, num_experts: int, top_k: int, use_residual: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.deepspeed_moe = _Router(_Gate(d_model, num_experts), _Experts([make_expert() for _ in range(num_experts)]))
        self.use_residual = use_residual
        if use_residual:  # Residual MoE: a dense MLP beside the experts, mixed per token
            self.mlp = make_expert()
            self.coefficient = nn.Linear(d_model, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training:
            raise MarjaraError(
                "this model's MoE layers are for inference (MarjaraModel(config, inference=True), from_pretrained): "
                "they have no training gate; train with MarjaraModel(config) under DeepSpeed, or call model.eval()")
        tokens = x.reshape(-1, x.size(-1))
        logits = F.linear(tokens.float(), self.deepspeed_moe.gate.wg.weight.float())  # the gate runs in fp32
        experts, weights, aux_loss, counts = route(logits, self.top_k)
        routed = tokens.new_zeros(self.top_k, *tokens.shape)
        for index, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
            rows, slots = (experts == index).nonzero(as_tuple=True)
            if rows.numel():
                routed[slots, rows] = expert(tokens[rows])
        # Weighted in fp32 (the gate's dtype) and summed over the k routes, then back to x's dtype.
        output = (routed * weights.t().unsqueeze(-1)).sum(0).to(x.dtype).reshape(x.shape)
        if self.use_residual:
            coefficient = F.softmax(self.coefficient(x), dim=-1)
            output = output * coefficient[..., 0:1] + self.mlp(x) * coefficient[..., 1:]
        return output, aux_loss, counts


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 gate logits (S, E) -> (chosen experts (S, k), their weights (S, k), aux loss, tokens
    per expert (E,)), by DeepSpeed's top1gating / top2gating with every token kept."""
    gates = F.softmax(logits, dim=1)
    num_experts = gates.size(1)
    first = gates.argmax(dim=1)
    first_mask = F.one_hot(first, num_classes=num_experts)
    me, ce = gates.mean(dim=0), first_mask.float().mean(dim=0)
    if k == 1:
        weights = gates.gather(1, first[:, None])
        return first[:, None], weights, (me * ce).sum() * num_experts, first_mask.sum(dim=0)
    second = logits.masked_fill(first_mask.bool(), float("-inf")).argmax(dim=1)
    second_mask = F.one_hot(second, num_classes=num_experts)
    chosen = torch.stack([first, second], dim=1)
    weights = gates.gather(1, chosen)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).eps)
    aux_loss = (me * ce).mean() * num_experts * num_experts
    return chosen, weights, aux_loss, (first_mask + second_mask).sum(dim=0)
