"""Convert a MARJARA DeepSpeed checkpoint (any ZeRO stage, any number of ranks, dense or MoE) into
one model.safetensors + config.json that MarjaraModel.from_pretrained loads without DeepSpeed.

    python -m marjara.convert CKPT_DIR OUT_DIR [--tag TAG] [--ema] [--dtype fp32|bf16] [--overwrite]

No launcher needed. Weights stream from one checkpoint file at a time into the output file, so
peak memory stays near one copy of the output (see bench/convert.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from marjara.checkpoint.format import Checkpoint, open_checkpoint
from marjara.checkpoint.verify import check_checkpoint
from marjara.model.config import ModelConfig
from marjara.checkpoint.ema_reader import check_has_ema, ema_pieces
from marjara.errors import cli_entry
from marjara.checkpoint.export import write_export
from marjara.model.param_names import TIED_HEAD
from marjara.model.pretrained import CONFIG_FILE, WEIGHTS_FILE, check_matches, export_config, set_dtype, weight_targets
from marjara.checkpoint.pieces import Piece, assemble
from marjara.checkpoint.zero_reader import ZeroCheckpointReader

DTYPE_FLAGS = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
        return {"checkpoint": str(self.ckpt.ckpt_dir.resolve()), "tag": self.ckpt.tag, "step": meta["step"],
                "tokens": meta.get("tokens_seen"), "ema": self.ema}

    @property
    def tokenizer(self) -> str:
        return self.ckpt.meta["tokenizer"]

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


def convert(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None, ema: bool = False,
            dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    weights = checkpoint_weights(ckpt_dir, tag, ema)
    config_json = export_config(weights.config, weights.tokenizer, weights.source, dtype)
    out = write_export(out_dir, weights.shapes, weights.pieces(), config_json, weights.describe(), overwrite)
    if not weights.verified:
        print(f"note: {weights.ckpt.tag_dir} was saved without checksums (format_version 1) and was read "
              "unverified", file=sys.stderr)
    return out


def load_checkpoint_model(ckpt_dir: str | os.PathLike, tag: str | None = None, ema: bool = False,
                          device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer name) straight from a checkpoint, converted in memory into the model's own
    tensors (no second copy). dtype None: float32."""
    from marjara.model import MarjaraModel

    weights = checkpoint_weights(ckpt_dir, tag, ema)
    model = MarjaraModel(weights.config)
    targets = weight_targets(model)
    check_matches(targets, weights.shapes, weights.describe(), "its marjara.json does not describe these weights")
    with torch.no_grad():
        assemble(targets, weights.pieces(), weights.describe())
    return set_dtype(model, device, dtype or torch.float32), weights.tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m marjara.convert", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", help="the checkpoint folder a training run wrote (holds 'latest')")
    parser.add_argument("out_dir", help="folder for model.safetensors and config.json")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step1000 (default: the 'latest' one)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    parser.add_argument("--dtype", choices=sorted(DTYPE_FLAGS), default="fp32", help="dtype of the exported weights")
    parser.add_argument("--overwrite", action="store_true", help="replace a different model already in OUT_DIR")
    return parser.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    out = convert(args.ckpt_dir, args.out_dir, tag=args.tag, ema=args.ema, dtype=DTYPE_FLAGS[args.dtype],
                  overwrite=args.overwrite)
    size = (out / WEIGHTS_FILE).stat().st_size
    print(f"wrote {out / WEIGHTS_FILE} ({size / 2**20:.1f} MiB) and {CONFIG_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
