"""Reading the exported model format: OUT_DIR/model.safetensors + OUT_DIR/config.json, no DeepSpeed needed.

config.json = {"format": "marjara", "format_version": 1, "model": ModelConfig (ep_size 1),
               "tokenizer": name, "source": {"checkpoint", "tag", "step", "tokens", "ema"} or null,
               "dtype": "float32" | "bfloat16"}
model.safetensors holds MarjaraModel(config).state_dict() under ep_size-1 (global expert) names;
with tie_embeddings, lm_head.weight is left out (safetensors refuses shared tensors) and re-tied
on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import torch

from marjara.errors import MarjaraError
from marjara.model.config import ModelConfig
from marjara.model.param_names import TIED_HEAD

FORMAT = "marjara"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def export_config(config: ModelConfig, tokenizer: str, source: dict | None, dtype: torch.dtype) -> dict:
    if dtype not in DTYPE_NAMES:
        raise MarjaraError(f"cannot export weights as {dtype}; choose float32 or bfloat16")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.replace(ep_size=1).to_dict(),
        "tokenizer": tokenizer,
        "source": source,
        "dtype": DTYPE_NAMES[dtype],
    }


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_export_config(path: str | os.PathLike) -> dict:
    """config.json of an exported model, checked; clear errors for anything else."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise MarjaraError(f"model folder {path} does not exist; export one with python -m marjara.convert")
    if not config_path.is_file():
        raise MarjaraError(f"{path} has no {CONFIG_FILE}: not an exported model; export one with python -m marjara.convert")
    try:
        info = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MarjaraError(f"{config_path} is not valid JSON ({exc}); export the model again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise MarjaraError(f"{config_path} does not describe a MARJARA model (no \"format\": \"marjara\")")
    if info.get("format_version") != FORMAT_VERSION:
        raise MarjaraError(
            f"{config_path} has format_version {info.get('format_version')!r}; this MARJARA reads "
            f"{FORMAT_VERSION} (upgrade MARJARA)"
        )
    if info.get("dtype") not in DTYPES or not isinstance(info.get("model"), dict) or "tokenizer" not in info:
        raise MarjaraError(f"{config_path} lacks a valid model, tokenizer or dtype; export the model again")
    if not (path / WEIGHTS_FILE).is_file():
        raise MarjaraError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}; export the model again")
    return info

def weight_targets(model) -> dict[str, torch.Tensor]:
    """The model's tensors an export holds, by name (the tied output head left out)."""
    targets = dict(model.state_dict(keep_vars=True))
    if model.config.tie_embeddings:
        targets.pop(TIED_HEAD)
    return targets


def check_matches(targets: dict[str, torch.Tensor], shapes: dict[str, torch.Size], where: str, fix: str) -> None:
    """Strict loading: the same names with the same shapes, or one line naming the first differences."""
    missing, unexpected = sorted(set(targets) - set(shapes)), sorted(set(shapes) - set(targets))
    if missing or unexpected:
        raise MarjaraError(
            f"{where} does not match the model config (missing: {', '.join(missing[:3]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:3]) or 'none'}); {fix}"
        )
    for name, target in targets.items():
        if torch.Size(shapes[name]) != target.shape:
            raise MarjaraError(
                f"{where}: {name} has shape {list(shapes[name])}, the config needs {list(target.shape)}; {fix}"
            )


def set_dtype(model, device: str | torch.device, dtype: torch.dtype):
    """Move to device and cast parameters only: buffers (RoPE's inverse frequencies) stay fp32."""
    model.to(device)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model.eval()


def exported_model_config(info: dict) -> ModelConfig:
    """The ModelConfig of an export's config.json (see read_export_config)."""
    return ModelConfig.from_dict(info["model"]).replace(ep_size=1)


def load_weights(model, path: str | os.PathLike, info: dict, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
    """Fill `model` (built from exported_model_config(info)) strictly from the export in path;
    returns it on device, in eval mode, in dtype (None: as stored)."""
    from safetensors import SafetensorError, safe_open

    targets = weight_targets(model)
    weights = Path(path) / WEIGHTS_FILE
    fix = "export the model again"
    try:
        with safe_open(str(weights), framework="pt") as stored:
            check_matches(targets, {n: torch.Size(stored.get_slice(n).get_shape()) for n in stored.keys()},
                          str(weights), fix)
            with torch.no_grad():
                for name, target in targets.items():
                    target.copy_(stored.get_tensor(name))
    except SafetensorError as exc:
        raise MarjaraError(f"cannot read {weights} ({exc}); the file is truncated or corrupt, {fix}") from None
    return set_dtype(model, device, dtype or DTYPES[info["dtype"]])
