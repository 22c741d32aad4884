"""Checkpoints in DeepSpeed's layout plus MARJARA's own state, saved so a crash never corrupts
what `latest` names, and found again for --resume.

OUT_DIR/latest                        the tag of the newest complete checkpoint (written last, atomically)
OUT_DIR/global_stepN/...              DeepSpeed's files (engine.save_checkpoint)
OUT_DIR/global_stepN/marjara_rankR.pt each rank's RNG states and EMA share
OUT_DIR/global_stepN/marjara.json     step, samples consumed, model config, tokenizer, args (marks the
                                      checkpoint complete: written after every rank finished)
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from marjara.errors import MarjaraError
from marjara.fileio import atomic_path, write_json_atomic

META_FILE = "marjara.json"
LATEST = "latest"
FORMAT_VERSION = 1
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"marjara_rank{rank}.pt"


def rng_state() -> dict:
    """This rank's RNG states in types torch.load(weights_only=True) accepts."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save(engine, out_dir: str | Path, step: int, meta: dict, rank_state: dict, keep_last: int) -> Path:
    """Save on every rank (a collective); returns the tag folder."""
    out_dir = Path(out_dir)
    tag = tag_for(step)
    tag_dir = out_dir / tag
    if _rank() == 0 and tag_dir.exists():
        _stop_naming(out_dir, tag)  # re-saving a step: it is incomplete until we finish again
    _barrier()
    engine.save_checkpoint(str(out_dir), tag=tag, save_latest=False)
    with atomic_path(rank_file(tag_dir, _rank())) as tmp:
        torch.save(rank_state, tmp)
    _barrier()
    if _rank() == 0:
        write_json_atomic(tag_dir / META_FILE, {"format_version": FORMAT_VERSION, **meta})
        with atomic_path(out_dir / LATEST) as tmp:
            tmp.write_text(tag)
        rotate(out_dir, keep_last, keep=tag)
    _barrier()
    return tag_dir


def _stop_naming(out_dir: Path, tag: str) -> None:
    """Mark `tag` incomplete; if `latest` names it, point `latest` at the newest other complete
    checkpoint first (or remove it when there is none)."""
    latest = out_dir / LATEST
    if latest.is_file() and latest.read_text().strip() == tag:
        others = [t for _, t in complete_tags(out_dir) if t != tag]
        if others:
            with atomic_path(latest) as tmp:
                tmp.write_text(others[-1])
        else:
            latest.unlink()
    (out_dir / tag / META_FILE).unlink(missing_ok=True)


def complete_tags(out_dir: Path) -> list[tuple[int, str]]:
    found = []
    for child in out_dir.iterdir() if out_dir.is_dir() else []:
        match = _TAG.match(child.name)
        if match and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child.name))
    return sorted(found)


def rotate(out_dir: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest keep_last complete checkpoints; never `keep` (what latest names)."""
    if keep_last <= 0:
        return
    tags = [tag for _, tag in complete_tags(out_dir)]
    for tag in tags[:-keep_last]:
        if tag != keep:
            shutil.rmtree(out_dir / tag, ignore_errors=True)
            shutil.rmtree(out_dir / f"{tag}_universal", ignore_errors=True)


@dataclass
class ResumePoint:
    ckpt_dir: Path
    tag: str
    meta: dict

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag


def find_resume_point(path: str) -> ResumePoint:
    """--resume DIR (the tag `latest` names) or DIR/TAG, checked for completeness."""
    given = Path(path)
    if not given.exists():
        raise MarjaraError(f"--resume {path}: no such folder; pass a checkpoint folder (e.g. checkpoints/) or folder/TAG")
    if (given / LATEST).is_file():
        ckpt_dir, tag = given, (given / LATEST).read_text().strip()
    elif _TAG.match(given.name) or (given / META_FILE).exists():
        ckpt_dir, tag = given.parent, given.name
    else:
        raise MarjaraError(f"--resume {path}: no `latest` file and not a checkpoint tag folder; pass the folder train.py saved into")
    meta_path = ckpt_dir / tag / META_FILE
    if not meta_path.is_file():
        raise MarjaraError(
            f"checkpoint {ckpt_dir / tag} is incomplete or not MARJARA's (no {META_FILE}); resume from another tag"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise MarjaraError(f"{meta_path} is not valid JSON; the checkpoint is damaged, resume from another tag") from None
    return ResumePoint(ckpt_dir, tag, meta)


def universal_tag(point: ResumePoint) -> str:
    """Convert the checkpoint to DeepSpeed's universal format (once; rank 0) so that it loads on
    another world size, and return the converted tag."""
    tag = f"{point.tag}_universal"
    out = point.ckpt_dir / tag
    done = out / "marjara_universal.ok"
    error = None
    if _rank() == 0 and not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(point.tag_dir),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            error = f"converting {point.tag_dir} to a universal checkpoint failed ({last})"
        else:
            done.write_text("converted by deepspeed.checkpoint.ds_to_universal\n")
    # Every rank learns the outcome (the others would otherwise wait for rank 0 until the timeout).
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error:
        raise MarjaraError(error)
    return tag
