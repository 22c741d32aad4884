"""Exponential moving average of the weights, sharded like the model under ZeRO.

DeepSpeed has no EMA. Here every rank keeps fp32 EMA values only for what it owns:
- ZeRO 0-2 ("replicated" layout): parameters are replicas within their data-parallel group (the
  whole world for dense ones, the expert-data-parallel group for experts), so each parameter is
  assigned to one rank of its group, balancing sizes; that rank alone keeps its EMA.
- ZeRO-3 ("zero3_shards" layout): each rank keeps the EMA of its own partition (`ds_tensor`) of
  every parameter, updated from that partition after each step: no gather, ever.
Memory per rank is therefore about its share of the model, and no step's update is lost: each
value is updated from the weights the optimizer just wrote.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from marjara import distributed
from marjara.checkpoint.format import EMA_REPLICATED as REPLICATED
from marjara.checkpoint.format import EMA_ZERO3_SHARDS as ZERO3_SHARDS
from marjara.checkpoint.format import EmaMeta
from marjara.compat.deepspeed import zero3_persistent
from marjara.compat.deepspeed_moe import expert_groups
from marjara.compat.deepspeed_moe import local_experts as experts_held
from marjara.model.param_names import global_param_name, is_expert_param


def _expert_group_info(param: nn.Parameter):
    """(data-parallel group of this expert, its size, this rank's index in it, expert-parallel rank)."""
    dp_group, ep_rank = expert_groups(param)
    return dp_group, dist.get_world_size(dp_group), dist.get_rank(dp_group), ep_rank


class WeightEMA:
    def __init__(self, module: nn.Module, decay: float, zero_stage: int) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.layout = ZERO3_SHARDS if zero_stage == 3 else REPLICATED
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        local_experts = _local_experts(module)
        # name -> (source tensor to average, group, owner's global rank)
        self._sources: dict[str, torch.Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}
        self._owner: dict[str, tuple[object, int]] = {}
        self.shapes: dict[str, list[int]] = {}
        load: dict[object, list[int]] = {}
        for local_name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            ep_rank = 0
            if is_expert_param(local_name):
                group, size, my_index, ep_rank = _expert_group_info(param)
            else:
                group, size, my_index = None, self.world_size, self.rank
            name = global_param_name(local_name, ep_rank, local_experts)
            self._params[name] = param
            self.shapes[name] = list(getattr(param, "ds_shape", param.shape))
            if self.layout == ZERO3_SHARDS:
                self._sources[name] = param.ds_tensor
                continue
            loads = load.setdefault(group, [0] * size)
            owner_index = min(range(size), key=lambda r: (loads[r], r))
            loads[owner_index] += param.numel()
            owner_rank = dist.get_global_rank(group, owner_index) if group is not None else owner_index
            self._owner[name] = (group, owner_rank)
            if owner_index == my_index:
                self._sources[name] = param
        with torch.no_grad():
            self.values = {name: src.detach().float().clone() for name, src in self._sources.items()}
        self._names = list(self.values)

    @torch.no_grad()
    def update(self) -> None:
        if not self._names:
            return
        ema = [self.values[n] for n in self._names]
        current = [self._sources[n].detach().float() for n in self._names]
        torch._foreach_lerp_(ema, current, 1.0 - self.decay)

    # ---- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ema": dict(self.values), "ema_shapes": dict(self.shapes)}

    def meta(self) -> EmaMeta:
        return EmaMeta(self.decay, self.layout)

    @torch.no_grad()
    def load_own(self, state: dict) -> None:
        """Restore from this rank's own file of a checkpoint saved with the same world and layout."""
        missing = set(self.values) - set(state["ema"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:3]}")
        for name, value in self.values.items():
            value.copy_(state["ema"][name])

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Restore from full (merged) EMA tensors: each rank takes what it owns."""
        for name, value in self.values.items():
            if self.layout == REPLICATED:
                value.copy_(full[name].reshape(value.shape))
            else:
                flat = full[name].reshape(-1)
                start = self.rank * value.numel()
                piece = flat[start:start + value.numel()]
                value.zero_()
                value[: piece.numel()].copy_(piece)

    # ---- evaluation with the EMA weights ------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA values into the model's weights (for evaluation)."""
        backups = {}
        with torch.no_grad():
            for name, param in self._params.items():
                if self.layout == ZERO3_SHARDS and zero3_persistent(param):
                    # Small parameters ZeRO-3 keeps whole on every rank: rebuild them from the shards.
                    backups[name] = (param.data.clone(), param.ds_tensor.detach().clone())
                    param.data.copy_(self._gather_full(name).to(param.dtype))
                    param.ds_tensor.copy_(self.values[name])
                    continue
                target = param.ds_tensor if self.layout == ZERO3_SHARDS else param
                backups[name] = target.detach().clone()
                if self.layout == ZERO3_SHARDS:
                    target.copy_(self.values[name])
                    continue
                group, owner = self._owner[name]
                if owner == self.rank:
                    target.copy_(self.values[name])
                distributed.broadcast_(target, src=owner, group=group)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._params.items():
                    if isinstance(backups[name], tuple):
                        param.data.copy_(backups[name][0])
                        param.ds_tensor.copy_(backups[name][1])
                        continue
                    target = param.ds_tensor if self.layout == ZERO3_SHARDS else param
                    target.copy_(backups[name])

    def _gather_full(self, name: str) -> torch.Tensor:
        pieces = distributed.all_gather(self.values[name])
        numel = int(torch.Size(self.shapes[name]).numel())
        return torch.cat(pieces)[:numel].reshape(self.shapes[name]).to(self.values[name].device)


def _local_experts(module: nn.Module) -> int:
    from deepspeed.moe.layer import MoE

    for sub in module.modules():
        if isinstance(sub, MoE):
            return len(experts_held(sub))
    return 1
