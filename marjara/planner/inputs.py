"""`python -m marjara.plan`'s flags: train.py's own (so a training command line can be planned as
it is), the cluster, the target; and the Setup they describe."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from marjara.errors import MarjaraError
from marjara.model.config import DEFAULT_VOCAB_SIZE
from marjara.planner.devices import DEVICES, lookup
from marjara.planner.recommend import Target
from marjara.planner.sequence import check_sp
from marjara.planner.setup import Setup, zero_settings
from marjara.train.config import TrainConfig
from marjara.train.settings import planned_flags

# train.py flags that change the plan (declared so in marjara/train/settings.py and ModelConfig);
# the others are accepted (and ignored) but not listed in --help.
PLANNED_FLAGS = planned_flags() | {"deepspeed_config", "help"}


def build_parser() -> argparse.ArgumentParser:
    from marjara.train.args import build_parser as train_parser

    p = train_parser()
    p.prog = "python -m marjara.plan"
    p.description = ("Plan a run before booking it: per-GPU memory, communication and time for a model (train.py's "
                     "flags) on a cluster, and the lowest ZeRO stage and micro-batch split that fit. Without --batch_size/"
                     "--grad_accum (or the JSON's values) the plan chooses them; --peak_tflops overrides the GPU's "
                     "peak; precision defaults to bf16, as on a GPU.")
    for action in p._actions:  # argparse keeps no public list of a parser's flags
        if action.dest not in PLANNED_FLAGS:
            action.help = argparse.SUPPRESS
        elif action.dest == "zero_stage":
            action.help = "plan this ZeRO stage only (= zero_optimization.stage) (default: the JSON's, else compare all)"
    model = p.add_argument_group("planning")
    model.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE,
                       help="vocabulary (train.py takes it from the tokenizer, rounded up to a multiple of 64)")
    model.add_argument("--offload_optimizer", action="store_true",
                       help="optimizer states in CPU memory (= zero_optimization.offload_optimizer)")
    model.add_argument("--offload_param", action="store_true",
                       help="ZeRO-3 parameters in CPU memory (= zero_optimization.offload_param)")
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, default=1)
    cluster.add_argument("--gpus_per_node", type=int, default=8)
    cluster.add_argument("--gpu", default="H100", help=f"one of {', '.join(DEVICES)}")
    cluster.add_argument("--gpu_memory_gb", type=float, default=None, help="override the device's memory (GiB)")
    cluster.add_argument("--intra_node_gbps", type=float, default=None, help="override the intra-node bandwidth (GB/s per GPU)")
    cluster.add_argument("--inter_node_gbps", type=float, default=None, help="override the inter-node bandwidth (GB/s per GPU)")
    cluster.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for compute time")
    target = p.add_argument_group("target and output")
    target.add_argument("--global_batch_tokens", type=int, default=None,
                        help="tokens per optimizer step over all GPUs; default: the largest micro-batch x --grad_accum")
    target.add_argument("--tokens", type=float, default=None, help="training tokens, for the wall-clock days (e.g. 1e12)")
    target.add_argument("--json", action="store_true", help="print the plan as JSON")
    target.add_argument("--write_config", default=None, metavar="PATH", help="write the recommended DeepSpeed JSON here")
    return p


def _check_numbers(args) -> None:
    positive = ["nodes", "gpus_per_node", "vocab_size", "gpu_memory_gb", "intra_node_gbps", "inter_node_gbps",
                "global_batch_tokens", "tokens"]
    problems = [f"--{name} must be > 0 (got {getattr(args, name)})" for name in positive
                if getattr(args, name) is not None and not (getattr(args, name) > 0 and math.isfinite(getattr(args, name)))]
    if not 0 < args.mfu <= 1:
        problems.append(f"--mfu must be in (0, 1] (got {args.mfu}); 0.4 is typical of dense training on H100s")
    if problems:
        raise MarjaraError("; ".join(problems))


def _json_sets(raw: dict, key: str, block: str | None = None) -> bool:
    """Whether the JSON as written holds a concrete value (not "auto", not missing) for this key."""
    holder = raw.get(block, {}) if block else raw
    return isinstance(holder, dict) and holder.get(key, "auto") != "auto"


def _zero_choice(args, cfg: TrainConfig, stage_given: bool, stage_in_json: bool) -> tuple[int, bool, bool] | None:
    """The ZeRO variant fixed by the JSON or the flags (None: compare them all); they must agree
    (the stage itself was merged by TrainConfig, which refuses a flag contradicting the JSON)."""
    source = cfg.deepspeed_config or "the built-in DeepSpeed config"
    block = cfg.ds_json.get("zero_optimization", {})
    json_opt = (block.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    json_param = (block.get("offload_param") or {}).get("device", "none") not in ("none", None)
    for flag, value in (("offload_optimizer", json_opt), ("offload_param", json_param)):
        if stage_in_json and getattr(args, flag) and not value:
            raise MarjaraError(f"--{flag} contradicts {source}, which has no {flag} block; drop one of them")
    stage = cfg.optim.zero_stage if stage_given or stage_in_json else None
    offload_opt, offload_param = json_opt or args.offload_optimizer, json_param or args.offload_param
    if offload_param and stage != 3:
        raise MarjaraError("--offload_param needs ZeRO stage 3 (DeepSpeed offloads parameters only there); add --zero_stage 3")
    if (offload_opt or offload_param) and stage is None:
        raise MarjaraError("--offload_optimizer/--offload_param need a stage; add --zero_stage 2 or 3")
    if offload_opt and stage == 0:
        raise MarjaraError("offloading the optimizer needs ZeRO stage 1, 2 or 3; pick one with --zero_stage")
    return None if stage is None else (stage, offload_opt, offload_param)


def setup_from_args(args) -> tuple[Setup, Target, tuple[int, bool, bool] | None]:
    from marjara.train.args import config_from_given, train_flag_names
    from marjara.train.build import model_config
    from marjara.train.ds_config import load_json_config

    _check_numbers(args)
    world = args.nodes * args.gpus_per_node
    given = {name: value for name, value in vars(args).items() if name in train_flag_names()}
    # The flags and the JSON resolved exactly as train.py resolves them on a GPU cluster, but merged
    # as for a dense model: MoE under ZeRO-3, which train.py refuses, is a row of the table instead
    # (recommend.evaluate says why), so that the other variants are still compared.
    cfg = config_from_given({name: value for name, value in given.items() if name != "use_moe"}, has_gpu=True)
    cfg = replace(cfg, model=replace(cfg.model, use_moe=bool(given.get("use_moe"))))
    device = lookup(args.gpu).with_overrides(args.gpu_memory_gb, cfg.run.peak_tflops, args.intra_node_gbps,
                                             args.inter_node_gbps)
    config = model_config(cfg, args.vocab_size)
    if config.use_moe and world % config.ep_size:
        raise MarjaraError(f"--ep_size {config.ep_size} must divide the {world} GPUs; change --ep_size or the cluster")
    raw = load_json_config(cfg.deepspeed_config)
    fixed_zero = _zero_choice(args, cfg, "zero_stage" in given, _json_sets(raw, "stage", "zero_optimization"))
    fixed_micro = "batch_size" in given or _json_sets(raw, "train_micro_batch_size_per_gpu")
    fixed_accum = "grad_accum" in given or _json_sets(raw, "gradient_accumulation_steps")
    setup = Setup(config, cfg.data.seq_len, cfg.optim.mixed_precision, fixed_zero[0] if fixed_zero else 0, False, False,
                  cfg.optim.grad_checkpointing, args.nodes, args.gpus_per_node, device,
                  zero_settings(cfg.ds_json.get("zero_optimization", {})), cfg.optim.sp_size,
                  cfg.optim.offload_activations, cfg.optim.tiled_mlp)
    check_sp(setup)
    target = Target(cfg.optim.batch_size if fixed_micro else None, cfg.optim.grad_accum if fixed_accum else None,
                    args.global_batch_tokens, args.mfu,
                    "sp_size" in given or _json_sets(raw, "sequence_parallel_size"))
    return setup, target, fixed_zero
