"""train.py's command line: every flag, documented in --help."""

from __future__ import annotations

import argparse

from marjara.model.config import PRESETS
from marjara.errors import MarjaraError

# Flags whose value may also come from the DeepSpeed JSON. Their argparse default is None so that
# an explicit flag can be told apart from an unset one (see marjara/train/ds_config.py for the rule).
JSON_BACKED_DEFAULTS = {
    "batch_size": 8,
    "grad_accum": 1,
    "grad_clip": 1.0,
    "lr": 1e-3,
}


def build_parser() -> argparse.ArgumentParser:
    import deepspeed

    p = argparse.ArgumentParser(
        prog="train.py",
        description="Pre-train a MARJARA model through the DeepSpeed engine. With no arguments: the tiny "
        "preset on the built-in corpus (offline), a few minutes on a CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="a .txt file, a .bin token file, or a folder prepared by `python -m marjara.prepare`; "
                      "omitted: the built-in corpus (Python's own documentation, byte-level tokenizer)")
    data.add_argument("--tokenizer", default=None,
                      help="tokenizer name (tiktoken encoding or 'bytes'); default: the one the data records, else gpt2")
    data.add_argument("--seq_len", type=int, default=None, help="tokens per sample; default: the preset's max_seq_len")

    model = p.add_argument_group("model")
    model.add_argument("--model_size", default="tiny", choices=list(PRESETS), help="model preset")
    model.add_argument("--dropout", type=float, default=0.0)
    model.add_argument("--use_moe", action="store_true", help="mixture-of-experts FFN on every other layer")
    model.add_argument("--num_experts", type=int, default=4)
    model.add_argument("--top_k", type=int, default=1, choices=[1, 2])
    model.add_argument("--ep_size", type=int, default=1, help="expert-parallel ranks (must divide the world size)")
    model.add_argument("--capacity_factor", type=float, default=1.0)
    model.add_argument("--eval_capacity_factor", type=float, default=1.0)
    model.add_argument("--min_capacity", type=int, default=4)
    model.add_argument("--moe_layer_freq", type=int, default=2, help="every Nth layer is MoE (the last of each N)")
    model.add_argument("--use_residual", action="store_true", help="PR-MoE: a dense MLP beside the experts")
    model.add_argument("--aux_loss_coef", type=float, default=0.01, help="weight of the MoE load-balancing loss")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max_steps", type=int, default=800, help="optimizer steps (the default suits the CPU demo)")
    opt.add_argument("--lr", type=float, default=None,
                     help=f"peak learning rate (= the JSON optimizer's lr, if any; default {JSON_BACKED_DEFAULTS['lr']})")
    opt.add_argument("--min_lr", type=float, default=None, help="final learning rate of the cosine; default lr / 10")
    opt.add_argument("--warmup_steps", type=int, default=40)
    opt.add_argument("--weight_decay", type=float, default=0.1)
    opt.add_argument("--batch_size", type=int, default=None,
                     help=f"micro-batch per rank (= train_micro_batch_size_per_gpu; default {JSON_BACKED_DEFAULTS['batch_size']})")
    opt.add_argument("--grad_accum", type=int, default=None,
                     help=f"gradient accumulation steps (= gradient_accumulation_steps; default {JSON_BACKED_DEFAULTS['grad_accum']})")
    opt.add_argument("--grad_clip", type=float, default=None,
                     help=f"gradient clipping norm (= gradient_clipping; default {JSON_BACKED_DEFAULTS['grad_clip']})")
    opt.add_argument("--mixed_precision", default=None, choices=["bf16", "fp16", "fp32"],
                     help="maps onto the JSON's bf16/fp16 blocks; default: the JSON's, else bf16 on GPU, fp32 on CPU")
    opt.add_argument("--grad_checkpointing", action="store_true",
                     help="recompute each transformer block in backward (deepspeed.checkpointing, "
                     "configured by the JSON's activation_checkpointing block)")
    opt.add_argument("--ema_decay", type=float, default=0.0, help="EMA of the weights with this decay; 0 disables")
    opt.add_argument("--compile", action="store_true", help="torch.compile the model where it works")
    opt.add_argument("--seed", type=int, default=1337)

    run = p.add_argument_group("evaluation, logging, checkpoints")
    run.add_argument("--eval_interval", type=int, default=200, help="steps between validation runs; 0 disables")
    run.add_argument("--eval_batches", type=int, default=8, help="fixed validation batches per evaluation")
    run.add_argument("--log_interval", type=int, default=10, help="steps between log lines")
    run.add_argument("--log_dir", default=None,
                     help="tensorboard event folder; default: the JSON's tensorboard output_path/job_name, else OUT_DIR/tensorboard")
    run.add_argument("--out_dir", default="checkpoints", help="checkpoint folder (DeepSpeed layout)")
    run.add_argument("--save_interval", type=int, default=400, help="steps between checkpoints; 0: only at the end")
    run.add_argument("--keep_last", type=int, default=3, help="checkpoints kept (the one `latest` names always is); 0 keeps all")
    run.add_argument("--resume", default=None, help="checkpoint folder (uses `latest`) or folder/TAG to resume from")
    run.add_argument("--sample_tokens", type=int, default=200, help="tokens of the sample printed at the end; 0: none")
    run.add_argument("--peak_tflops", type=float, default=None,
                     help="peak TFLOP/s of one device for MFU; default: known GPUs' bf16 peak, on CPU a matmul measured at start")

    launch = p.add_argument_group("launch")
    launch.add_argument("--distributed", action="store_true",
                        help="accepted for compatibility; the world always comes from the launcher's environment")
    launch.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Values no run can use, refused before anything starts (the JSON-backed ones are checked
    with the JSON in marjara/train/ds_config.py)."""
    problems = []
    for name in ("max_steps", "log_interval", "eval_batches"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1 (got {getattr(args, name)})")
    for name in ("warmup_steps", "eval_interval", "save_interval", "keep_last", "sample_tokens", "weight_decay"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if args.seq_len is not None and args.seq_len < 1:
        problems.append(f"--seq_len must be >= 1 (got {args.seq_len})")
    if not 0.0 <= args.ema_decay < 1.0:
        problems.append(f"--ema_decay must be in [0, 1) (got {args.ema_decay}); 0 disables EMA")
    if args.lr is not None and args.lr <= 0:
        problems.append(f"--lr must be > 0 (got {args.lr})")
    if args.min_lr is not None and args.min_lr < 0:
        problems.append(f"--min_lr must be >= 0 (got {args.min_lr})")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        problems.append(f"--peak_tflops must be > 0 (got {args.peak_tflops}); leave it out to use the known or measured peak")
    if problems:
        raise MarjaraError("; ".join(problems))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args
