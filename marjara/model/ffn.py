"""Feed-forward blocks: SwiGLU, and a mixture of SwiGLU experts on deepspeed.moe.layer.MoE."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from marjara.compat import ensure_expert_group
from marjara.model.config import ModelConfig


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """SwiGLU experts behind DeepSpeed's gate; forward returns (output, aux_loss, expert_counts).

    expert_counts holds, per expert of the whole layer, how many tokens of this rank's batch the
    gate sent to it (top-k: each token counts k times).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(
            hidden_size=config.d_model,
            expert=SwiGLU(config.d_model, config.ffn_hidden_size),
            num_experts=config.num_experts,
            ep_size=config.ep_size,
            k=config.top_k,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            min_capacity=config.min_capacity,
            use_residual=config.use_residual,
            drop_tokens=config.drop_tokens,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ensure_expert_group(self.moe)  # an engine gives it one; a model run without an engine has none
        return self.moe(x)


@contextlib.contextmanager
def inference_routing(model: nn.Module) -> Iterator[None]:
    """Route every token to its top-k experts without capacity limits, noise or random selection.

    Capacity-based token dropping makes a token's output depend on the other tokens in the batch
    (and DeepSpeed's gate refuses fewer tokens than min_capacity), so cached decoding, batched
    generation and evaluation would not match a full forward pass. Restores the settings on exit.
    """
    from deepspeed.moe.sharded_moe import TopKGate

    gates = [m for m in model.modules() if isinstance(m, TopKGate)]
    fields = ("drop_tokens", "min_capacity", "use_rts", "top2_2nd_expert_sampling")
    saved = [{f: getattr(g, f) for f in fields} for g in gates]
    for gate in gates:
        gate.drop_tokens, gate.min_capacity, gate.use_rts, gate.top2_2nd_expert_sampling = False, 0, False, False
    try:
        yield
    finally:
        for gate, values in zip(gates, saved):
            for name, value in values.items():
                setattr(gate, name, value)
