"""--init_from PATH: continued pre-training from an exported model, in MARJARA's format or a Hugging
Face Qwen3 / Qwen3-MoE folder.

The architecture comes from the folder; flags that describe the architecture may repeat it but not
contradict it. Flags that only shape training (dropout, ep_size, capacity factors, aux_loss_coef,
seq_len) apply as usual. The weights are copied into the model before DeepSpeed wraps it, so every
ZeRO stage partitions them as it would fresh ones; under expert parallelism each rank takes the
experts its expert-parallel rank holds.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from marjara.errors import MarjaraError
from marjara.model.config import PRESETS, ModelConfig
from marjara.model.pretrained import ExportedFolder, load_weights, read_folder

# flag -> ModelConfig field, for the flags that describe the architecture
ARCHITECTURE_FLAGS = {"num_experts": "num_experts", "top_k": "top_k", "moe_layer_freq": "moe_layer_freq",
                      "use_residual": "use_residual"}
TRAINING_FIELDS = ("dropout", "ep_size", "capacity_factor", "eval_capacity_factor", "min_capacity", "aux_loss_coef")


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags given on the command line (not left at their defaults)."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = action.const
            else:
                kwargs["nargs"] = action.nargs
            quiet.add_argument(*action.option_strings, **kwargs)
    known, _ = quiet.parse_known_args(argv)
    return set(vars(known))


def init_config(folder: ExportedFolder, args, explicit: set[str], seq_len: int) -> ModelConfig:
    """The folder's architecture with this run's training settings; one line for a contradicting flag."""
    config = folder.config
    where = f"--init_from {folder.path}"
    if "model_size" in explicit:
        raise MarjaraError(f"{where} takes the architecture from the folder; drop --model_size {args.model_size}")
    if "use_moe" in explicit and not config.use_moe:
        raise MarjaraError(f"{where} is a dense model; drop --use_moe (the folder decides the architecture)")
    for flag, field in ARCHITECTURE_FLAGS.items():
        if flag in explicit and getattr(args, flag) != getattr(config, field):
            raise MarjaraError(f"--{flag} {getattr(args, flag)} contradicts {where}, whose {field} is "
                               f"{getattr(config, field)}; drop --{flag}")
    changes = {"dropout": args.dropout, "max_seq_len": max(seq_len, config.max_seq_len)}
    if config.use_moe:
        changes.update({field: getattr(args, field) for field in TRAINING_FIELDS if field in explicit or field == "ep_size"})
    return config.replace(**changes, preset="custom").replace()


def open_init_folder(path: str) -> ExportedFolder:
    return read_folder(path)


def default_seq_len(folder: ExportedFolder) -> int:
    """The preset-independent default sequence length: the model's own, capped like the presets'."""
    return min(folder.config.max_seq_len, max(p["max_seq_len"] for p in PRESETS.values()))


def expert_parallel_rank(model: nn.Module, use_data_before_expert_parallelism: bool) -> int:
    """This rank's expert-parallel rank, from the groups DeepSpeed's MoE layers create (the engine
    later finds them made and reuses them)."""
    from deepspeed.moe.layer import MoE

    for module in model.modules():
        if isinstance(module, MoE):
            module.set_deepspeed_parallelism(use_data_before_expert_parallelism)
            return torch.distributed.get_rank(group=module.deepspeed_moe.ep_group)
    return 0


def load_init_weights(model: nn.Module, folder: ExportedFolder, use_data_before_expert_parallelism: bool) -> None:
    ep_rank = expert_parallel_rank(model, use_data_before_expert_parallelism) if model.config.use_moe else 0
    load_weights(model, folder, ep_rank)
