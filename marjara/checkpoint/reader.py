"""Read the .pt files of a DeepSpeed checkpoint safely: torch.load(weights_only=True), memory-mapped.

Which files a checkpoint holds, and opening one, is marjara.checkpoint.format's business.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from marjara.errors import MarjaraError, cause_in_brief


def _deepspeed_globals() -> list:
    """The three DeepSpeed classes that ZeRO optimizer files pickle besides tensors and containers.

    Allowing exactly these lets every DeepSpeed 0.19 checkpoint file be read with
    torch.load(weights_only=True); no file needs weights_only=False.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_file(path: Path, deepspeed_objects: bool = False) -> dict:
    """torch.load(weights_only=True, mmap=True): tensors stay on disk until touched, so only the
    parts a conversion reads take memory. `deepspeed_objects` allows the classes optimizer files use."""
    try:
        if deepspeed_objects:
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise MarjaraError(
            f"cannot read {path}: the file is truncated or corrupt ({cause_in_brief(exc)}); "
            "convert another tag with --tag"
        ) from None
    except pickle.UnpicklingError as exc:
        raise MarjaraError(
            f"cannot read {path} safely: it holds objects other than tensors ({cause_in_brief(exc)}); "
            "it was not written by the DeepSpeed version MARJARA supports"
        ) from None
