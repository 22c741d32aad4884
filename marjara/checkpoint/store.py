"""Saving checkpoints (the layout is marjara.checkpoint.format's) so that a crash never corrupts
what `latest` names: DeepSpeed's files and every rank's own file first, marjara.json after every
rank finished, `latest` last; rotation, and the universal copy a resume on another world size loads.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from marjara import distributed
from marjara.checkpoint.format import (LATEST, META_FILE, UNIVERSAL_DONE, CheckpointMeta, rank_file_name, tag_for,
                                       universal_tag_for)
from marjara.checkpoint.locate import complete_tags
from marjara.checkpoint.verify import build_manifest
from marjara.errors import MarjaraError
from marjara.fileio import atomic_path, write_json_atomic


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
    return distributed.rank()


def _barrier() -> None:
    distributed.barrier()


def save(engine, out_dir: str | Path, meta: CheckpointMeta, rank_state: dict, keep_last: int) -> Path:
    """Save on every rank (a collective); returns the tag folder."""
    out_dir = Path(out_dir)
    tag = tag_for(meta.step)
    tag_dir = out_dir / tag
    if _rank() == 0 and tag_dir.exists():
        _stop_naming(out_dir, tag)  # re-saving a step: it is incomplete until we finish again
    _barrier()
    engine.save_checkpoint(str(out_dir), tag=tag, save_latest=False)
    with atomic_path(tag_dir / rank_file_name(_rank())) as tmp:
        torch.save(rank_state, tmp)
    _barrier()
    # Every file is written (and still in the page cache): hash each once, on one rank.
    meta = replace(meta, files=build_manifest(tag_dir))
    if _rank() == 0:
        write_json_atomic(tag_dir / META_FILE, meta.to_json())
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
        others = [t for t in complete_tags(out_dir) if t != tag]
        if others:
            with atomic_path(latest) as tmp:
                tmp.write_text(others[-1])
        else:
            latest.unlink()
    (out_dir / tag / META_FILE).unlink(missing_ok=True)


def rotate(out_dir: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest keep_last complete checkpoints; never `keep` (what latest names)."""
    if keep_last <= 0:
        return
    for tag in complete_tags(out_dir)[:-keep_last]:
        if tag != keep:
            shutil.rmtree(out_dir / tag, ignore_errors=True)
            shutil.rmtree(out_dir / universal_tag_for(tag), ignore_errors=True)


def universal_tag(ckpt_dir: Path, source_tag: str) -> str:
    """Convert checkpoint ckpt_dir/source_tag to DeepSpeed's universal format (once; rank 0) so that
    it loads on another world size, and return the converted tag."""
    tag, tag_dir = universal_tag_for(source_tag), ckpt_dir / source_tag
    out = ckpt_dir / tag
    done = out / UNIVERSAL_DONE
    error = None
    if _rank() == 0 and not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
               "--inject_missing_state"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            error = f"converting {tag_dir} to a universal checkpoint failed ({last})"
        else:
            done.write_text("converted by deepspeed.checkpoint.ds_to_universal\n")
    # Every rank learns the outcome (the others would otherwise wait for rank 0 until the timeout).
    error = distributed.broadcast_object(error, src=0)
    if error:
        raise MarjaraError(error)
    return tag
