"""--init_from PATH: continued pre-training from an exported model, in MARJARA's format or a Hugging
Face Qwen3 / Qwen3-MoE folder.

The architecture comes from the folder: TrainConfig's architectural model settings (ModelConfig's
fields marked so) are set from it, and a flag given on the command line that contradicts it stops
the run. Settings that only shape training (dropout, ep_size, capacity factors, aux_loss_coef,
seq_len) apply as usual. The weights are
copied into the model before DeepSpeed wraps it, so every ZeRO stage partitions them as it would
fresh ones; under expert parallelism each rank takes the experts of its expert-parallel rank.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from marjara.errors import MarjaraError
from marjara.model.config import PRESETS, ModelConfig
from marjara.model.pretrained import ExportedFolder, load_weights, read_folder
from marjara.train.settings import model_overrides, settings

LONGEST_PRESET = max(preset["max_seq_len"] for preset in PRESETS.values())


def apply_init_from(values: dict[str, Any], given: set[str]) -> None:
    """TrainConfig.from_flags' step for --init_from: the folder's architecture into `values`, after
    checking the flags given against it; seq_len defaults to the model's context (at most the
    longest preset's)."""
    folder = read_folder(values["init_from"])
    config, where = folder.config, f"--init_from {values['init_from']}"
    if "model_size" in given:
        raise MarjaraError(f"{where} gives the architecture; drop --model_size {values['model_size']}")
    # The model settings that describe the architecture (besides model_size, which a folder replaces).
    for name in (spec.name for spec in settings().values() if spec.architectural):
        if name in given and values[name] != getattr(config, name):
            shown = "" if isinstance(values[name], bool) else f" {values[name]}"
            raise MarjaraError(f"--{name}{shown} contradicts {where}, whose {name} is {getattr(config, name)}; "
                               f"drop --{name}")
        values[name] = getattr(config, name)
    if values["seq_len"] is None:
        values["seq_len"] = min(config.max_seq_len, LONGEST_PRESET)


def init_model_config(folder: ExportedFolder, cfg) -> ModelConfig:
    """The folder's model with this run's training settings."""
    config = folder.config
    changes: dict[str, Any] = {"max_seq_len": max(cfg.data.seq_len, config.max_seq_len),
                               **model_overrides(cfg.model, architectural=False)}
    return config.replace(**changes)


def data_tokenizer(folder: ExportedFolder, data: str | list[str] | None, tokenizer: str | None) -> str | None:
    """The tokenizer to open the data with: the one asked for; else, for text tokenised on the fly
    (the built-in corpus, a .txt), the folder's; else the one prepared data (or a mixture) records."""
    if tokenizer is None and (data is None or (isinstance(data, str) and data.endswith(".txt"))):
        return folder.tokenizer
    return tokenizer


def check_data_tokenizer(folder: ExportedFolder, data_tokenizer_name: str, description: str) -> None:
    if folder.tokenizer is not None and folder.tokenizer != data_tokenizer_name:
        raise MarjaraError(
            f"--init_from {folder.path} was trained with tokenizer {folder.tokenizer!r} but the data ({description}) is "
            f"tokenized with {data_tokenizer_name!r}; train on text or data prepared with {folder.tokenizer!r}"
        )


def load_init_weights(model: nn.Module, folder: ExportedFolder, ds_config: dict) -> None:
    """The folder's weights into `model`; under expert parallelism, this rank's experts only (all
    MoE layers of a MarjaraModel share one ep_size, so the first one's expert-parallel rank serves)."""
    ep_rank = 0
    if model.config.use_moe:
        from marjara.compat.deepspeed_moe import expert_parallel_rank

        first_moe = next(block.ffn.moe for block in model.blocks if block.is_moe)
        ep_rank = expert_parallel_rank(first_moe, bool(ds_config.get("use_data_before_expert_parallelism", False)))
    load_weights(model, folder, ep_rank)
