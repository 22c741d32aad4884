"""The training checkpoint format: every file's name, the marjara.json schema and its format_version.

CKPT_DIR/latest                        the tag of the newest complete checkpoint (written last)
CKPT_DIR/global_stepN/                 one checkpoint ("tag"):
    mp_rank_00_model_states.pt         DeepSpeed: the module (ZeRO 0-2), or
    zero_pp_rank_R_mp_rank_00_model_states.pt            rank R's stand-ins (ZeRO-3)
    [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt     rank R's optimizer partition
    layer_L_expert_E_mp_rank_00_model_states.pt          MoE: one file per global expert
    marjara_rankR.pt                   MARJARA: rank R's RNG states and EMA share
    marjara.json                       MARJARA: the schema below; written after every rank
                                       finished, so its presence marks the checkpoint complete
CKPT_DIR/global_stepN_universal/       DeepSpeed's universal copy for another world size

marjara.json (format_version 2; version 1, which lacks `files`, is still read, unverified), read
and written only as a CheckpointMeta; a missing or wrong-typed key is refused in one line:
    step, samples_consumed, tokens_seen, seq_len   where training stood (samples_consumed: the
                                       data stream's state_dict(), handed back on resume)
    model_config                       ModelConfig.to_dict() as trained (ep_size may be > 1)
    tokenizer, zero_stage, world_size  what reading the files needs
    dtype                              "fp32" | "bf16" | "fp16"
    ema                                null, or {"decay", "layout": one of EMA_LAYOUTS}
    train_args                         the flags, for the record
    files                              the manifest: {"algorithm": "xxh3_64", "files": {name:
                                       {"bytes": size, "xxh3_64": 16 hex digits}}} of every other
                                       file of the tag (marjara.checkpoint.verify)

A rank file holds {"rng": ..., "ema": {global name: fp32 tensor}, "ema_shapes": {name: shape}};
the EMA layouts say how those tensors spread over ranks:
    "replicated"    (ZeRO 0-2) each tensor is a whole parameter, held by exactly one rank;
    "zero3_shards"  (ZeRO-3) each rank holds a flat shard of every parameter: the parameter is
                    the concatenation in rank order, truncated to its size (the last are padded).

Resume, convert and every loader read marjara.json through read_meta here (marjara/checkpoint/
locate.py finds and opens the tag), so all of them check format_version and the schema the same way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from marjara.dtypes import PRECISIONS
from marjara.errors import MarjaraError
from marjara.fileio import read_json_object
from marjara.model.config import ModelConfig

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: written before manifests; loads unverified
VERSION_KEY = "format_version"
FILES_KEY = "files"
LATEST = "latest"
META_FILE = "marjara.json"
UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_DONE = "marjara_universal.ok"  # in a universal copy: the conversion finished
REQUIRED_KEYS = ("step", "samples_consumed", "model_config", "tokenizer", "zero_stage", "world_size", "dtype")
HALF_DTYPES = ("bf16", "fp16")
DTYPES = tuple(PRECISIONS)
EMA_REPLICATED, EMA_ZERO3_SHARDS = "replicated", "zero3_shards"
EMA_LAYOUTS = (EMA_REPLICATED, EMA_ZERO3_SHARDS)
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> int | None:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


def universal_tag_for(tag: str) -> str:
    return f"{tag}{UNIVERSAL_SUFFIX}"


def rank_file_name(rank: int) -> str:
    return f"marjara_rank{rank}.pt"


def model_states_name(zero_stage: int, rank: int = 0) -> str:
    if zero_stage == 3:
        return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
    return "mp_rank_00_model_states.pt"


def optim_states_name(dtype: str, rank: int) -> str:
    prefix = "bf16_" if dtype == "bf16" else ""
    return f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def expert_file_name(layer: int, expert: int) -> str:
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_ema(value) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("decay"), (int, float))
            and not isinstance(value.get("decay"), bool) and value.get("layout") in EMA_LAYOUTS)


def _is_manifest(value) -> bool:
    """{"algorithm": name, "files": {file: {"bytes": size, <algorithm>: digest}}}."""
    if not (isinstance(value, dict) and isinstance(value.get("algorithm"), str) and isinstance(value.get("files"), dict)):
        return False
    return all(isinstance(entry, dict) and _is_int(entry.get("bytes"), 0)
               and isinstance(entry.get(value["algorithm"]), str) for entry in value["files"].values())


# What each key's value must be: (test, the phrase an error line uses). None passes an optional key.
_SCHEMA = {
    "step": (lambda v: _is_int(v, 0), "a non-negative integer"),
    "samples_consumed": (lambda v: _is_int(v, 0), "a non-negative integer"),
    "tokens_seen": (lambda v: v is None or _is_int(v, 0), "a non-negative integer or null"),
    "seq_len": (lambda v: v is None or _is_int(v, 1), "a positive integer or null"),
    "model_config": (lambda v: isinstance(v, dict), "a JSON object"),
    "tokenizer": (lambda v: isinstance(v, str) and v != "", "a tokenizer name"),
    "zero_stage": (lambda v: _is_int(v, 0) and v <= 3, "a ZeRO stage 0-3"),
    "world_size": (lambda v: _is_int(v, 1), "a positive integer"),
    "dtype": (lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "train_args": (lambda v: v is None or isinstance(v, dict), "a JSON object or null"),
    "ema": (lambda v: v is None or _is_ema(v), f"null or {{\"decay\": number, \"layout\": {' | '.join(EMA_LAYOUTS)}}}"),
    FILES_KEY: (_is_manifest, "a manifest {\"algorithm\", \"files\": {name: {\"bytes\", <algorithm>}}}"),
}


def _schema_problem(fields: dict) -> str | None:
    """The first key whose value breaks the schema, as a phrase (None: all fit)."""
    for key, (fits, expected) in _SCHEMA.items():
        if key in fields and not fits(fields[key]):
            shown = repr(fields[key])
            return f"{key} is {shown if len(shown) <= 40 else 'a ' + type(fields[key]).__name__}, not {expected}"
    return None


@dataclass(frozen=True)
class EmaMeta:
    decay: float
    layout: str  # one of EMA_LAYOUTS


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint of a run records that does not change while it trains."""

    seq_len: int
    model_config: dict  # ModelConfig.to_dict()
    tokenizer: str
    zero_stage: int
    world_size: int
    dtype: str
    train_args: dict


