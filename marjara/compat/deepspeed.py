"""DeepSpeed's engine, optimizers, config, logger, checkpoint files and shared memory, where
MARJARA needs more than their documented API (MoE: marjara.compat.deepspeed_moe). Each function
says What, Why, Upstream, Guard and Test (see marjara/compat/__init__.py)."""

from __future__ import annotations

import functools
import os
from collections.abc import KeysView
from pathlib import Path

import torch

from marjara.compat import version_guard

# ---- patches: what DeepSpeed does, changed --------------------------------------------------


def share_zero3_fp32_masters() -> None:
    """What: ZeRO-3's test of whether a parameter partition may serve as its own fp32 master compares
    devices, not a torch.device with the accelerator's device name.
    Why: DeepSpeed means to share them when the partition already is fp32 on the optimizer's device,
    but tests `partition.device == self.device` with self.device a str ('cpu', 'cuda:0'), which a
    torch.device never equals: every fp32 run keeps a second fp32 copy of its partition. With the
    test fixed, DeepSpeed's copy from master to partition after each step is a no-op on the shared
    tensor. (offload_states/reload_states, which MARJARA does not call, would split the two again:
    correct values, two copies.)
    Upstream: none known for the device test; the sharing came with
    https://github.com/deepspeedai/DeepSpeed/pull/7651.
    Guard: version_guard("deepspeed").
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
    """What: turns the engine's backward all-reduce off under ZeRO-0 with one data-parallel rank.
    Why: there the all-reduce only copies every gradient through flat buckets and back (ZeRO 1-3
    move the gradients into their partitions in that step, so they keep it).
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py (a one-rank ZeRO-0 backward calls no all-reduce)."""
    version_guard("deepspeed")
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


def engine_leaves_loss_unscaled(engine) -> bool:
    """What: whether engine.backward will leave the fp16 loss unscaled though the optimizer unscales
    the gradients (see loss_for_backward, which scales it then).
    Why: engine.backward scales the loss only for ZeRO optimizers (`isinstance(optimizer,
    ZeROOptimizer)`, deepspeed/runtime/engine.py), yet ZeRO-0's fp16 optimizers (FP16_Optimizer,
    FP16_UnfusedOptimizer) still divide the gradients by their scale in step() and look for
    overflow there: under ZeRO-0 fp16 the gradients come out 1/scale too small, underflow, and
    overflow is never detected. True for exactly those optimizers.
    Upstream: https://github.com/deepspeedai/DeepSpeed/pull/8393 (open).
    Guard: version_guard("deepspeed").
    Test: tests/test_loss_scale.py (fails if DeepSpeed starts scaling them itself)."""
    version_guard("deepspeed")
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    optimizer = engine.optimizer
    config = getattr(optimizer, "loss_scale_config", None)
    return (not isinstance(optimizer, ZeROOptimizer) and config is not None
            and getattr(config, "use_grad_scaling", False) and not getattr(optimizer, "custom_loss_scaler", False))


def loss_for_backward(engine, loss: torch.Tensor, unscaled: bool | None = None) -> torch.Tensor:
    """What: the loss to pass to engine.backward: times the loss scale where the engine would not
    apply it. `unscaled`: engine_leaves_loss_unscaled(engine), which a training loop decides once
    (it is fixed for the engine's life; the scale itself is read every time).
    Why: see engine_leaves_loss_unscaled.
    Upstream: https://github.com/deepspeedai/DeepSpeed/pull/8393 (open).
    Guard: version_guard("deepspeed").
    Test: tests/test_loss_scale.py (ZeRO-0's gradients are scaled exactly once)."""
    if unscaled is None:
        unscaled = engine_leaves_loss_unscaled(engine)
    if unscaled:
        version_guard("deepspeed")
        return loss.float() * engine.optimizer.loss_scale
    return loss


def repair_universal_optimizer(engine, group_hparams: list[dict]) -> None:
    """What: after a universal-checkpoint load, gives each optimizer state its own `step` tensor and
    each parameter group its own hyper-parameters back, from `group_hparams` (the groups as built,
    without their params).
    Why: DeepSpeed's universal load (ZeRO-3 with several parameter groups) gives every group the
    same `step` tensor object, which torch's AdamW then advances once per group, and copies group
    0's hyper-parameters (weight_decay ...) onto every group: the resumed loss drifts.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py (per-group weight decay and steps after a universal load)."""
    version_guard("deepspeed")
    inner = inner_optimizer(engine)
    for group, hparams in zip(inner.param_groups, group_hparams):
        group["weight_decay"] = hparams["weight_decay"]
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# ---- accessors: what DeepSpeed holds under names it does not document -----------------------


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """What: the torch optimizer inside the engine's optimizer wrapper (ZeRO's, FP16_Optimizer), or
    the engine's optimizer itself where there is no wrapper.
    Why: its param_groups and state (the tensors it updates) are what the memory measurement and
    the universal-load repair read; DeepSpeed documents only engine.optimizer.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_plan_measured.py (measured model states equal the engine's), tests/test_compat.py."""
    version_guard("deepspeed")
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def zero3_persistent(param: torch.nn.Parameter) -> bool:
    """What: whether ZeRO-3 keeps `param` whole on every rank (below stage3_param_persistence_threshold).
    Why: such a parameter's memory is its partition plus the whole tensor; DeepSpeed marks it with
    the undocumented attribute `ds_persist`.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_plan_measured.py (ZeRO-3's measured states equal the plan's)."""
    version_guard("deepspeed")
    return bool(getattr(param, "ds_persist", False))


def learning_rate(engine) -> float:
    """What: the learning rate of the engine's first parameter group, as its scheduler set it.
    Why: the engine's get_lr() is undocumented; with a DeepSpeed scheduler it is the one source.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py (without a DeepSpeed scheduler, the optimizer's rate)."""
    version_guard("deepspeed")
    return engine.get_lr()[0]


def global_grad_norm(engine):
    """What: the gradient norm DeepSpeed computed for the last optimizer step, or None where it
    computes none (plain fp32 data parallelism).
    Why: the engine's get_global_grad_norm() is undocumented.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py (under ZeRO-1 it equals the norm of the gradients)."""
    version_guard("deepspeed")
    return engine.get_global_grad_norm()


def skipped_steps(engine) -> int:
    """What: how many optimizer steps the engine skipped for an fp16 overflow since it started.
    Why: the engine's skipped_steps counter is undocumented.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_loss_scale.py (an overflow is counted), tests/test_compat.py."""
    version_guard("deepspeed")
    return int(engine.skipped_steps)


def current_loss_scale(optimizer) -> float | None:
    """What: fp16's dynamic loss scale now, from any optimizer DeepSpeed wraps for it; None when the
    optimizer scales no loss (bf16, fp32).
    Why: ZeRO 1-3 optimizers have `cur_scale` and `loss_scale`; ZeRO-0's FP16_Optimizer (fused, on
    GPUs) and FP16_UnfusedOptimizer only `loss_scale` (a property over their loss-scale config), so
    that is read; `loss_scaler.cur_scale` backs up an optimizer that has neither. None is documented.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_loss_scale.py (the scale halves on an overflow at every ZeRO stage)."""
    version_guard("deepspeed")
    scale = getattr(optimizer, "loss_scale", None)
    if scale is None:
        scale = getattr(getattr(optimizer, "loss_scaler", None), "cur_scale", None)
    return None if scale is None else float(scale)


def release_engine(engine) -> None:
    """What: removes the engine's hooks, which keep its process groups alive, before shutdown.
    Why: the engine's destroy() is undocumented; without it the groups outlive the process group.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py (releasing a ZeRO-3 engine removes the hooks it put on the model)."""
    version_guard("deepspeed")
    engine.destroy()


def quiet_logger(level: int) -> None:
    """What: sets the level of DeepSpeed's own logger (INFO lines on every rank by default).
    Why: MARJARA reports progress itself, from rank 0; `deepspeed.utils.logger` is undocumented.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_compat.py (the logger DeepSpeed logs to gets the level)."""
    version_guard("deepspeed")
    from deepspeed.utils import logger

    logger.setLevel(level)


def non_reentrant_checkpoint():
    """What: DeepSpeed's non-re-entrant activation checkpoint function.
    Why: the documented deepspeed.checkpointing.checkpoint is the re-entrant one, which silently
    drops the parameter gradients of blocks none of whose inputs require grad.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_activation_checkpointing.py (losses and gradients equal the plain run's)."""
    version_guard("deepspeed")
    import deepspeed  # deepspeed.checkpointing is an attribute of the package, not a module

    return deepspeed.checkpointing.non_reentrant_checkpoint


def checkpoint_pickle_classes() -> list:
    """What: the three DeepSpeed classes ZeRO optimizer files pickle besides tensors and containers
    (LossScaler, ZeroStageEnum, fragment_address), for torch.serialization.safe_globals.
    Why: allowing exactly these lets every DeepSpeed 0.19 checkpoint file be read with
    torch.load(weights_only=True); no file needs weights_only=False. Their modules are internal.
    Upstream: https://github.com/deepspeedai/DeepSpeed/issues/8500 (DeepSpeed's own weights-only
    load refuses ZeroStageEnum).
    Guard: version_guard("deepspeed").
    Test: tests/test_convert.py (ZeRO 1-3 checkpoints convert)."""
    version_guard("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@functools.lru_cache(maxsize=1)
def config_keys_read() -> frozenset[str]:
    """What: every top-level key DeepSpeedConfig looks up, found by letting it read a config that
    records each lookup (so the list follows the installed DeepSpeed, never a copy of it).
    Why: DeepSpeed ignores unknown top-level keys silently and documents no list of them; this
    relies on how DeepSpeedConfig reads its dict (get, in, [], keys()).
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_ds_config.py (a misspelt top-level key is refused, every shipped config passes)."""
    version_guard("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class _Keys(KeysView):
        def __contains__(self, key):
            seen.add(key)
            return key in self._mapping

    class _Recording(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def keys(self):
            return _Keys(self)

    DeepSpeedConfig(_Recording(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return frozenset(key for key in seen if isinstance(key, str))


def config_model_fields(title: str, inner: tuple[str, ...]) -> set[str]:
    """What: field names and aliases of DeepSpeed's pydantic config model called `title`, or of its
    nested model at `inner`; empty where there is none.
    Why: a validation error names the model; the nearest field name is suggested from it. The models
    derive from the undocumented deepspeed.runtime.config_utils.DeepSpeedConfigModel.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_ds_config.py (an unknown key inside a block gets "did you mean")."""
    version_guard("deepspeed")
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    model = next((cls for cls in subclasses(DeepSpeedConfigModel) if cls.__name__ == title), None)
    for part in inner:
        if model is None:
            return set()
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, DeepSpeedConfigModel)), None)
    if model is None:
        return set()
    return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


def shm_buffer_path(rank: int) -> Path:
    """What: the shared-memory file DeepSpeed's CPU comm op creates for `rank` when every rank is on
    one node (LOCAL_SIZE == world size): /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>,
    named in DeepSpeed's csrc/cpu/comm/shm.cpp.
    Why: DeepSpeed never removes it (66 MiB a rank); each rank removes its own at exit.
    Upstream: none known.
    Guard: version_guard("deepspeed").
    Test: tests/test_reliability_runs.py (no buffer is left after a 2-rank run)."""
    version_guard("deepspeed")
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")

