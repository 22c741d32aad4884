"""Every setting of a training run, declared once, in the section of TrainConfig that holds it.

A declaration says: the flag (= the attribute's name, and the key checkpoints record it under in
train_args), its valid values (a marjara.rules Rule), its help text and the default --help shows,
the DeepSpeed JSON keys it shares with the JSON (dotted paths: "optimizer.params.lr"), and whether
`python -m marjara.plan` depends on it. Everything else is derived from here: train.py's --help, the
flag-versus-JSON merge (ds_config.py), every range check of a flag and of a JSON value, and the
planner's flags. The model section's fields beyond model_size/init_from/moe_eval_routing are
ModelConfig's own fields marked `flag` (see marjara/model/config.py's knob): a new model setting is
declared there, once, and arrives here with its help, rule and whether it is architectural.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from marjara.model.config import PRESETS, ModelConfig
from marjara.model.ffn import EVAL_ROUTINGS
from marjara.rules import Rule, above, at_least, fraction, one_of, pair_of
from marjara.train.nonfinite import DEFAULT_MAX_BAD_STEPS


def setting(default: Any, help: str, *, rule: Rule | None = None, json: str | tuple[str, ...] = (),
            shown: str | None = None, plan: bool = False, flag: str | None = None, **argparse: Any):
    """A TrainConfig field that is a train.py flag. `json`: the DeepSpeed JSON key(s) holding the
    same setting (merged by the one-source rule); `shown`: the default as --help states it where the
    value is worked out at start (the field's default is None then); `flag`: the flag's name where
    it is not the attribute's; `argparse`: what argparse's add_argument receives besides."""
    return field(default=default, metadata={"help": help, "rule": rule, "json": (json,) if isinstance(json, str) else json,
                                            "shown": shown, "plan": plan, "flag": flag, "argparse": argparse})


@dataclass
class DataSettings:
    source: str | list[str] | None = setting(
        None, "a .txt file, a .bin token file, or a folder prepared by `python -m marjara.prepare`; or a weighted "
        "mixture of folders and .bin files: WEIGHT PATH pairs (0.7 data/web 0.3 data/code) or a mix.json naming "
        "each source (see the README's Mixtures)", flag="data",
        shown="the built-in corpus (Python's own documentation, byte-level tokenizer)", nargs="+", metavar="DATA")
    tokenizer: str | None = setting(None, "tokenizer name (a tiktoken encoding or 'bytes')",
                                    shown="the one the data records, else gpt2")
    seq_len: int | None = setting(None, "tokens per sample", rule=at_least(1, integer=True), plan=True,
                                  shown="the preset's max_seq_len", type=int)


def _from_model_config(spec: dataclasses.Field) -> tuple[str, Any, dataclasses.Field]:
    """A ModelConfig field marked `flag`, as a setting of the model section (its default the model's)."""
    m = spec.metadata
    declared = setting(spec.default, m["help"], rule=m["rule"], plan=m["plan"])
    return spec.name, spec.type, field(default=spec.default, metadata={**declared.metadata, "model_field": True})


# The model section: the preset or folder, then every ModelConfig field a run sets (declared in
# marjara/model/config.py), then how MoE routes in validation. Built from ModelConfig's fields, so
# that a model setting is written in one place.
ModelSettings = dataclasses.make_dataclass("ModelSettings", [
    ("model_size", str, setting("tiny", "model preset", rule=one_of(PRESETS), plan=True)),
    ("init_from", "str | None", setting(
        None, "continue pre-training an exported model (python -m marjara.convert, either --format) or a Hugging "
        "Face Qwen3 / Qwen3-MoE folder: the architecture and weights come from it",
        shown="random initial weights", type=str)),
    *[_from_model_config(spec) for spec in dataclasses.fields(ModelConfig) if spec.metadata["flag"]],
    ("moe_eval_routing", str, setting(
        "deterministic", "MoE routing in validation: 'deterministic' sends every token to its top-k experts; "
        "'training' keeps DeepSpeed's training-time gate (capacity, token dropping, top-2 sampling), e.g. to "
        "measure dropping", rule=one_of(EVAL_ROUTINGS))),
], namespace={"__module__": __name__})


@dataclass
class OptimSettings:
    max_steps: int = setting(800, "optimizer steps (the default suits the CPU demo)", rule=at_least(1, integer=True),
                             json="scheduler.params.total_num_steps")
    lr: float = setting(1e-3, "peak learning rate", rule=above(0),
                        json=("optimizer.params.lr", "scheduler.params.warmup_max_lr"))
    min_lr: float | None = setting(None, "final learning rate of the cosine (= lr x the JSON scheduler's "
                                   "cos_min_ratio)", rule=at_least(0), shown="lr / 10", type=float)
    warmup_steps: int = setting(40, "linear warmup steps", rule=at_least(0, integer=True),
                                json="scheduler.params.warmup_num_steps")
    weight_decay: float = setting(0.1, "AdamW weight decay of matrices; norms and biases get none", rule=at_least(0),
                                  json="optimizer.params.weight_decay")
    adam_betas: tuple[float, float] = setting((0.9, 0.95), "AdamW's beta1 beta2", rule=pair_of(fraction()),
                                              json="optimizer.params.betas", nargs=2, type=float, metavar=("B1", "B2"))
    adam_eps: float = setting(1e-8, "AdamW's epsilon", rule=above(0), json="optimizer.params.eps")
    batch_size: int = setting(8, "micro-batch per rank", rule=at_least(1, integer=True),
                              json="train_micro_batch_size_per_gpu", plan=True)
    grad_accum: int = setting(1, "gradient accumulation steps", rule=at_least(1, integer=True),
                              json="gradient_accumulation_steps", plan=True)
    grad_clip: float = setting(1.0, "gradient clipping norm", rule=at_least(0, hint="0 disables clipping"),
                               json="gradient_clipping")
    mixed_precision: str | None = setting(None, "bf16, fp16 or fp32 (= the JSON's bf16/fp16 blocks)",
                                          rule=one_of(("bf16", "fp16", "fp32")), plan=True,
                                          shown="the JSON's, else bf16 on GPU, fp32 on CPU")
    zero_stage: int = setting(0, "ZeRO stage", rule=one_of((0, 1, 2, 3), "0, 1, 2 or 3"), json="zero_optimization.stage",
                              plan=True, shown="the JSON's, else 0", type=int)
    grad_checkpointing: bool = setting(False, "recompute each transformer block in backward (deepspeed.checkpointing, "
                                       "configured by the JSON's activation_checkpointing block)", plan=True)
    sp_size: int = setting(1, "Ulysses sequence parallelism: each sample's seq_len tokens are split over this many "
                           "ranks, which attend together by all-to-all; data-parallel ranks are world / sp_size "
                           "(see docs/long-context.md)", rule=at_least(1, integer=True),
                           json="sequence_parallel_size", plan=True)
    tiled_mlp: bool = setting(False, "run each SwiGLU over slices of d_model tokens, recomputed in backward (ALST's "
                              "tiled MLP): for long sequences", plan=True)
    offload_activations: bool = setting(False, "keep the inputs --grad_checkpointing saves of each block in CPU "
                                        "memory", json="activation_checkpointing.cpu_checkpointing", plan=True)
    ema_decay: float = setting(0.0, "EMA of the weights with this decay; 0 disables",
                               rule=fraction(hint="0 disables EMA"))
    compile: bool = setting(False, "torch.compile the model where it works")
    seed: int = setting(1337, "seed of the initial weights, the data order and the sample")


@dataclass
class RunSettings:
    eval_interval: int = setting(200, "steps between validation runs; 0 disables", rule=at_least(0, integer=True))
    eval_batches: int = setting(8, "fixed validation batches per evaluation", rule=at_least(1, integer=True))
    log_interval: int = setting(10, "steps between log lines", rule=at_least(1, integer=True))
    log_dir: str | None = setting(None, "tensorboard event folder (= the JSON's tensorboard output_path/job_name)",
                                  shown="the JSON's tensorboard folder, else OUT_DIR/tensorboard")
    skip_samples: int = setting(0, "step over this many samples of the data stream where the run starts (e.g. past "
                                "data that made the loss non-finite); exact on any world size",
                                rule=at_least(0, integer=True))
    max_bad_steps: int = setting(DEFAULT_MAX_BAD_STEPS, "stop after this many optimizer steps in a row with a "
                                 "non-finite loss or gradient norm (each is skipped, not applied); bf16/fp32 only, "
                                 "fp16 keeps DeepSpeed's loss scaling", rule=at_least(1, integer=True))
    sample_tokens: int = setting(200, "tokens of the sample printed at the end; 0: none", rule=at_least(0, integer=True))
    peak_tflops: float | None = setting(None, "peak TFLOP/s of one device for MFU",
                                        rule=above(0, hint="leave it out to use the known or measured peak"),
                                        plan=True, shown="known GPUs' bf16 peak, on CPU a matmul measured at start",
                                        type=float)


@dataclass
class CheckpointSettings:
    out_dir: str = setting("checkpoints", "checkpoint folder (DeepSpeed layout)")
    save_interval: int = setting(400, "steps between checkpoints; 0: only at the end", rule=at_least(0, integer=True))
    keep_last: int = setting(3, "checkpoints kept (the one `latest` names always is); 0 keeps all",
                             rule=at_least(0, integer=True))
    resume: str | None = setting(None, "checkpoint folder (uses `latest`) or folder/TAG to resume from",
                                 shown="start afresh")
    overwrite: bool = setting(False, "a fresh run into an --out_dir holding another run deletes that run's "
                              "checkpoints, metrics and events first (without it, such a run is refused)")


# TrainConfig's sections, in --help order: attribute -> (class, --help group title).
SECTIONS = {"data": (DataSettings, "data"), "model": (ModelSettings, "model"), "optim": (OptimSettings, "optimisation"),
            "run": (RunSettings, "evaluation, logging"), "checkpoint": (CheckpointSettings, "checkpoints")}


@dataclass(frozen=True)
class Setting:
    """One declaration, as the derived tables read it."""
    name: str  # the flag, and the key of train_args
    section: str
    attr: str
    default: Any
    help: str
    shown: str | None
    rule: Rule | None
    json: tuple[str, ...]  # DeepSpeed JSON paths merged with the flag by the one-source rule
    plan: bool
    argparse: dict
    model_field: bool  # a ModelConfig field
    architectural: bool  # a ModelConfig field that defines the weights
    moe: bool  # a ModelConfig field that matters only with use_moe

    @property
    def path(self) -> str:
        """Where TrainConfig holds it: "optim.batch_size"."""
        return f"{self.section}.{self.attr}"


@functools.lru_cache(maxsize=1)
def _table() -> tuple[Setting, ...]:
    model_meta = {spec.name: spec.metadata for spec in dataclasses.fields(ModelConfig)}
    found = []
    for section, (cls, _) in SECTIONS.items():
        for spec in dataclasses.fields(cls):
            m, model = spec.metadata, model_meta.get(spec.name) if spec.metadata.get("model_field") else None
            found.append(Setting(m["flag"] or spec.name, section, spec.name, spec.default, m["help"], m["shown"],
                                 m["rule"], m["json"], m["plan"], m["argparse"], model is not None,
                                 bool(model and model["architectural"]), bool(model and model["moe"])))
    return tuple(found)


def settings() -> dict[str, Setting]:
    """Every setting, by flag name, in --help order."""
    return {s.name: s for s in _table()}


def json_rules() -> dict[str, Rule]:
    """DeepSpeed JSON path -> the rule of the setting it holds: a JSON value is checked by the same
    rule as the flag."""
    return {path: s.rule for s in _table() for path in s.json if s.rule is not None}


def planned_flags() -> set[str]:
    """The settings `python -m marjara.plan` depends on."""
    return {s.name for s in _table() if s.plan}


def model_overrides(model: Any, architectural: bool | None = None) -> dict[str, Any]:
    """The ModelConfig fields a run sets, from its model section (`architectural`: only those that
    are, or are not); the MoE ones only with use_moe, as they mean nothing without it."""
    return {s.attr: getattr(model, s.attr) for s in _table() if s.model_field
            and (architectural is None or s.architectural == architectural) and (model.use_moe or not s.moe)}
