"""Initial expert weights that depend on the global expert, not on the rank holding it.

DeepSpeed's MoE layer makes its local experts as copies of one module and the model's
initialisation then draws them from the global RNG, which every rank seeds alike: under expert
parallelism local expert i of every expert-parallel rank starts from the same draw, so global
experts e and e + local_count start bit-identical. Drawing each expert from a generator seeded by
(seed, layer, global expert index) makes experts distinct across the ranks of an expert-parallel
group, identical across the data-parallel replicas of the same expert, and the same whatever
ep_size is. Dense weights are not touched (identical on every rank), nor is the global RNG.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def _generator(seed: int, layer: int, expert: int) -> torch.Generator:
    digest = hashlib.sha256(f"marjara-expert/{seed}/{layer}/{expert}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def init_experts(model: nn.Module, seed: int, use_data_before_expert_parallelism: bool = False) -> None:
    """Re-draw every expert matrix of `model` (a MarjaraModel) from its global expert's generator
    (the expert-parallel rank comes from DeepSpeed's groups, made here if need be: see
    marjara.compat.deepspeed_moe.expert_parallel_rank; pass the run's use_data_before_expert_parallelism)."""
    from marjara.compat.deepspeed_moe import expert_parallel_rank, local_experts

    for block in model.blocks:
        if not block.is_moe:
            continue
        moe = block.ffn.moe
        ep_rank = expert_parallel_rank(moe, use_data_before_expert_parallelism)
        experts = local_experts(moe)
        for index, expert in enumerate(experts):
            generator = _generator(seed, block.layer, ep_rank * len(experts) + index)
            for name, param in expert.named_parameters():
                if param.dim() < 2:
                    continue  # SwiGLU experts have no vectors; a bias would stay as initialised
                std = model.init_std_for(name)
                draw = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
                param.copy_(draw)
