"""Writing the exported model format (see marjara.model.pretrained): weights first, config.json last."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from marjara.checkpoint.pieces import Piece, whole
from marjara.checkpoint.safetensors_writer import write_pieces
from marjara.dtypes import EXPORT_NAMES
from marjara.errors import MarjaraError
from marjara.fileio import atomic_path, filling_dir, read_json_object, write_json_atomic
from marjara.hf.reader import is_hf_config
from marjara.model.config import ModelConfig
from marjara.model.param_names import TIED_HEAD
from marjara.model.pretrained import CONFIG_FILE, FORMAT, WEIGHTS_FILE, export_config


def check_out_dir(out_dir: Path, new_config: dict, overwrite: bool) -> None:
    """Refuse to replace a different model (or unrelated files) in out_dir unless overwrite; the
    same config.json (either layout) is the same model."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MarjaraError(f"{out_dir} exists and is not a folder; choose another output folder")
    if not any(out_dir.iterdir()):
        return
    config_path = out_dir / CONFIG_FILE
    try:
        old = read_json_object(config_path, "")
    except MarjaraError:  # no readable config.json: whatever the folder holds is not this model
        old = None
    if isinstance(old, dict) and old == json.loads(json.dumps(new_config)):
        return
    is_model = isinstance(old, dict) and (old.get("format") == FORMAT or is_hf_config(old))
    what = "a different model" if is_model else "other files"
    raise MarjaraError(f"{out_dir} already holds {what}; pass --overwrite to replace it, or choose another folder")


def write_export(out_dir: str | os.PathLike, shapes: dict[str, torch.Size], pieces: Iterable[Piece],
                 config_json: dict, source_description: str, overwrite: bool = False) -> Path:
    """Write weights then config.json so that a folder with a config.json always has matching weights.

    The old config.json is removed before the new weights are renamed into place, and the new one
    is written last: an interrupted export leaves no folder that looks complete.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, config_json, overwrite)
    dtype = EXPORT_NAMES[config_json["dtype"]]
    with filling_dir(out_dir):
        with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
            write_pieces(tmp, shapes, pieces, dtype, source_description, metadata={"format": "pt"})
            (out_dir / CONFIG_FILE).unlink(missing_ok=True)
        write_json_atomic(out_dir / CONFIG_FILE, config_json)
    return out_dir


def save_pretrained(weights, config: ModelConfig, out_dir: str | os.PathLike, tokenizer: str,
                    source: dict | None = None, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Export a whole model (an nn.Module or its state dict, global expert names) to out_dir."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else dict(weights)
    if config.use_moe and config.ep_size > 1:
        raise MarjaraError(
            f"this model holds only its rank's experts (ep_size {config.ep_size}); convert its checkpoint instead"
        )
    if config.tie_embeddings:
        state.pop(TIED_HEAD, None)
    shapes = {name: tensor.shape for name, tensor in state.items()}
    pieces = (whole(name, tensor) for name, tensor in state.items())
    return write_export(out_dir, shapes, pieces, export_config(config, tokenizer, source, dtype),
                        "the model's state dict", overwrite)
