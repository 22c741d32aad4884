"""Writing the Hugging Face layout: a folder transformers.AutoModelForCausalLM.from_pretrained loads
with no custom code (Qwen3ForCausalLM / Qwen3MoeForCausalLM).

    config.json                       transformers' config, plus MARJARA's record under "marjara"
    model.safetensors                 all weights, when they fit in max_shard_size; otherwise
    model-0000K-of-0000N.safetensors  shards of at most max_shard_size (a larger tensor gets its own)
    model.safetensors.index.json      and the index naming each tensor's shard
    generation_config.json            end-of-text as bos/eos/pad
    tokenizer.json, tokenizer_config.json

Weights stream from the source's pieces through hf/layout.py into the shard files, so
memory stays near the existing converter's. config.json is removed first and written last: a
folder with a config.json always holds matching weights.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from marjara.checkpoint.export import check_out_dir
from marjara.checkpoint.pieces import Piece
from marjara.checkpoint.safetensors_writer import write_files
from marjara.data.tokenizer import get_tokenizer
from marjara.dtypes import export_name
from marjara.errors import MarjaraError
from marjara.fileio import atomic_path, filling_dir, write_json_atomic
from marjara.hf.config import to_hf_config
from marjara.hf.layout import HfLayout, hf_shapes
from marjara.hf.tokenizer import tokenizer_config, write_tokenizer_json
from marjara.model.config import ModelConfig
from marjara.model.param_names import TIED_HEAD
from marjara.model.pretrained import (CONFIG_FILE, HF_GENERATION_CONFIG_FILE, HF_INDEX_FILE as INDEX_FILE,
                                      HF_TOKENIZER_CONFIG_FILE, HF_TOKENIZER_FILE, WEIGHTS_FILE as SINGLE_FILE,
                                      hf_record)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # Qwen's own repositories use shards of about this size
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' (bytes) -> bytes."""
    match = _SIZE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise MarjaraError(f"--max_shard_size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def plan_shards(shapes: dict[str, torch.Size], itemsize: int, max_bytes: int) -> list[dict[str, torch.Size]]:
    """Tensors in order, a new shard whenever the next would make the current one exceed max_bytes."""
    shards: list[dict[str, torch.Size]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    return [SINGLE_FILE] if count == 1 else [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def to_hf_pieces(config: ModelConfig, pieces: Iterable[Piece]) -> Iterator[Piece]:
    """MARJARA pieces (any split, as ZeRO partitions cut them) as pieces of the Hugging Face tensors;
    a tensor the config does not describe is refused."""
    layout = HfLayout(config)
    for piece in pieces:
        if piece.name not in layout.maps:
            raise MarjaraError(f"the source holds a tensor {piece.name!r} that the model config does not describe")
        for name, offset, values in layout.to_hf(piece.name, piece.offset, piece.values):
            yield Piece(name, offset, values)


def write_hf_export(out_dir: str | os.PathLike, config: ModelConfig, tokenizer_name: str, source: dict | None,
                    pieces: Iterable[Piece], dtype: torch.dtype, source_description: str, overwrite: bool = False,
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write the folder; everything that can be refused (the architecture, the tokenizer, the output
    folder) is checked before the first byte is written."""
    dtype_label = export_name(dtype)
    config = config.replace(ep_size=1)
    tokenizer = get_tokenizer(tokenizer_name)
    if tokenizer.vocab_size > config.vocab_size:
        raise MarjaraError(f"tokenizer {tokenizer_name!r} has {tokenizer.vocab_size} ids but the model's vocab_size is "
                           f"{config.vocab_size}; export with the tokenizer the model was trained with")
    config_json = to_hf_config(config, tokenizer.eot_id, dtype_label, hf_record(tokenizer_name, source))
    out_dir = Path(out_dir)
    check_out_dir(out_dir, config_json, overwrite)

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(hf_shapes(config), itemsize, max_shard_size)
    names = shard_names(len(shards))
    with filling_dir(out_dir):
        (out_dir / CONFIG_FILE).unlink(missing_ok=True)
        for stale in out_dir.iterdir():  # shards of an earlier export that this one does not replace
            if (_SHARD_NAME.match(stale.name) or stale.name in (SINGLE_FILE, INDEX_FILE)) and stale.name not in names:
                stale.unlink()
        write_tokenizer_json(tokenizer_name, out_dir / HF_TOKENIZER_FILE)
        write_json_atomic(out_dir / HF_TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer_name, config.max_seq_len))
        with contextlib.ExitStack() as stack:
            temps = [stack.enter_context(atomic_path(out_dir / name)) for name in names]
            write_files(dict(zip(temps, shards)), to_hf_pieces(config, pieces), dtype, source_description,
                        metadata={"format": "pt"})
        if len(shards) > 1:
            total = sum(shape.numel() * itemsize for shard in shards for shape in shard.values())
            weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
            write_json_atomic(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        eot = tokenizer.eot_id
        write_json_atomic(out_dir / HF_GENERATION_CONFIG_FILE, {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})
        write_json_atomic(out_dir / CONFIG_FILE, config_json)
    return out_dir


def save_pretrained_hf(model, out_dir: str | os.PathLike, tokenizer: str, dtype: torch.dtype = torch.float32,
                       overwrite: bool = False, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Export an in-memory model (ep_size 1) in the Hugging Face layout."""
    config = model.config
    if config.use_moe and config.ep_size > 1:
        raise MarjaraError(f"this model holds only its rank's experts (ep_size {config.ep_size}); convert its checkpoint instead")
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop(TIED_HEAD, None)
    pieces = (Piece(name, 0, tensor.reshape(-1)) for name, tensor in state.items())
    return write_hf_export(out_dir, config, tokenizer, None, pieces, dtype, "the model's state dict", overwrite,
                           max_shard_size)
