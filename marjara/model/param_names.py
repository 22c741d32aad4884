"""Names of parameters as an exported (single-process, ep_size 1) model sees them.

Under expert parallelism each rank holds num_experts / ep_size experts and numbers them locally
from 0; expert e of rank r is global expert r * local_experts + e. Checkpoints, EMA and exported
models all use the global numbering.
"""

from __future__ import annotations

import re

# The output head's weight, which is the embedding's when the config ties them: exports and
# checkpoint readers leave it out (safetensors refuses shared tensors) and re-tie it on load.
TIED_HEAD = "lm_head.weight"
EXPERT_PATTERN = re.compile(r"(.*\.deepspeed_experts\.)(\d+)(\..*)")


def is_expert_param(name: str) -> bool:
    return EXPERT_PATTERN.match(name) is not None


def global_param_name(local_name: str, ep_rank: int, local_experts: int) -> str:
    match = EXPERT_PATTERN.match(local_name)
    if match is None:
        return local_name
    head, index, tail = match.groups()
    return f"{head}{ep_rank * local_experts + int(index)}{tail}"
