"""Find and open the files of a MARJARA DeepSpeed checkpoint: CKPT_DIR/latest, CKPT_DIR/<tag>/,
the tag's marjara.json, and every .pt file, read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from marjara.model.config import ModelConfig
from marjara.errors import MarjaraError

META_FILE = "marjara.json"
META_FORMAT_VERSION = 1
_TAG_STEP = re.compile(r"global_step(\d+)$")


@dataclass
class Checkpoint:
    root: Path  # CKPT_DIR
    tag: str
    path: Path  # CKPT_DIR/<tag>
    meta: dict  # marjara.json

    @property
    def config(self) -> ModelConfig:
        """The model config as trained (ep_size may be > 1)."""
        return ModelConfig.from_dict(self.meta["model_config"])

    @property
    def zero_stage(self) -> int:
        return int(self.meta["zero_stage"])

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    @property
    def half_precision(self) -> bool:
        return self.meta["dtype"] in ("bf16", "fp16")

    def file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise MarjaraError(
                f"checkpoint {self.path} is incomplete: {name} is missing (every rank writes its own files; "
                "the save was interrupted or a file was removed); convert another tag with --tag"
            )
        return path


def available_tags(root: Path) -> list[str]:
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p / META_FILE).is_file()]
    return sorted(tags, key=lambda t: (int(m.group(1)) if (m := _TAG_STEP.search(t)) else -1, t))


def open_checkpoint(root: str | Path, tag: str | None = None) -> Checkpoint:
    """The checkpoint under `root` named by `tag`, or by the `latest` file when tag is None."""
    root = Path(root)
    if not root.is_dir():
        raise MarjaraError(f"checkpoint folder {root} does not exist; pass the --out_dir a training run wrote")
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            tags = available_tags(root)
            hint = f"pick one with --tag: {', '.join(tags)}" if tags else "pass the --out_dir a training run wrote"
            raise MarjaraError(f"no DeepSpeed checkpoint in {root} (it has no 'latest' file); {hint}")
        tag = latest.read_text().strip()
        if not tag:
            raise MarjaraError(f"{latest} is empty; pick a checkpoint with --tag")
    path = root / tag
    if not path.is_dir():
        tags = available_tags(root)
        raise MarjaraError(
            f"checkpoint tag {tag!r} not found in {root}; "
            + (f"available tags: {', '.join(tags)}" if tags else "the folder holds no checkpoints")
        )
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise MarjaraError(
            f"{path} has no {META_FILE}: not a MARJARA checkpoint, or its save never finished "
            "(rank 0 writes it last); convert another tag with --tag"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MarjaraError(f"{meta_path} is not valid JSON ({exc}); the save was interrupted, use another --tag") from None
    if meta.get("format_version") != META_FORMAT_VERSION:
        raise MarjaraError(
            f"{meta_path} has format_version {meta.get('format_version')!r}; this MARJARA reads version "
            f"{META_FORMAT_VERSION} (upgrade MARJARA to read newer checkpoints)"
        )
    missing = [k for k in ("step", "model_config", "tokenizer", "zero_stage", "world_size", "dtype") if k not in meta]
    if missing:
        raise MarjaraError(f"{meta_path} lacks {', '.join(missing)}; it was not written by MARJARA's trainer")
    return Checkpoint(root=root, tag=tag, path=path, meta=meta)


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
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MarjaraError(
            f"cannot read {path}: the file is truncated or corrupt ({first_line[:160]}); "
            "convert another tag with --tag"
        ) from None
    except pickle.UnpicklingError as exc:
        raise MarjaraError(
            f"cannot read {path} safely: it holds objects other than tensors ({str(exc).splitlines()[0][:160]}); "
            "it was not written by the DeepSpeed version MARJARA supports"
        ) from None
