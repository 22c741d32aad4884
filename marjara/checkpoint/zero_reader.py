"""Read a model's weights out of DeepSpeed's checkpoint layouts (ZeRO 0-3, dense and MoE) as pieces.

Where the weights live, per ZeRO stage and training precision (DeepSpeed 0.19; the files'
names are in marjara.checkpoint.format):

  stage 0-2, fp32   the model states' "module": full weights, which are the fp32 masters.
  stage 1-2, bf16   rank R's optimizer states: its flat fp32 partition
                    of each parameter group ("single_partition_of_fp32_groups"); "param_slice_mappings"
                    names the slice of it each parameter occupies. Parameters spread over consecutive
                    ranks, so a parameter's fragments follow one another in rank order.
  stage 3           every rank's model states hold empty stand-ins; the fp32
                    masters are in the optim files' "fp32_flat_groups": every parameter takes
                    ceil(numel / world) elements of every rank's (virtually concatenated) groups.
  stage 0, bf16     the fp32 masters sit in the model states' optimizer without parameter names;
                    the module's bf16 weights (what the forward pass used) are exported, with a warning.
  MoE               expert weights are not in "module" but in one file per global expert,
                    already under global names. In
                    ZeRO-1/2 bf16 their fp32 masters are in the expert parameter group of the optim
                    files, under each rank's local names (mapped with param_names.global_param_name).
                    DeepSpeed's zero_to_fp32 reads neither of these.

Expert ranks: with DeepSpeed's default topology rank R holds the experts of ep_rank R % ep_size;
with "use_data_before_expert_parallelism" those of R // (world / ep_size).
"""

from __future__ import annotations

import math
import sys
from typing import Iterator

import torch

from marjara.checkpoint.format import META_FILE, Checkpoint
from marjara.checkpoint.pieces import Piece, slice_across, whole
from marjara.checkpoint.reader import load_file
from marjara.errors import MarjaraError
from marjara.model.param_names import TIED_HEAD, global_param_name, is_expert_param


