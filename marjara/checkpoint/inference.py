"""Load a model for inference from an exported folder or straight from a training checkpoint."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from marjara.checkpoint.format import LATEST, is_checkpoint_dir, is_tag_dir, open_checkpoint
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel
from marjara.model.pretrained import is_pretrained_dir, read_folder
from marjara.data.tokenizer import Tokenizer, get_tokenizer


def resolve_model_path(path: str | os.PathLike, tag: str | None = None, ema: bool = False
                       ) -> tuple[Path, str | None, bool]:
    """(folder, tag, is_checkpoint) for OUT_DIR (config.json), CKPT_DIR (latest) or CKPT_DIR/<tag>,
    checked cheaply (no weights read)."""
    path = Path(path)
    if is_pretrained_dir(path):
        if tag is not None or ema:
            raise MarjaraError(f"{path} is an exported model; --tag and --ema apply only to checkpoint folders")
        read_folder(path)
        return path, None, False
    if tag is None and not is_checkpoint_dir(path) and is_tag_dir(path) and path.is_dir():
        path, tag = path.parent, path.name
    if not path.is_dir() or not (is_checkpoint_dir(path) or tag is not None):
        raise MarjaraError(
            f"{path} is neither an exported model (no config.json) nor a checkpoint folder (no '{LATEST}'); "
            "pass the OUT_DIR of python -m marjara.convert or the --out_dir of a training run"
        )
    open_checkpoint(path, tag)
    return path, tag, True


def load_for_inference(path: str | os.PathLike, tag: str | None = None, ema: bool = False,
                       device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                       ) -> tuple[torch.nn.Module, Tokenizer]:
    """(model in eval mode, built for inference: no process group needed, its tokenizer); a
    checkpoint is converted in memory. Whatever a library announces on stdout while the model
    loads goes to stderr, so that a command's own output (generated text) stays clean."""
    folder, tag, is_checkpoint = resolve_model_path(path, tag, ema)
    with contextlib.redirect_stdout(sys.stderr):
        if is_checkpoint:
            from marjara.convert import load_checkpoint_model

            model, tokenizer_name = load_checkpoint_model(folder, tag=tag, ema=ema, device=device, dtype=dtype)
        else:
            tokenizer_name = read_folder(folder).tokenizer
            if tokenizer_name is None:
                raise MarjaraError(f"{folder} was not exported by MARJARA: its config.json names no MARJARA "
                                   "tokenizer; run it with transformers instead")
            model = MarjaraModel.from_pretrained(folder, device=device, dtype=dtype)
    return model, get_tokenizer(tokenizer_name)