@dataclass(frozen=True)
class CheckpointMeta:
    """marjara.json (the schema above); read and written only here."""

    step: int
    samples_consumed: int
    model_config: dict
    tokenizer: str
    zero_stage: int
    world_size: int
    dtype: str
    tokens_seen: int | None = None  # None in checkpoints older than the key
    seq_len: int | None = None
    train_args: dict | None = None
    ema: EmaMeta | None = None
    files: dict | None = None  # the manifest; None until the save hashed the files, and in version 1
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # A meta that breaks the schema is a bug in the writer: it stops before any file is written.
        problem = _schema_problem(self.to_json())
        if problem:
            raise ValueError(f"checkpoint meta: {problem}")

    @classmethod
    def for_save(cls, step: int, data_state: dict, run: RunRecord, ema: EmaMeta | None) -> CheckpointMeta:
        """The meta of a save at `step`; `data_state` is the data stream's state_dict(), whose
        keys are marjara.json's own (samples_consumed), so resume hands them back unchanged."""
        return cls(step=step, **data_state, tokens_seen=data_state["samples_consumed"] * run.seq_len,
                   **asdict(run), ema=ema)

    @property
    def data_state(self) -> dict:
        """What the data stream's load_state_dict() takes to continue where this checkpoint stood."""
        return {"samples_consumed": self.samples_consumed}

    @property
    def model(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model_config)

    def to_json(self) -> dict:
        """The file's content, keys in the order the trainer has always written them."""
        fields = {VERSION_KEY: self.format_version, "step": self.step, "samples_consumed": self.samples_consumed,
                  "tokens_seen": self.tokens_seen, "seq_len": self.seq_len, "model_config": self.model_config,
                  "tokenizer": self.tokenizer, "zero_stage": self.zero_stage, "world_size": self.world_size,
                  "dtype": self.dtype, "train_args": self.train_args,
                  "ema": asdict(self.ema) if self.ema is not None else None}
        if self.files is not None:
            fields[FILES_KEY] = self.files
        return fields

    @classmethod
    def from_json(cls, fields: dict, where: Path, fix: str) -> CheckpointMeta:
        """Check `fields` (the content of `where`) against the schema; `fix` ends every error line."""
        version = fields.get(VERSION_KEY)
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise MarjaraError(
                f"{where} has {VERSION_KEY} {version!r}; this MARJARA reads checkpoints of version "
                f"{' and '.join(map(str, READABLE_VERSIONS))} (use the MARJARA that wrote it)"
            )
        required = REQUIRED_KEYS + ((FILES_KEY,) if version >= 2 else ())
        missing = [key for key in required if key not in fields]
        if missing:
            raise MarjaraError(f"{where} lacks {', '.join(missing)}; it was not written by MARJARA's trainer, {fix}")
        problem = _schema_problem(fields)
        if problem:
            raise MarjaraError(f"{where}: {problem}; it was not written by MARJARA's trainer, {fix}")
        ema = fields.get("ema")
        # The schema's keys are the dataclass's fields; keys it does not know are not carried.
        return cls(**{key: fields.get(key) for key in _SCHEMA if key != "ema"},
                   ema=EmaMeta(float(ema["decay"]), ema["layout"]) if ema else None, format_version=version)