class ZeroCheckpointReader:
    """Names and shapes of the tensors an export holds (global expert names; a tied output head
    left out), and the weights themselves as pieces."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        if ckpt.zero_stage not in (0, 1, 2, 3):
            raise MarjaraError(f"{ckpt.tag_dir / META_FILE} has zero_stage {ckpt.zero_stage}; expected 0, 1, 2 or 3")
        self.states = load_file(ckpt.model_states_file())
        if self.states.get("mp_world_size", 1) != 1:
            raise MarjaraError(f"{ckpt.tag_dir} was saved with model parallelism, which MARJARA does not use")
        self.module: dict[str, torch.Tensor] = self.states["module"]
        self.aliases = set(self.states.get("shared_params") or {})
        self.buffer_names = list(self.states.get("buffer_names") or [])
        self.shapes = self._shapes()

    # ---- names and shapes ----------------------------------------------------------------
    def _shapes(self) -> dict[str, torch.Size]:
        shapes: dict[str, torch.Size] = {}
        if self.ckpt.zero_stage == 3:
            if self.states.get("frozen_param_shapes"):
                raise MarjaraError(f"{self.ckpt.tag_dir} has frozen parameters under ZeRO-3, which MARJARA never trains")
            for group in self.states["param_shapes"]:
                shapes.update({name: torch.Size(shape) for name, shape in group.items()})
            shapes.update({name: self.module[name].shape for name in self.buffer_names})
        else:
            shapes.update({name: t.shape for name, t in self.module.items() if name not in self.aliases})
        for layer, expert in self._expert_files():
            expert_states = load_file(self.ckpt.expert_file(layer, expert))
            shapes.update({name: t.shape for name, t in expert_states.items()})
        if self.ckpt.config.tie_embeddings:
            # ZeRO-0 saves the tied head as a tensor of its own (ZeRO 1-3 list it in shared_params).
            shapes.pop(TIED_HEAD, None)
        return dict(sorted(shapes.items(), key=lambda item: _natural_key(item[0])))

    def _expert_files(self) -> list[tuple[int, int]]:
        counts = self.states.get("num_experts") or []
        return [(layer, expert) for layer, count in enumerate(counts) for expert in range(count)]

    @property
    def trainable_names(self) -> set[str]:
        groups = self.states.get("param_shapes") or []
        return {name for group in groups for name in group}

    def check_readable(self) -> None:
        """Open (without reading tensors) every file `pieces` will read, so a missing or truncated
        file is reported before anything is written."""
        if self.ckpt.zero_stage == 3 or (self.ckpt.zero_stage in (1, 2) and self.ckpt.half_precision):
            for rank in range(self.ckpt.world_size):
                load_file(self.ckpt.optim_states_file(rank), deepspeed_objects=True)

    # ---- pieces --------------------------------------------------------------------------
    def pieces(self) -> Iterator[Piece]:
        stage, half = self.ckpt.zero_stage, self.ckpt.half_precision
        if stage == 3:
            yield from self._zero3_pieces()
        elif stage in (1, 2) and half:
            yield from self._partition_pieces()
        else:
            if half:
                print(
                    f"warning: {self.ckpt.tag_dir} is a ZeRO-0 {self.ckpt.meta.dtype} checkpoint, whose fp32 master "
                    "weights carry no parameter names; exporting the module's "
                    f"{self.ckpt.meta.dtype} weights (those the forward pass used)",
                    file=sys.stderr,
                )
            yield from self.module_pieces(self.shapes)
            yield from self._expert_pieces()

    def module_pieces(self, names) -> Iterator[Piece]:
        """Full tensors of the rank-0 module dict (ZeRO 0-2 weights, buffers at every stage)."""
        for name in names:
            if name in self.module and not is_expert_param(name):
                yield whole(name, self.module[name])

    def buffer_pieces(self) -> Iterator[Piece]:
        yield from self.module_pieces(self.buffer_names)

    def _expert_pieces(self) -> Iterator[Piece]:
        for layer, expert in self._expert_files():
            expert_states = load_file(self.ckpt.expert_file(layer, expert))
            for name, tensor in expert_states.items():
                yield whole(name, tensor)
            del expert_states

    def _partition_pieces(self) -> Iterator[Piece]:
        """ZeRO-1/2 fp32 master partitions, one rank's file at a time."""
        ckpt, config = self.ckpt, self.ckpt.config
        filled: dict[str, int] = {}
        local_experts = config.num_experts // config.ep_size if config.use_moe else 1
        for rank in range(ckpt.world_size):
            optim = load_file(ckpt.optim_states_file(rank), deepspeed_objects=True)["optimizer_state_dict"]
            if "param_slice_mappings" not in optim:
                raise MarjaraError(
                    f"{ckpt.tag_dir}: optimizer files lack param_slice_mappings (DeepSpeed older than 0.8?); "
                    "re-save the checkpoint with DeepSpeed 0.19"
                )
            partitions = optim["single_partition_of_fp32_groups"]
            for group, mapping in enumerate(optim["param_slice_mappings"]):
                for local_name, fragment in mapping.items():
                    name = local_name
                    if is_expert_param(local_name):
                        name = global_param_name(local_name, self._ep_rank(rank), local_experts)
                    offset = filled.get(name, 0)
                    filled[name] = offset + fragment.numel
                    yield Piece(name, offset, partitions[group].narrow(0, fragment.start, fragment.numel))
            del optim, partitions
        # Frozen parameters and buffers are not in the optimizer; the module holds them whole.
        trainable = self.trainable_names | set(filled)
        yield from self.module_pieces([n for n in self.shapes if n not in trainable])

    def _zero3_pieces(self) -> Iterator[Piece]:
        ckpt, world = self.ckpt, self.ckpt.world_size
        order = [(name, torch.Size(shape)) for group in self.states["param_shapes"] for name, shape in group.items()]
        for rank in range(world):
            optim = load_file(ckpt.optim_states_file(rank), deepspeed_objects=True)["optimizer_state_dict"]
            flat = list(optim["fp32_flat_groups"])
            position = 0
            for name, shape in order:
                share = math.ceil(shape.numel() / world)
                start = rank * share
                keep = max(0, min(share, shape.numel() - start))  # the last ranks' shares are padded
                for within, values in slice_across(flat, position, keep):
                    yield Piece(name, start + within, values)
                position += share
            available = sum(t.numel() for t in flat)
            if position != available:
                raise MarjaraError(
                    f"{ckpt.tag_dir}: rank {rank}'s ZeRO-3 partition has {available} elements but the parameter "
                    f"shapes need {position}; the files are not from one checkpoint"
                )
            del optim, flat
        yield from self.buffer_pieces()

    def _ep_rank(self, rank: int) -> int:
        ep_size = self.ckpt.config.ep_size
        if (self.states.get("ds_config") or {}).get("use_data_before_expert_parallelism"):
            return rank // (self.ckpt.world_size // ep_size)
        return rank % ep_size


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]
