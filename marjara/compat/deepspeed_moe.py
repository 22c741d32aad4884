"""DeepSpeed's MoE layer (deepspeed.moe.layer.MoE) and its expert process groups, where MARJARA
needs more than the layer's documented constructor and forward. Each function says What, Why,
Upstream, Guard and Test (see marjara/compat/__init__.py)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from marjara.compat import TESTED, installed_version, version_guard
from marjara.errors import MarjaraError


def ensure_expert_group(moe_layer) -> None:
    """What: gives an MoE layer that has no expert-parallel group DeepSpeed's default topology's
    group, from the process group the caller set up (marjara.distributed).
    Why: DeepSpeed's engine hands every MoE layer its group when it wraps the model (engine.py calls
    MoE.set_deepspeed_parallelism); a model run without an engine (inference, evaluation, tests)
    has none, and its MoE forward fails.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py (a one-rank MoE model gets its group and runs)."""
    if moe_layer.deepspeed_moe.ep_group is None:
        version_guard("deepspeed")
        moe_layer.set_deepspeed_parallelism()


def local_experts(moe_layer) -> nn.ModuleList:
    """What: the experts this rank holds in `moe_layer`, in local order (local expert i is global
    expert ep_rank * len(...) + i).
    Why: DeepSpeed keeps them at moe_layer.deepspeed_moe.experts.deepspeed_experts, undocumented;
    expert initialisation draws each from its global index.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_expert_init.py (experts differ across expert-parallel ranks)."""
    version_guard("deepspeed")
    return moe_layer.deepspeed_moe.experts.deepspeed_experts


def expert_groups(param: nn.Parameter):
    """What: (expert-data-parallel group, expert-parallel rank) of the expert parameter `param`: the
    ranks holding replicas of its expert, and which slice of the experts this rank holds.
    Why: DeepSpeed names an expert parameter's group in the undocumented attribute `group_name` and
    keeps both behind private accessors of deepspeed.utils.groups; the EMA needs them to give each
    replicated expert one owner.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py, and the 2-rank MoE EMA runs in tests/test_train_distributed.py."""
    version_guard("deepspeed")
    from deepspeed.utils import groups

    name = param.group_name
    return groups._get_expert_data_parallel_group(name), groups._get_expert_parallel_rank(name)


def expert_parallel_rank(moe_layer, use_data_before_expert_parallelism: bool = False) -> int:
    """What: this rank's expert-parallel rank for `moe_layer`, creating DeepSpeed's expert groups
    first where they do not exist yet, the way MoE.set_deepspeed_parallelism would (the engine then
    finds them made). The layer's own group handle is left for the engine to set, which DeepSpeed
    allows once only.
    Why: weight loading and expert initialisation need the rank before the engine exists; DeepSpeed
    keeps group creation and the rank behind private functions of deepspeed.utils.groups.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_expert_init.py, tests/test_init_from_distributed.py (2 ranks, ep 2)."""
    version_guard("deepspeed")
    from deepspeed.utils import groups

    name = moe_layer.expert_group_name
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            moe_layer.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallelism)
    return groups._get_expert_parallel_rank(name)


# Gate settings that send every token to its top-k experts (see deterministic_moe_gate).
DETERMINISTIC_GATE = {"drop_tokens": False, "min_capacity": 0, "use_rts": False, "top2_2nd_expert_sampling": False}


@contextlib.contextmanager
def deterministic_moe_gate(moe_layer) -> Iterator[None]:
    """What: within, the MoE layer `moe_layer` sends every token to its top-k experts, with no
    capacity limit, no token dropping and no random draw; its gate's own settings come back on exit.
    Why: DeepSpeed's TopKGate routes an eval-mode forward much like a training one. It passes
    `top2_2nd_expert_sampling` to top2gating whatever `self.training` is, so top-2 draws its second
    expert with Gumbel noise in eval too; with `drop_tokens` it keeps at most
    max(ceil(S / E * k * eval_capacity_factor), min_capacity) tokens per expert, so a token's output
    depends on its batch-mates (and, with `use_rts`, on which ones torch's global generator picks);
    and top1gating refuses batches of fewer than `min_capacity` tokens. Without dropping, the
    capacity is the busiest expert's load agreed over the expert-parallel group, so DeepSpeed's
    all-to-all dispatch works as before at ep_size > 1. The fields came with
    https://github.com/deepspeedai/DeepSpeed/pull/5156; a gate without one of them is refused in
    one line rather than given a field it would ignore.
    Upstream: https://github.com/deepspeedai/DeepSpeed/pull/8620 (open; the second-expert sampling).
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py (eval routing equals an independent top-k router under any seed)."""
    version_guard("deepspeed")
    gate = moe_layer.deepspeed_moe.gate
    missing = [name for name in DETERMINISTIC_GATE if not hasattr(gate, name)]
    if missing:
        raise MarjaraError(
            f"DeepSpeed {installed_version('deepspeed')}'s MoE gate has no {', '.join(missing)}: MARJARA's "
            f"deterministic eval routing (marjara/compat/deepspeed_moe.py) needs updating for it; install "
            f"deepspeed=={TESTED['deepspeed'][0]}")
    saved = {name: getattr(gate, name) for name in DETERMINISTIC_GATE}
    for name, value in DETERMINISTIC_GATE.items():
        setattr(gate, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(gate, name, value)
