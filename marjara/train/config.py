"""TrainConfig: every setting of a training run, typed, with its help text and its real default.

It is built once, from the flags given on the command line and the DeepSpeed JSON (the merge rule
is in marjara/train/ds_config.py), and then travels alone: the Learner, the benchmarks and the
tests take a TrainConfig, never an argparse Namespace. train.py's --help is generated from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from marjara.data.mixture_spec import parse_data_arg
from marjara.errors import MarjaraError
from marjara.model.config import PRESETS, ModelConfig
from marjara.model.ffn import EVAL_ROUTINGS
from marjara.train.ds_config import merge_json, with_train_batch_size
from marjara.train.nonfinite import DEFAULT_MAX_BAD_STEPS

_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def setting(default: Any, help: str, *, group: str, shown: str | None = None, **flag: Any):
    """A TrainConfig field that is also a train.py flag. `shown` is the default as --help states it
    where the value is worked out at start (None here); `flag` goes to argparse's add_argument."""
    return field(default=default, metadata={"help": help, "group": group, "shown": shown, "flag": flag})


def model_setting(name: str, help: str, **flag: Any):
    """A MoE flag whose default is ModelConfig's own."""
    return setting(_MODEL_DEFAULTS[name], help, group="model", **flag)


@dataclass
class TrainConfig:
    # ---- data
    data: str | list[str] | None = setting(
        None, "a .txt file, a .bin token file, or a folder prepared by `python -m marjara.prepare`; or a weighted "
        "mixture of folders and .bin files: WEIGHT PATH pairs (0.7 data/web 0.3 data/code) or a mix.json naming "
        "each source (see the README's Mixtures)", group="data",
        shown="the built-in corpus (Python's own documentation, byte-level tokenizer)", nargs="+", metavar="DATA")
    tokenizer: str | None = setting(None, "tokenizer name (a tiktoken encoding or 'bytes')", group="data",
                                    shown="the one the data records, else gpt2")
    seq_len: int | None = setting(None, "tokens per sample", group="data", shown="the preset's max_seq_len", type=int)

    # ---- model
    model_size: str = setting("tiny", "model preset", group="model", choices=list(PRESETS))
    init_from: str | None = setting(
        None, "continue pre-training an exported model (python -m marjara.convert, either --format) or a Hugging "
        "Face Qwen3 / Qwen3-MoE folder: the architecture and weights come from it", group="model",
        shown="random initial weights", type=str)
    dropout: float = setting(0.0, "dropout probability in attention and the MLP", group="model")
    use_moe: bool = setting(False, "mixture-of-experts FFN on every other layer", group="model")
    num_experts: int = model_setting("num_experts", "experts per MoE layer")
    top_k: int = model_setting("top_k", "experts each token is routed to", choices=[1, 2])
    ep_size: int = model_setting("ep_size", "expert-parallel ranks (must divide the world size)")
    capacity_factor: float = model_setting("capacity_factor", "expert capacity in training, as a multiple of "
                                           "the tokens per expert under perfect balance")
    eval_capacity_factor: float = model_setting("eval_capacity_factor", "expert capacity in validation with "
                                                "--moe_eval_routing training")
    moe_eval_routing: str = setting("deterministic", "MoE routing in validation: 'deterministic' sends every token to "
                                    "its top-k experts; 'training' keeps DeepSpeed's training-time gate (capacity, "
                                    "token dropping, top-2 sampling), e.g. to measure dropping", group="model",
                                    choices=list(EVAL_ROUTINGS))
    min_capacity: int = model_setting("min_capacity", "the least tokens an expert accepts per batch")
    moe_layer_freq: int = model_setting("moe_layer_freq", "every Nth layer is MoE (the last of each N)")
    use_residual: bool = model_setting("use_residual", "PR-MoE: a dense MLP beside the experts")
    aux_loss_coef: float = model_setting("aux_loss_coef", "weight of the MoE load-balancing loss")

    # ---- optimisation (the settings a DeepSpeed JSON can also hold say which key)
    max_steps: int = setting(800, "optimizer steps (= the JSON scheduler's total_num_steps; the default suits "
                             "the CPU demo)", group="optimisation")
    lr: float = setting(1e-3, "peak learning rate (= the JSON optimizer's lr and scheduler's warmup_max_lr)",
                        group="optimisation")
    min_lr: float | None = setting(None, "final learning rate of the cosine (= lr x the JSON scheduler's "
                                   "cos_min_ratio)", group="optimisation", shown="lr / 10", type=float)
    warmup_steps: int = setting(40, "linear warmup steps (= the JSON scheduler's warmup_num_steps)",
                                group="optimisation")
    weight_decay: float = setting(0.1, "AdamW weight decay of matrices; norms and biases get none "
                                  "(= the JSON optimizer's weight_decay)", group="optimisation")
    adam_betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's beta1 beta2 (= the JSON optimizer's betas)",
                                              group="optimisation", nargs=2, type=float, metavar=("B1", "B2"))
    adam_eps: float = setting(1e-8, "AdamW's epsilon (= the JSON optimizer's eps)", group="optimisation")
    batch_size: int = setting(8, "micro-batch per rank (= train_micro_batch_size_per_gpu)", group="optimisation")
    grad_accum: int = setting(1, "gradient accumulation steps (= gradient_accumulation_steps)", group="optimisation")
    grad_clip: float = setting(1.0, "gradient clipping norm (= gradient_clipping)", group="optimisation")
    mixed_precision: str | None = setting(None, "bf16, fp16 or fp32 (= the JSON's bf16/fp16 blocks)",
                                          group="optimisation", shown="the JSON's, else bf16 on GPU, fp32 on CPU",
                                          choices=["bf16", "fp16", "fp32"])
    zero_stage: int = setting(0, "ZeRO stage (= zero_optimization.stage)", group="optimisation",
                                     shown="the JSON's, else 0", type=int, choices=[0, 1, 2, 3])
    grad_checkpointing: bool = setting(False, "recompute each transformer block in backward (deepspeed.checkpointing, "
                                       "configured by the JSON's activation_checkpointing block)", group="optimisation")
    sp_size: int = setting(1, "Ulysses sequence parallelism: each sample's seq_len tokens are split over this many "
                           "ranks, which attend together by all-to-all; data-parallel ranks are world / sp_size "
                           "(= sequence_parallel_size; see docs/long-context.md)", group="optimisation")
    tiled_mlp: bool = setting(False, "run each SwiGLU over slices of d_model tokens, recomputed in backward (ALST's "
                              "tiled MLP): for long sequences", group="optimisation")
    offload_activations: bool = setting(False, "keep the inputs --grad_checkpointing saves of each block in CPU "
                                        "memory (= activation_checkpointing.cpu_checkpointing)", group="optimisation")
    ema_decay: float = setting(0.0, "EMA of the weights with this decay; 0 disables", group="optimisation")
    compile: bool = setting(False, "torch.compile the model where it works", group="optimisation")
    seed: int = setting(1337, "seed of the initial weights, the data order and the sample", group="optimisation")

    # ---- evaluation, logging, checkpoints
    eval_interval: int = setting(200, "steps between validation runs; 0 disables", group="run")
    eval_batches: int = setting(8, "fixed validation batches per evaluation", group="run")
    log_interval: int = setting(10, "steps between log lines", group="run")
    log_dir: str | None = setting(None, "tensorboard event folder (= the JSON's tensorboard output_path/job_name)",
                                  group="run", shown="the JSON's tensorboard folder, else OUT_DIR/tensorboard")
    out_dir: str = setting("checkpoints", "checkpoint folder (DeepSpeed layout)", group="run")
    save_interval: int = setting(400, "steps between checkpoints; 0: only at the end", group="run")
    keep_last: int = setting(3, "checkpoints kept (the one `latest` names always is); 0 keeps all", group="run")
    resume: str | None = setting(None, "checkpoint folder (uses `latest`) or folder/TAG to resume from", group="run",
                                 shown="start afresh")
    overwrite: bool = setting(False, "a fresh run into an --out_dir holding another run deletes that run's "
                              "checkpoints, metrics and events first (without it, such a run is refused)", group="run")
    skip_samples: int = setting(0, "step over this many samples of the data stream where the run starts (e.g. "
                                "past data that made the loss non-finite); exact on any world size", group="run")
    max_bad_steps: int = setting(DEFAULT_MAX_BAD_STEPS, "stop after this many optimizer steps in a row with a "
                                 "non-finite loss or gradient norm (each is skipped, not applied); bf16/fp32 only, "
                                 "fp16 keeps DeepSpeed's loss scaling", group="run")
    sample_tokens: int = setting(200, "tokens of the sample printed at the end; 0: none", group="run")
    peak_tflops: float | None = setting(None, "peak TFLOP/s of one device for MFU", group="run", type=float,
                                        shown="known GPUs' bf16 peak, on CPU a matmul measured at start")

    # DeepSpeed's own --deepspeed_config flag (deepspeed.add_config_arguments) fills this one.
    deepspeed_config: str | None = field(default=None, metadata={
        "help": "a DeepSpeed JSON, e.g. ds_configs/zero2.json", "shown": "none: ZeRO 0 and the settings above"})
    # The JSON with every setting above written into it (train_batch_size aside, which depends on
    # the world size: see engine_config()).
    ds_json: dict = field(default_factory=dict, repr=False)

    # ---- built once -------------------------------------------------------------------------
    @classmethod
    def from_flags(cls, given: dict[str, Any], has_gpu: bool | None = None) -> "TrainConfig":
        """The config of a run from the flags given (name -> value, only those on the command
        line) and the DeepSpeed JSON --deepspeed_config names."""
        if has_gpu is None:
            import torch

            has_gpu = torch.cuda.is_available()
        unknown = sorted(set(given) - set(flag_fields()) - {"deepspeed_config"})
        if unknown:
            raise MarjaraError(f"unknown training setting(s) {', '.join(unknown)}")
        values = {f.name: f.default for f in dataclasses.fields(cls) if f.name != "ds_json"}
        values.update(given)
        if isinstance(values["adam_betas"], list):
            values["adam_betas"] = tuple(values["adam_betas"])
        if isinstance(values["data"], list) and len(values["data"]) == 1:  # one path or mix.json stays a str
            values["data"] = values["data"][0]
        if values["init_from"] is not None:
            from marjara.train.init_from import apply_init_from

            apply_init_from(values, set(given))
        _check(values, given)
        values["ds_json"] = merge_json(values, set(given), has_gpu)
        if values["seq_len"] is None:
            values["seq_len"] = PRESETS[values["model_size"]]["max_seq_len"]
        return cls(**values)

    def engine_config(self, world_size: int) -> dict:
        """What deepspeed.initialize receives for this world size."""
        return with_train_batch_size(self.ds_json, self, world_size)

    @property
    def optimizer_in_json(self) -> bool:
        """DeepSpeed builds the JSON's optimizer; else MARJARA builds torch AdamW."""
        return "optimizer" in self.ds_json

    @property
    def scheduler_in_json(self) -> bool:
        """DeepSpeed runs the JSON's scheduler; else MARJARA's warmup + cosine."""
        return "scheduler" in self.ds_json

    def plain_values(self) -> dict[str, Any]:
        """The settings as JSON-ready values (what a checkpoint records)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items() if name != "ds_json"}


def flag_fields() -> dict[str, dataclasses.Field]:
    """TrainConfig's fields that are train.py flags of MARJARA's own, in --help order."""
    return {f.name: f for f in dataclasses.fields(TrainConfig) if "group" in f.metadata}


def _check(values: dict, given: dict) -> None:
    """Values no run can use, refused before anything starts (with the JSON's part of them
    checked where it is merged)."""
    parse_data_arg(values["data"])  # a malformed mixture stops here, before any process group starts
    problems = []
    for name in ("max_steps", "log_interval", "eval_batches", "max_bad_steps"):
        if values[name] < 1:
            problems.append(f"--{name} must be >= 1 (got {values[name]})")
    for name in ("warmup_steps", "eval_interval", "save_interval", "keep_last", "sample_tokens", "weight_decay",
                 "skip_samples"):
        if values[name] < 0:
            problems.append(f"--{name} must be >= 0 (got {values[name]})")
    if values["offload_activations"] and not values["grad_checkpointing"] and "offload_activations" in given:
        problems.append("--offload_activations needs --grad_checkpointing (it offloads the inputs the checkpointed "
                        "blocks keep for their recomputation); add --grad_checkpointing")
    if values["seq_len"] is not None and values["seq_len"] < 1:
        problems.append(f"--seq_len must be >= 1 (got {values['seq_len']})")
    if not 0.0 <= values["ema_decay"] < 1.0:
        problems.append(f"--ema_decay must be in [0, 1) (got {values['ema_decay']}); 0 disables EMA")
    if "lr" in given and values["lr"] <= 0:
        problems.append(f"--lr must be > 0 (got {values['lr']})")
    if values["min_lr"] is not None and values["min_lr"] < 0:
        problems.append(f"--min_lr must be >= 0 (got {values['min_lr']})")
    if values["peak_tflops"] is not None and not 0 < values["peak_tflops"] < math.inf:  # nan too
        problems.append(f"--peak_tflops must be > 0 (got {values['peak_tflops']}); leave it out to use the known "
                        "or measured peak")
    if not all(0.0 <= b < 1.0 for b in values["adam_betas"]):
        problems.append(f"--adam_betas must both be in [0, 1) (got {' '.join(map(str, values['adam_betas']))})")
    if values["adam_eps"] <= 0:
        problems.append(f"--adam_eps must be > 0 (got {values['adam_eps']})")
    if values["moe_eval_routing"] not in EVAL_ROUTINGS:
        problems.append(f"--moe_eval_routing must be one of {', '.join(EVAL_ROUTINGS)} "
                        f"(got {values['moe_eval_routing']!r})")
    for name in ("out_dir", "log_dir"):
        if values[name] is not None and os.path.exists(values[name]) and not os.path.isdir(values[name]):
            problems.append(f"--{name} {values[name]} is a file, not a folder; give a folder (it is created if missing)")
    if problems:
        raise MarjaraError("; ".join(problems))
