"""Feed-forward blocks: SwiGLU, and a mixture of SwiGLU experts on deepspeed.moe.layer.MoE (training)
or on its plain-PyTorch twin (inference)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from marjara.compat.deepspeed_moe import deterministic_moe_gate, ensure_expert_group
from marjara.errors import MarjaraError
from marjara.model.config import ModelConfig
from marjara.model.inference_moe import InferenceMoE
from marjara.model.tiled_mlp import tiled


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.chunk_tokens: int | None = None  # set: tiled over token slices (marjara/model/tiled_mlp.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk_tokens:
            return tiled(self._dense, x, self.chunk_tokens)
        return self._dense(x)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """SwiGLU experts behind DeepSpeed's gate; forward returns (output, aux_loss, expert_counts).

    In training mode the gate is DeepSpeed's as configured (capacity, token dropping, second-expert
    sampling). In eval mode every token goes to its top-k experts, with no capacity limit, no noise
    and no random draw, so a token's output depends on nothing but its own hidden state: validation
    is reproducible and equals cached generation and the exported model. `eval_routing =
    "training"` (see moe_eval_routing) keeps DeepSpeed's gate in eval mode too.

    inference=True builds the plain-PyTorch layer of marjara/model/inference_moe.py instead: the
    same parameters and the same eval-mode routing, with no process group (eval mode only).

    expert_counts holds, per expert of the whole layer, how many tokens of this rank's batch the
    gate sent to it (top-k: each token counts k times).
    """

    def __init__(self, config: ModelConfig, inference: bool = False) -> None:
        super().__init__()
        self.eval_routing = "deterministic"
        self.inference = inference
        if inference:
            self.moe = InferenceMoE(config.d_model, lambda: SwiGLU(config.d_model, config.ffn_hidden_size),
                                    config.num_experts, config.top_k, config.use_residual)
            return
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
        if self.inference:
            if self.eval_routing == "training":
                raise MarjaraError("an inference model's MoE layers have no training gate to route with; "
                                   "evaluate with the deterministic routing, or build MarjaraModel(config)")
            return self.moe(x)
        ensure_expert_group(self.moe)  # an engine gives it one; a model run without an engine has none
        if self.training or self.eval_routing == "training":
            return self.moe(x)
        with deterministic_moe_gate(self.moe):
            return self.moe(x)


EVAL_ROUTINGS = ("deterministic", "training")


@contextlib.contextmanager
def moe_eval_routing(model: nn.Module, routing: str) -> Iterator[None]:
    """Within: MoE layers of `model` in eval mode route "deterministic" (every token to its top-k
    experts; the default) or "training" (DeepSpeed's gate as in training, at eval_capacity_factor:
    tokens over capacity are dropped and top-2 samples its second expert), e.g. to measure dropping."""
    if routing not in EVAL_ROUTINGS:
        raise MarjaraError(f"unknown MoE eval routing {routing!r}; choose one of {', '.join(EVAL_ROUTINGS)}")
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    saved = [layer.eval_routing for layer in layers]
    for layer in layers:
        layer.eval_routing = routing
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.eval_routing = value
