"""Reading a Hugging Face Qwen3 / Qwen3-MoE folder: its config, and its weights (one safetensors
file, or shards listed in an index) one tensor at a time. The file names are model/pretrained.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from marjara.dtypes import TORCH_NAMES
from marjara.errors import MarjaraError
from marjara.fileio import read_json_object
from marjara.hf.config import MARJARA_KEY, from_hf_config
from marjara.hf.layout import HfLayout, Triple, hf_shapes
from marjara.model.config import ModelConfig
from marjara.model.param_names import TIED_HEAD, check_matches


def is_hf_config(info: dict) -> bool:
    return "model_type" in info and info.get("format") != "marjara"


def hf_model_config(info: dict, where: str) -> ModelConfig:
    return from_hf_config(info, where)


def hf_tokenizer_name(info: dict) -> str | None:
    """The MARJARA tokenizer a MARJARA export recorded; None for folders made elsewhere."""
    record = info.get(MARJARA_KEY)
    return record.get("tokenizer") if isinstance(record, dict) else None


def hf_dtype(info: dict) -> torch.dtype:
    name = info.get("dtype") or info.get("torch_dtype") or "float32"
    return TORCH_NAMES.get(name, torch.float32)


def weight_files(index: Path, single: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the shards' `index` or the `single` file."""
    from safetensors import SafetensorError, safe_open

    path = index.parent
    if index.is_file():
        weight_map = read_json_object(index, "save the model again").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise MarjaraError(f"{index} is not a safetensors index (its weight_map is not an object of tensor "
                               "name -> file name); save the model again")
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise MarjaraError(f"{path} is incomplete: {file.name}, named in {index.name}, is missing")
        return files
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as stored:
                return {name: single for name in stored.keys()}
        except SafetensorError as exc:
            raise MarjaraError(f"cannot read {single} ({exc}); the file is truncated or corrupt") from None
    raise MarjaraError(f"{path} holds no {single.name} or {index.name}; save the model with safetensors "
                       "(transformers' save_pretrained does by default)")


def hf_shapes_on_disk(files: dict[str, Path]) -> dict[str, torch.Size]:
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, torch.Size] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as stored:
                present = set(stored.keys())
                for name in names:
                    if name not in present:
                        raise MarjaraError(f"{file} lacks {name}, which the index places there; save the model again")
                    shapes[name] = torch.Size(stored.get_slice(name).get_shape())
        except SafetensorError as exc:
            raise MarjaraError(f"cannot read {file} ({exc}); the file is truncated or corrupt") from None
    return shapes


def stored_pieces(files: dict[str, Path], config: ModelConfig, path: Path) -> tuple[dict[str, torch.Size], Iterator[Triple]]:
    """(the tensor shapes of `files` (weight_files), checked against `config`; pieces of MARJARA
    tensors under export names, one stored tensor at a time). A tied head stored anyway is skipped."""
    from safetensors import safe_open

    shapes = hf_shapes_on_disk(files)
    expected = hf_shapes(config)
    if config.tie_embeddings:
        shapes.pop(TIED_HEAD, None)
        files.pop(TIED_HEAD, None)
    check_matches(expected, shapes, f"{path}'s weights", "save the model again")
    layout = HfLayout(config)

    def pieces() -> Iterator[Triple]:
        by_file: dict[Path, list[str]] = {}
        for name, file in files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as stored:
                for name in names:
                    yield layout.from_hf(name, stored.get_tensor(name))

    return shapes, pieces()