def read_meta(tag_dir: Path, fix: str) -> CheckpointMeta:
    """tag_dir's marjara.json, checked against the schema; `fix` ends every error line."""
    path = tag_dir / META_FILE
    if not path.is_file():
        raise MarjaraError(
            f"checkpoint {tag_dir} is incomplete: it has no {META_FILE} (rank 0 writes it last, after every "
            f"rank finished its files), or it is not MARJARA's; {fix}"
        )
    fields = read_json_object(path, f"the save was interrupted, {fix}", f"it was not written by MARJARA's trainer, {fix}")
    return CheckpointMeta.from_json(fields, path, fix)


@dataclass
class Checkpoint:
    """One complete checkpoint: CKPT_DIR/<tag> and its marjara.json."""

    ckpt_dir: Path
    tag: str
    meta: CheckpointMeta

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def config(self) -> ModelConfig:
        """The model config as trained (ep_size may be > 1)."""
        return self.meta.model

    @property
    def zero_stage(self) -> int:
        return self.meta.zero_stage

    @property
    def world_size(self) -> int:
        return self.meta.world_size

    @property
    def half_precision(self) -> bool:
        return self.meta.dtype in HALF_DTYPES

    @property
    def manifest(self) -> dict | None:
        """Size and checksum of every file of the tag; None for a version-1 checkpoint."""
        return self.meta.files

    @property
    def ema_layout(self) -> str | None:
        """The EMA layout, None when the run kept no EMA."""
        return self.meta.ema.layout if self.meta.ema else None

    def file(self, name: str) -> Path:
        path = self.tag_dir / name
        if not path.is_file():
            raise MarjaraError(
                f"checkpoint {self.tag_dir} is incomplete: {name} is missing (every rank writes its own files; "
                "the save was interrupted or a file was removed); use another tag"
            )
        return path

    def rank_file(self, rank: int) -> Path:
        return self.file(rank_file_name(rank))

    def model_states_file(self, rank: int = 0) -> Path:
        return self.file(model_states_name(self.zero_stage, rank))

    def optim_states_file(self, rank: int) -> Path:
        return self.file(optim_states_name(self.meta.dtype, rank))

    def expert_file(self, layer: int, expert: int) -> Path:
        return self.file(expert_file_name(layer, expert))
