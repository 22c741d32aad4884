"""Which function recomputes a transformer block in backward (--grad_checkpointing), and where
the block inputs it keeps live (--offload_activations).

- ZeRO 0-2, inputs kept on the device: DeepSpeed's non-re-entrant checkpoint, configured by the
  JSON's activation_checkpointing block.
- ZeRO-3: torch's non-re-entrant checkpoint. DeepSpeed's (0.19.8) fails in backward under ZeRO-3
  ("The size of tensor a (0) must match the size of tensor b (...)": it recomputes with a weight
  ZeRO-3 has already released), torch's recomputes through the module's own forward, whose hooks
  gather the weights again.
- --offload_activations (= activation_checkpointing.cpu_checkpointing): torch's non-re-entrant
  checkpoint under torch.autograd.graph.save_on_cpu. That checkpoint saves only the block's
  inputs, through the saved-tensor hooks, so exactly those go to CPU memory (pinned on a GPU) and
  come back for the recomputation. On a CPU-only run the copy is to the same memory: correct and
  tested for equality, no saving.
Either variant is non-re-entrant: the re-entrant ones silently drop the parameter gradients of
blocks none of whose inputs require grad.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from marjara.compat.deepspeed import non_reentrant_checkpoint


def _torch_checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def _offloaded_checkpoint(function, *args):
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, use_reentrant=False)


def checkpoint_function(ds_config: dict) -> Callable:
    """checkpoint_fn(function, *args) for MarjaraModel, per the merged DeepSpeed config."""
    block = ds_config.get("activation_checkpointing", {})
    if block.get("cpu_checkpointing", False):
        return _offloaded_checkpoint
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        return _torch_checkpoint
    import deepspeed

    deepspeed.checkpointing.configure(
        None, partition_activations=block.get("partition_activations", False),
        synchronize=block.get("synchronize_checkpoint_boundary", False), profile=block.get("profile", False))
    return non_reentrant_checkpoint()
