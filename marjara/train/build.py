"""Putting a run together: the model's config, the model, and the DeepSpeed engine around it."""

from __future__ import annotations

import logging
import warnings

from marjara.compat.deepspeed import quiet_logger
from marjara.model import MarjaraModel
from marjara.model.config import PRESETS, ModelConfig
from marjara.train.checkpointing import checkpoint_function
from marjara.train.config import TrainConfig
from marjara.train.engine import initialize_engine
from marjara.train.optim import build_adamw, parameter_groups, warmup_cosine
from marjara.train.settings import model_overrides

VOCAB_MULTIPLE = 64


def quiet_libraries(this_rank: int) -> None:
    """DeepSpeed logs at INFO on every rank, and torch warns about DeepSpeed's collectives on every
    call; MARJARA reports progress itself, from rank 0."""
    quiet_logger(logging.WARNING if this_rank == 0 else logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def model_config(cfg: TrainConfig, data_vocab: int) -> ModelConfig:
    """The preset with the data's vocabulary (padded for faster matmuls) and the run's model flags."""
    overrides = dict(vocab_size=-(-data_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
                     max_seq_len=max(cfg.data.seq_len, PRESETS[cfg.model.model_size]["max_seq_len"]),
                     **model_overrides(cfg.model))
    return ModelConfig.from_preset(cfg.model.model_size, **overrides)


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
    groups = parameter_groups(model, cfg.optim.weight_decay)
    # ZeRO-0 in fp32 is the one case where DeepSpeed runs the client optimizer without checking the
    # gradient norm itself (see marjara/train/nonfinite.py).
    skip = cfg.optim.zero_stage == 0 and cfg.optim.mixed_precision == "fp32"
    optimizer = None if cfg.optimizer_in_json else build_adamw(groups, cfg, skip_non_finite=skip)
    def cosine(opt):
        return warmup_cosine(opt, cfg.optim.warmup_steps, cfg.optim.max_steps, cfg.optim.min_lr / cfg.optim.lr)

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
