"""Names of parameters as an exported (single-process, ep_size 1) model sees them.

Under expert parallelism each rank holds num_experts / ep_size experts and numbers them locally
from 0; expert e of rank r is global expert r * local_experts + e. Checkpoints, EMA and exported
models all use the global numbering. Loading checks a folder's names and shapes against the
model's here (check_matches), whichever layout the folder has.
"""

from __future__ import annotations

import re

import torch

from marjara.errors import MarjaraError

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


def check_matches(targets: dict, shapes: dict[str, torch.Size], where: str, fix: str) -> None:
    """Strict loading: the same names with the same shapes (targets: tensors or shapes), or one line
    naming the first differences."""
    missing, unexpected = sorted(set(targets) - set(shapes)), sorted(set(shapes) - set(targets))
    if missing or unexpected:
        raise MarjaraError(
            f"{where} does not match the model config (missing: {', '.join(missing[:3]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:3]) or 'none'}); {fix}"
        )
    for name, target in targets.items():
        needed = torch.Size(getattr(target, "shape", target))
        if torch.Size(shapes[name]) != needed:
            raise MarjaraError(
                f"{where}: {name} has shape {list(shapes[name])}, the config needs {list(needed)}; {fix}"
            )
