"""Every place MARJARA reaches into DeepSpeed's or lm-eval's internals, and why.

Each patch below says what it changes and why, names the upstream issue or PR where there is one,
and checks the installed version against the range it was written and tested for (TESTED): outside
it, a loud warning on stderr, once per process, says which patches may have stopped working. The
patches still apply there; tests/test_compat.py (and the tests each names) fail when one stops
taking effect, which is how a new DeepSpeed or lm-eval gets admitted to TESTED.

Nothing else in marjara/ touches a private name of either library.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Iterator

import torch

from marjara.errors import MarjaraError

# package -> (lowest tested version, first untested one); pyproject.toml's bounds match.
TESTED = {"deepspeed": ("0.19.8", "0.20"), "lm-eval": ("0.4.13", "0.4.14")}
PATCHES = {
    "deepspeed": "ZeRO-3 fp32 masters shared with the partitions, the one-rank ZeRO-0 all-reduce skip, expert "
                 "process groups for a model run without an engine, expert-parallel ranks before the engine, the "
                 "ZeRO-0 fp16 loss scaling, the universal-checkpoint optimizer repair, deterministic MoE routing in eval mode, the Ulysses "
                 "sequence-parallel groups (mpu) and their gradient scale",
    "lm-eval": "skipping the built-in task index when every task is local",
}
_warned: set[str] = set()


@functools.lru_cache(maxsize=None)
def installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def version_guard(package: str) -> bool:
    """Whether the installed `package` is one these patches were tested with; if not, say so
    loudly (once per process, from rank 0 only)."""
    from packaging.version import Version

    installed = installed_version(package)
    low, high = TESTED[package]
    if installed is not None and Version(low) <= Version(installed) < Version(high):
        return True
    if package not in _warned:
        _warned.add(package)
        if os.environ.get("RANK", "0") != "0":
            return False
        print(f"WARNING: {package} {installed} is installed, but marjara/compat.py patches {package}'s internals "
              f"as tested with {package} >= {low}, < {high} ({PATCHES[package]}); they may no longer take effect. "
              f"Install {package}=={low}, or run tests/test_compat.py before trusting this run.",
              file=sys.stderr, flush=True)
    return False


# ---- DeepSpeed ------------------------------------------------------------------------------

def share_zero3_fp32_masters() -> None:
    """ZeRO-3 means to use the parameter partitions themselves as the optimizer's fp32 masters when
    they already are fp32 on the optimizer's device (https://github.com/deepspeedai/DeepSpeed/pull/7651),
    but it tests `partition.device == self.device` with self.device the accelerator's device *name*
    ('cpu', 'cuda:0'): a torch.device never equals a str, so every fp32 run keeps a second fp32
    copy of its partition. Make that test compare devices; DeepSpeed's copy from master to
    partition after each step becomes a no-op on the shared tensor. (offload_states/reload_states,
    which MARJARA does not call, would split the two again: correct values, two copies.)
    Test: tests/test_engine.py (the masters are the partitions; losses and resume unchanged)."""
    version_guard("deepspeed")
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = getattr(Stage3, "_create_fp32_partitions", None)
    if original is None or getattr(original, "compares_devices", False):
        return

    @functools.wraps(original)
    def create_fp32_partitions(self):
        name = self.device
        if self.offload_optimizer or not isinstance(name, str):
            return original(self)
        self.device = torch.device(name)
        try:
            return original(self)
        finally:
            self.device = name

    create_fp32_partitions.compares_devices = True
    Stage3._create_fp32_partitions = create_fp32_partitions


def skip_single_rank_allreduce(engine) -> None:
    """With one data-parallel rank, ZeRO-0's gradient all-reduce only copies every gradient
    through flat buckets and back: turn the engine's backward all-reduce off (ZeRO 1-3 move the
    gradients into their partitions in that step, so they keep it). No upstream issue.
    Test: tests/test_compat.py (a one-rank ZeRO-0 backward calls no all-reduce)."""
    version_guard("deepspeed")
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


def ensure_expert_group(moe_layer) -> None:
    """DeepSpeed's engine hands every MoE layer its expert-parallel group when it wraps the model
    (engine.py calls MoE.set_deepspeed_parallelism); a model run without an engine (inference,
    evaluation, tests) has none, and its MoE forward fails. Give the layer DeepSpeed's default
    topology's group, from the process group the caller set up (marjara.distributed).
    Test: tests/test_compat.py (a one-rank MoE model gets its group and runs)."""
    if moe_layer.deepspeed_moe.ep_group is None:
        version_guard("deepspeed")
        moe_layer.set_deepspeed_parallelism()


def expert_groups(group_name: str):
    """(expert-data-parallel group, expert-parallel rank) of the experts named `group_name`: the
    ranks holding replicas of these experts, and which slice of the experts this rank holds.
    DeepSpeed keeps both behind private accessors of deepspeed.utils.groups; the EMA needs them
    to give each replicated expert one owner. Test: tests/test_compat.py, and the 2-rank MoE EMA
    runs in tests/test_train_distributed.py."""
    version_guard("deepspeed")
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(group_name), groups._get_expert_parallel_rank(group_name)


def expert_parallel_rank(moe_layer, use_data_before_expert_parallelism: bool = False) -> int:
    """This rank's expert-parallel rank for `moe_layer` (a deepspeed.moe.layer.MoE), creating
    DeepSpeed's expert groups first where they do not exist yet, the way
    MoE.set_deepspeed_parallelism would (the engine then finds them made). The layer's own group
    handle is left for the engine to set, which DeepSpeed allows once only. Weight loading and
    expert initialisation need the rank before the engine exists; DeepSpeed keeps group creation
    and the rank behind private functions of deepspeed.utils.groups.
    Test: tests/test_expert_init.py, tests/test_init_from_distributed.py (2 ranks, ep 2)."""
    version_guard("deepspeed")
    from deepspeed.utils import groups

    name = moe_layer.expert_group_name
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            moe_layer.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallelism)
    return groups._get_expert_parallel_rank(name)


def engine_leaves_loss_unscaled(optimizer) -> bool:
    """DeepSpeed's engine.backward scales the loss only for ZeRO optimizers (`isinstance(optimizer,
    ZeROOptimizer)`, deepspeed/runtime/engine.py), yet ZeRO-0's fp16 optimizers (FP16_Optimizer,
    FP16_UnfusedOptimizer) still divide the gradients by their scale in step() and look for
    overflow there: under ZeRO-0 fp16 the gradients come out 1/scale too small, underflow, and
    overflow is never detected. True for exactly those optimizers. No upstream issue known.
    Test: tests/test_loss_scale.py (fails if DeepSpeed starts scaling them itself)."""
    version_guard("deepspeed")
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    config = getattr(optimizer, "loss_scale_config", None)
    return (not isinstance(optimizer, ZeROOptimizer) and config is not None
            and getattr(config, "use_grad_scaling", False) and not getattr(optimizer, "custom_loss_scaler", False))


def loss_for_backward(engine, loss: torch.Tensor, unscaled: bool | None = None) -> torch.Tensor:
    """What to pass to engine.backward: the loss, times the loss scale where the engine would not
    apply it. `unscaled`: engine_leaves_loss_unscaled(engine.optimizer), which a training loop
    decides once (it is fixed for the engine's life; the scale itself is read every time)."""
    if unscaled is None:
        unscaled = engine_leaves_loss_unscaled(engine.optimizer)
    if unscaled:
        return loss.float() * engine.optimizer.loss_scale
    return loss


def repair_universal_optimizer(engine, group_hparams: list[dict]) -> None:
    """DeepSpeed's universal-checkpoint load (ZeRO-3 with several parameter groups) gives every
    group the same `step` tensor object, which torch's AdamW then advances once per group, and
    copies group 0's hyper-parameters (weight_decay ...) onto every group: the resumed loss
    drifts. Give each state its own step and each group its own hyper-parameters back, from
    `group_hparams` (the groups as built, without their params). No upstream issue known.
    Test: tests/test_compat.py (per-group weight decay and steps after a universal load)."""
    version_guard("deepspeed")
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group, hparams in zip(inner.param_groups, group_hparams):
        group["weight_decay"] = hparams["weight_decay"]
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# Gate settings that send every token to its top-k experts (see deterministic_moe_gate).
DETERMINISTIC_GATE = {"drop_tokens": False, "min_capacity": 0, "use_rts": False, "top2_2nd_expert_sampling": False}


@contextlib.contextmanager
def deterministic_moe_gate(moe_layer) -> Iterator[None]:
    """Within: the deepspeed.moe.layer.MoE `moe_layer` sends every token to its top-k experts, with
    no capacity limit, no token dropping and no random draw; its gate's own settings come back on
    exit. DeepSpeed's TopKGate routes an eval-mode forward much like a training one: it passes
    `top2_2nd_expert_sampling` to top2gating whatever `self.training` is, so top-2 draws its second
    expert with Gumbel noise in eval too (https://github.com/deepspeedai/DeepSpeed/pull/8620, open);
    with `drop_tokens` it keeps at most max(ceil(S / E * k * eval_capacity_factor), min_capacity)
    tokens per expert, so a token's output depends on its batch-mates (and, with `use_rts`, on
    which ones torch's global generator picks); and top1gating refuses batches of fewer than
    `min_capacity` tokens. Without dropping, the capacity is the busiest expert's load agreed over
    the expert-parallel group, so DeepSpeed's all-to-all dispatch works as before at ep_size > 1.
    The fields came with https://github.com/deepspeedai/DeepSpeed/pull/5156; a gate without one of
    them is refused in one line rather than given a field it would ignore.
    Test: tests/test_compat.py (eval routing equals an independent top-k router under any seed)."""
    version_guard("deepspeed")
    gate = moe_layer.deepspeed_moe.gate
    missing = [name for name in DETERMINISTIC_GATE if not hasattr(gate, name)]
    if missing:
        raise MarjaraError(
            f"DeepSpeed {installed_version('deepspeed')}'s MoE gate has no {', '.join(missing)}: MARJARA's "
            f"deterministic eval routing (marjara/compat.py) needs updating for it; install "
            f"deepspeed=={TESTED['deepspeed'][0]}")
    saved = {name: getattr(gate, name) for name in DETERMINISTIC_GATE}
    for name, value in DETERMINISTIC_GATE.items():
        setattr(gate, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(gate, name, value)


# ---- DeepSpeed: Ulysses sequence parallelism (one block; see marjara/train/sequence_parallel.py) ----

def sequence_parallel_mpu(sp_size: int):
    """The "mpu" to hand deepspeed.initialize for Ulysses sequence parallelism over groups of
    `sp_size` consecutive ranks: DeepSpeed's own deepspeed.runtime.sequence_parallel.parallel_state_sp
    (not a public API: no documented way to give the engine sequence groups), its groups created
    once per process. Why this route: the config keys `sequence_parallel_size` / `data_parallel_size`
    build a device mesh whose gradients are never reduced across the sequence ranks (measured,
    ../shared/DEEPSPEED_NOTES.md); with this module registered as mpu the engine reduces over the
    data x sequence ranks and partitions ZeRO state over them. Upstream: none known.
    Test: tests/test_sequence_parallel_runs.py (gradients of sp 2 equal one rank's, ZeRO 0/2/3)."""
    version_guard("deepspeed")
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sp_size)
    elif mpu.get_sequence_parallel_world_size() != sp_size:
        raise MarjaraError(f"this process already has sequence groups of {mpu.get_sequence_parallel_world_size()} "
                           f"ranks; it cannot also train with --sp_size {sp_size}")
    return mpu


def sequence_gradient_scale(zero_stage: int, sp_size: int) -> float:
    """What each sequence rank's gradient must be multiplied by so that DeepSpeed's reduction yields
    the gradient of the sample's mean loss. With the parallel_state_sp mpu, ZeRO 0-2 divide the sum
    over the data x sequence ranks by the data-parallel ranks only (engine.py
    `_reduce_non_expert_gradients`: dp_world_size = seq_dp / sequence_parallel_size; stage_1_and_2
    likewise), i.e. they SUM over the sequence ranks; ZeRO-3 divides by all data x sequence ranks,
    i.e. it AVERAGES over them and needs sp_size times the gradient. Upstream: none known.
    Test: tests/test_sequence_parallel_runs.py (fails at either stage if the factor is wrong)."""
    version_guard("deepspeed")
    return float(sp_size) if zero_stage == 3 else 1.0


# ---- lm-eval --------------------------------------------------------------------------------

def skip_builtin_task_index(tasks: str, include_path: str | None) -> bool:
    """lm-eval indexes its ~230 built-in task folders on every run, seconds of YAML parsing, even
    when every requested task is a local YAML. TaskManager can skip that (include_defaults=False,
    https://github.com/EleutherAI/lm-evaluation-harness/issues/1801) but the CLI never passes it.
    When each name in `tasks` is a plain task found in `include_path`, make lm-eval's TaskManager
    default to skipping the index. Returns whether it did.
    Test: tests/test_compat.py (the CLI's own task loading then indexes no built-in task)."""
    if not include_path:
        return False
    version_guard("lm-eval")
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False).task_index
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names or any(name not in local or local[name].kind.name != "TASK" for name in names):
        return False

    class LocalTaskManager(TaskManager):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("include_defaults", False)
            super().__init__(*args, **kwargs)

    lm_eval.tasks.TaskManager = LocalTaskManager
    return True
