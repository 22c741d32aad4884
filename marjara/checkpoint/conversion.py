"""Conversion of a MARJARA DeepSpeed checkpoint (any ZeRO stage, any number of ranks, dense or MoE),
or an exported model, into MARJARA's format or the Hugging Face layout; and a checkpoint loaded
straight into a model, converted in memory. `python -m marjara.convert` is its command.

Weights stream from one checkpoint file at a time into the output files, so peak memory stays
near one copy of the output (see bench/convert.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from marjara.checkpoint.ema_reader import check_has_ema, ema_pieces
from marjara.checkpoint.export import write_export
from marjara.checkpoint.format import Checkpoint
from marjara.checkpoint.locate import open_checkpoint
from marjara.checkpoint.pieces import Piece, assemble
from marjara.checkpoint.verify import check_checkpoint
from marjara.checkpoint.zero_reader import ZeroCheckpointReader
from marjara.errors import MarjaraError
from marjara.hf.config import MARJARA_KEY
from marjara.hf.layout import source_shapes
from marjara.model.config import ModelConfig
from marjara.model.param_names import TIED_HEAD, check_matches
from marjara.model.pretrained import (CONFIG_FILE, export_config, folder_pieces, is_pretrained_dir,
                                      read_folder, set_dtype, weight_targets)

FORMATS = ("marjara", "hf")


@dataclass
class CheckpointWeights:
    """What one conversion reads: the export's tensor shapes and a way to stream their pieces."""

    ckpt: Checkpoint
    config: ModelConfig  # ep_size 1
    shapes: dict[str, torch.Size]
    pieces: Callable[[], Iterator[Piece]]
    ema: bool
    verified: bool  # False: saved before checksums (format_version 1), read unverified

    @property
    def source(self) -> dict:
        meta = self.ckpt.meta
        return {"checkpoint": str(self.ckpt.ckpt_dir.resolve()), "tag": self.ckpt.tag, "step": meta.step,
                "tokens": meta.tokens_seen, "ema": self.ema}

    @property
    def tokenizer(self) -> str:
        return self.ckpt.meta.tokenizer

    def describe(self) -> str:
        return f"{'EMA weights of ' if self.ema else ''}checkpoint {self.ckpt.tag_dir}"


def checkpoint_weights(ckpt_dir: str | os.PathLike, tag: str | None = None, ema: bool = False) -> CheckpointWeights:
    """Open and check a checkpoint (every input error is raised here, before anything is written)."""
    ckpt = open_checkpoint(ckpt_dir, tag)
    # Every file against its checksum first: damage is named before any of it is read as weights.
    # The check reads each file once; the conversion then reads them from the page cache.
    verified = check_checkpoint(ckpt, lambda intact: f"--tag {intact.tag}")
    reader = ZeroCheckpointReader(ckpt)
    shapes = reader.shapes
    if ema:
        check_has_ema(ckpt)

        def pieces() -> Iterator[Piece]:
            # EMA covers the parameters; buffers, if a model has any, come from the module.
            yield from ema_pieces(ckpt, shapes, skip={TIED_HEAD} - set(shapes))
            yield from reader.buffer_pieces()
    else:
        reader.check_readable()

        def pieces() -> Iterator[Piece]:
            yield from reader.pieces()

    return CheckpointWeights(ckpt, ckpt.config.replace(ep_size=1), shapes, pieces, ema, verified)


@dataclass
class FolderWeights:
    """An exported model (either layout) as a conversion source."""

    path: Path
    config: ModelConfig
    tokenizer: str
    source: dict | None
    pieces: Callable[[], Iterator[Piece]]
    shapes: dict[str, torch.Size]

    def describe(self) -> str:
        return f"model {self.path}"


def folder_weights(path: str | os.PathLike) -> FolderWeights:
    folder = read_folder(path)
    if folder.tokenizer is None:
        raise MarjaraError(f"{path} was not exported by MARJARA: its config.json names no MARJARA tokenizer, "
                           "so no exported folder can say how to read its token ids")
    record = folder.info.get(MARJARA_KEY) if folder.layout == "hf" else folder.info
    shapes = source_shapes(folder.config) if folder.layout == "hf" else folder_pieces(folder)[0]

    def pieces() -> Iterator[Piece]:
        for triple in folder_pieces(folder)[1]:
            yield Piece(*triple)

    return FolderWeights(Path(path), folder.config, folder.tokenizer, record.get("source"), pieces, shapes)


def convert(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None, ema: bool = False,
            dtype: torch.dtype = torch.float32, overwrite: bool = False, format: str = "marjara",
            max_shard_size: int | None = None) -> Path:
    """ckpt_dir: a checkpoint folder (or one of its tags), or an exported model folder (either layout)."""
    if format not in FORMATS:
        raise MarjaraError(f"unknown --format {format!r}; choose {' or '.join(FORMATS)}")
    if is_pretrained_dir(ckpt_dir):
        if tag is not None or ema:
            raise MarjaraError(f"{ckpt_dir} is an exported model; --tag and --ema apply only to checkpoint folders")
        if Path(out_dir).resolve() == Path(ckpt_dir).resolve():
            raise MarjaraError(f"{out_dir} is the model being converted; choose another output folder")
        weights = folder_weights(ckpt_dir)
    else:
        weights = checkpoint_weights(ckpt_dir, tag, ema)
    if format == "hf":
        from marjara.hf.export import DEFAULT_MAX_SHARD_SIZE, write_hf_export

        out = write_hf_export(out_dir, weights.config, weights.tokenizer, weights.source, weights.pieces(), dtype,
                              weights.describe(), overwrite, max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    else:
        config_json = export_config(weights.config, weights.tokenizer, weights.source, dtype)
        out = write_export(out_dir, weights.shapes, weights.pieces(), config_json, weights.describe(), overwrite)
    if isinstance(weights, CheckpointWeights) and not weights.verified:
        print(f"note: {weights.ckpt.tag_dir} was saved without checksums (format_version 1) and was read "
              "unverified", file=sys.stderr)
    return out


def load_checkpoint_model(ckpt_dir: str | os.PathLike, tag: str | None = None, ema: bool = False,
                          device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer name) straight from a checkpoint, converted in memory into the model's own
    tensors (no second copy). dtype None: float32."""
    from marjara.model import MarjaraModel

    weights = checkpoint_weights(ckpt_dir, tag, ema)
    model = MarjaraModel(weights.config, inference=True)
    targets = weight_targets(model)
    check_matches(targets, weights.shapes, weights.describe(), "its marjara.json does not describe these weights")
    with torch.no_grad():
        assemble(targets, weights.pieces(), weights.describe())
    return set_dtype(model, device, dtype or torch.float32), weights.tokenizer


def summary(out: Path, format: str) -> str:
    """The line the command prints: what was written, how large, and for which loader."""
    weights = sorted(out.glob("model*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    what = str(weights[0]) if len(weights) == 1 else f"{len(weights)} shards {out}/model-*.safetensors"
    extra = " in the Hugging Face layout (load with transformers.AutoModelForCausalLM)" if format == "hf" else ""
    return f"wrote {what} ({size / 2**20:.1f} MiB) and {CONFIG_FILE}{extra}"
