"""The end-of-run check that data-parallel replicas hold bit-identical weights."""

from __future__ import annotations

import hashlib

import torch

from marjara import distributed
from marjara.model.param_names import is_expert_param


def verify_replicas(model: torch.nn.Module, world: int, zero_stage: int, report) -> None:
    """Data-parallel replicas must end bit-identical; a silent divergence would waste the run.
    (ZeRO-3 ranks hold different shards, and experts differ between expert-parallel ranks.)
    The gather runs at world size 1 too: one path whatever the world."""
    if zero_stage == 3:
        return
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if not is_expert_param(name):
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = torch.tensor([int.from_bytes(digest.digest()[:8], "little", signed=True)], dtype=torch.int64)
    every = [int(d.item()) for d in distributed.all_gather(mine)]
    if any(d != int(mine.item()) for d in every):
        raise RuntimeError("data-parallel replicas ended with different weights; the run is not trustworthy")
    if world > 1:
        report.print(f"weights identical on all {world} ranks")
