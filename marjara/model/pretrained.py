"""Reading exported models, no DeepSpeed needed: MARJARA's own format (below) and the Hugging Face
Qwen3 / Qwen3-MoE layout (marjara/hf/reader.py), told apart by their config.json.

MARJARA's format: OUT_DIR/model.safetensors + OUT_DIR/config.json,

config.json = {"format": "marjara", "format_version": 1, "model": ModelConfig (ep_size 1),
               "tokenizer": name, "source": {"checkpoint", "tag", "step", "tokens", "ema"} or null,
               "dtype": "float32" | "bfloat16"}
model.safetensors holds MarjaraModel(config).state_dict() under ep_size-1 (global expert) names;
with tie_embeddings, lm_head.weight is left out (safetensors refuses shared tensors) and re-tied
on load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from marjara.dtypes import EXPORT_NAMES, export_name
from marjara.errors import MarjaraError
from marjara.fileio import read_json_object
from marjara.hf import reader as hf_reader
from marjara.model.config import ModelConfig
from marjara.model.param_names import EXPERT_PATTERN, TIED_HEAD, check_matches, global_param_name

FORMAT = "marjara"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# The Hugging Face layout (marjara/hf/reader.py) shares these two names; above a shard size it
# splits the weights into model-0000K-of-0000N.safetensors, listed in this index.
HF_INDEX_FILE = "model.safetensors.index.json"
HF_GENERATION_CONFIG_FILE = "generation_config.json"
HF_TOKENIZER_FILE = "tokenizer.json"  # the `tokenizers` library's format
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
def export_config(config: ModelConfig, tokenizer: str, source: dict | None, dtype: torch.dtype) -> dict:
    name = export_name(dtype)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.replace(ep_size=1).to_dict(),
        "tokenizer": tokenizer,
        "source": source,
        "dtype": name,
    }


def hf_record(tokenizer: str, source: dict | None) -> dict:
    """What a Hugging Face export says about itself under config.json's "marjara" key."""
    return {"format_version": FORMAT_VERSION, "tokenizer": tokenizer, "source": source}


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _read_config_json(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise MarjaraError(f"model folder {path} does not exist; export one with python -m marjara.convert")
    if not config_path.is_file():
        raise MarjaraError(f"{path} has no {CONFIG_FILE}: not an exported model; export one with python -m marjara.convert")
    return read_json_object(config_path, "export the model again", "export the model again")


def _check_marjara_config(path: Path, info: dict) -> dict:
    config_path = path / CONFIG_FILE
    if info.get("format") != FORMAT:
        raise MarjaraError(f"{config_path} does not describe a MARJARA model (no \"format\": \"marjara\", "
                           "and no Hugging Face model_type)")
    if info.get("format_version") != FORMAT_VERSION:
        raise MarjaraError(
            f"{config_path} has format_version {info.get('format_version')!r}; this MARJARA reads "
            f"{FORMAT_VERSION} (upgrade MARJARA)"
        )
    if info.get("dtype") not in EXPORT_NAMES or not isinstance(info.get("model"), dict) or "tokenizer" not in info:
        raise MarjaraError(f"{config_path} lacks a valid model, tokenizer or dtype; export the model again")
    if not (path / WEIGHTS_FILE).is_file():
        raise MarjaraError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}; export the model again")
    return info


@dataclass
class ExportedFolder:
    """An exported model folder in either layout, its config read and checked (no weights read)."""

    path: Path
    layout: str  # "marjara" or "hf"
    config: ModelConfig  # ep_size 1
    tokenizer: str | None  # None: a Hugging Face folder not written by MARJARA
    dtype: torch.dtype
    info: dict  # config.json

    def describe(self) -> str:
        return f"{'Hugging Face' if self.layout == 'hf' else 'MARJARA'} model {self.path}"


def read_folder(path: str | os.PathLike) -> ExportedFolder:
    path = Path(path)
    info = _read_config_json(path)
    if hf_reader.is_hf_config(info):
        _hf_weight_files(path)  # present and readable
        return ExportedFolder(path, "hf", hf_reader.hf_model_config(info, str(path / CONFIG_FILE)),
                              hf_reader.hf_tokenizer_name(info), hf_reader.hf_dtype(info), info)
    info = _check_marjara_config(path, info)
    config = ModelConfig.from_dict(info["model"]).replace(ep_size=1)
    return ExportedFolder(path, FORMAT, config, info["tokenizer"], EXPORT_NAMES[info["dtype"]], info)


def _hf_weight_files(path: Path) -> dict[str, Path]:
    return hf_reader.weight_files(path / HF_INDEX_FILE, path / WEIGHTS_FILE)


def folder_pieces(folder: ExportedFolder) -> tuple[dict[str, torch.Size], Iterator[tuple[str, int, torch.Tensor]]]:
    """(stored shapes, pieces (export name, offset, flat values) one stored tensor at a time)."""
    if folder.layout == "hf":
        return hf_reader.stored_pieces(_hf_weight_files(folder.path), folder.config, folder.path)
    from safetensors import SafetensorError, safe_open

    weights = folder.path / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as stored:
            shapes = {n: torch.Size(stored.get_slice(n).get_shape()) for n in stored.keys()}
    except SafetensorError as exc:
        raise MarjaraError(f"cannot read {weights} ({exc}); the file is truncated or corrupt, export the model again") from None

    def pieces():
        try:
            with safe_open(str(weights), framework="pt") as stored:
                for name in shapes:
                    yield name, 0, stored.get_tensor(name).reshape(-1)
        except SafetensorError as exc:
            raise MarjaraError(f"cannot read {weights} ({exc}); the file is truncated or corrupt, export the model again") from None

    return shapes, pieces()


def weight_targets(model) -> dict[str, torch.Tensor]:
    """The model's tensors an export holds, by name (the tied output head left out)."""
    targets = dict(model.state_dict(keep_vars=True))
    if model.config.tie_embeddings:
        targets.pop(TIED_HEAD)
    return targets



def set_dtype(model, device: str | torch.device, dtype: torch.dtype):
    """Move to device and cast parameters only: buffers (RoPE's inverse frequencies) stay fp32."""
    model.to(device)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.eval()


def load_weights(model, folder: ExportedFolder, ep_rank: int = 0) -> None:
    """Copy an exported folder's weights into `model`, whose config must have the same architecture
    (ep_size may be > 1: this rank, expert-parallel rank `ep_rank`, takes its own experts only).
    One stored tensor is in memory at a time."""
    config = model.config
    local_experts = config.num_experts // config.ep_size if config.use_moe else 1
    targets = {global_param_name(name, ep_rank, local_experts): tensor.detach()
               for name, tensor in weight_targets(model).items()}
    expected = {name: t.shape for name, t in targets.items()}
    if config.use_moe and config.ep_size > 1:  # the other ranks' experts are in the folder too
        for match in filter(None, map(EXPERT_PATTERN.match, list(targets))):
            head, _, tail = match.groups()
            shape = targets[match.group(0)].shape
            expected.update({f"{head}{e}{tail}": shape for e in range(config.num_experts)})
    shapes, pieces = folder_pieces(folder)
    if folder.layout == FORMAT:
        check_matches(expected, shapes, str(folder.path / WEIGHTS_FILE), "export the model again")
    else:
        from marjara.hf.layout import source_shapes

        check_matches(expected, source_shapes(config), folder.describe(), "its config.json does not describe this model")
    with torch.no_grad():
        for name, offset, values in pieces:
            target = targets.get(name)
            if target is not None:  # None: an expert another expert-parallel rank holds
                target.view(-1)[offset: offset + values.numel()].copy_(values)
