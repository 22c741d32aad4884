"""Read the .pt files of a DeepSpeed checkpoint safely: torch.load(weights_only=True), memory-mapped.

Which files a checkpoint holds, and opening one, is marjara.checkpoint.format's business.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from marjara.compat.deepspeed import checkpoint_pickle_classes
from marjara.errors import MarjaraError, cause_in_brief


def load_file(path: Path, deepspeed_objects: bool = False) -> dict:
    """torch.load(weights_only=True, mmap=True): tensors stay on disk until touched, so only the
    parts a conversion reads take memory. `deepspeed_objects` allows the DeepSpeed classes optimizer
    files pickle (and nothing else)."""
    try:
        if deepspeed_objects:
            with torch.serialization.safe_globals(checkpoint_pickle_classes()):
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
