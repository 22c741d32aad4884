"""Putting a run together: the model's config, the model, and the DeepSpeed engine around it."""

from __future__ import annotations

import logging
import warnings

from marjara.model import MarjaraModel
from marjara.model.config import PRESETS, ModelConfig
from marjara.train.checkpointing import checkpoint_function
from marjara.train.config import TrainConfig
from marjara.train.engine import initialize_engine
from marjara.train.optim import build_adamw, parameter_groups, warmup_cosine

VOCAB_MULTIPLE = 64
MOE_FIELDS = ("num_experts", "top_k", "ep_size", "capacity_factor", "eval_capacity_factor", "min_capacity",
              "moe_layer_freq", "use_residual", "aux_loss_coef")


def quiet_libraries(this_rank: int) -> None:
    """DeepSpeed logs at INFO on every rank, and torch warns about DeepSpeed's collectives on every
    call; MARJARA reports progress itself, from rank 0."""
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING if this_rank == 0 else logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def model_config(cfg: TrainConfig, data_vocab: int) -> ModelConfig:
    """The preset with the data's vocabulary (padded for faster matmuls) and the run's model flags."""
    overrides = dict(vocab_size=-(-data_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, dropout=cfg.dropout,
                     max_seq_len=max(cfg.seq_len, PRESETS[cfg.model_size]["max_seq_len"]))
    if cfg.use_moe:
        overrides.update(use_moe=True, **{name: getattr(cfg, name) for name in MOE_FIELDS})
    return ModelConfig.from_preset(cfg.model_size, **overrides)


def build_model(config: ModelConfig, grad_checkpointing: bool, ds_config: dict) -> MarjaraModel:
    model = MarjaraModel(config)
    # Lets DeepSpeed's ds_to_universal convert ZeRO-1/2 checkpoints for another world size.
    model.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
    if grad_checkpointing:
        model.checkpoint_fn = checkpoint_function(ds_config)
    return model


def build_engine(model: MarjaraModel, cfg: TrainConfig, ds_config: dict, mpu=None):
    """The DeepSpeed engine around the model -> (engine, each parameter group's hyper-parameters).
    Without an optimizer / scheduler in the JSON, MARJARA's AdamW and warmup + cosine are used.
    mpu: the sequence-parallel groups (marjara/train/sequence_parallel.py), or None."""
    groups = parameter_groups(model, cfg.weight_decay)
    # ZeRO-0 in fp32 is the one case where DeepSpeed runs the client optimizer without checking the
    # gradient norm itself (see marjara/train/nonfinite.py).
    skip = cfg.zero_stage == 0 and cfg.mixed_precision == "fp32"
    optimizer = None if cfg.optimizer_in_json else build_adamw(groups, cfg, skip_non_finite=skip)
    def cosine(opt):
        return warmup_cosine(opt, cfg.warmup_steps, cfg.max_steps, cfg.min_lr / cfg.lr)

    scheduler = None if cfg.scheduler_in_json else cosine
    engine = initialize_engine(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                               model_parameters=groups if optimizer is None else None, config=ds_config,
                               **({"mpu": mpu} if mpu is not None else {}))
    return engine, [{k: v for k, v in g.items() if k != "params"} for g in groups]


def compile_model(engine, config: ModelConfig, report) -> None:
    if config.use_moe:
        report.print("--compile: torch.compile cannot trace DeepSpeed's MoE layers (data-dependent "
                     "all-to-all); training uncompiled")
        return
    engine.compile()
    report.print("--compile: the model runs under torch.compile; the first step includes compiling it")
