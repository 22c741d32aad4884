"""Checksums of a checkpoint tag's files: recorded when it is saved, checked before it is loaded.

`marjara.json` gets a manifest: every other file of the tag with its size and its xxHash3-64
(`xxh3_64`). xxh3 rather than zlib's crc32 or adler32: it catches the same accidental damage
(flipped bytes, truncation, a file swapped for another) and, streamed in 8 MiB blocks, runs
several times faster than crc32 (see bench/verify.py), faster than the disks the files come
from, so checking a multi-GB checkpoint costs about one read of it. It is not a defence against
deliberate tampering; nothing here is.

Both directions split the work over the ranks: each file is hashed by exactly one rank (the
largest files first, each to the rank with the least bytes so far), so a checkpoint is read
once in all, not once per rank. Sizes and presence, which cost no reading, every rank checks
itself. The ranks agree on the outcome through one all-reduce, so every rank raises the same
error (rank 0 prints it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from marjara.checkpoint.format import META_FILE, Checkpoint, read_meta, tag_step
from marjara.checkpoint.locate import complete_tags
from marjara.errors import AgreedError, MarjaraError

ALGORITHM = "xxh3_64"
_BLOCK = 8 << 20
_MISSING, _WRONG_SIZE, _WRONG_SUM = 1, 2, 3


def digest_file(path: Path) -> int:
    """xxh3_64 of a file's bytes, streamed."""
    import xxhash

    hasher = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        block = bytearray(_BLOCK)
        view = memoryview(block)
        while n := f.readinto(block):
            hasher.update(view[:n])
    return hasher.intdigest()


def tag_files(tag_dir: Path) -> list[str]:
    """Every file of the tag (relative paths, sorted) but marjara.json, which holds the manifest."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != META_FILE)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(sizes: list[int], rank: int, world: int) -> list[int]:
    """Indices of the files this rank hashes: largest first, each to the least-loaded rank."""
    load = [0] * world
    mine = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += sizes[index]
        if owner == rank:
            mine.append(index)
    return mine


def _reduce(values: torch.Tensor, op: str) -> torch.Tensor:
    """The reduction over the ranks, back on the host (through marjara.distributed: on the
    accelerator's device, at every world size)."""
    from marjara import distributed

    return distributed.all_reduce(values, op=op).cpu()


def build_manifest(tag_dir: Path) -> dict:
    """{"algorithm", "files": {name: {"bytes", "xxh3_64"}}} of a saved tag; a collective."""
    rank, world = _world()
    names = tag_files(tag_dir)
    sizes = [(tag_dir / name).stat().st_size for name in names]
    sums = torch.zeros(len(names), dtype=torch.int64)
    for index in _share(sizes, rank, world):
        sums[index] = _signed(digest_file(tag_dir / names[index]))
    sums = _reduce(sums, "sum")
    return {"algorithm": ALGORITHM, "files": {
        name: {"bytes": size, ALGORITHM: f"{int(value) & (2**64 - 1):016x}"}
        for name, size, value in zip(names, sizes, sums.tolist())}}


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def find_damage(tag_dir: Path, manifest: dict) -> str | None:
    """The first problem with the tag's files as one phrase (None: all intact); a collective.

    Missing files and wrong sizes are found by every rank from the file system alone; contents
    are hashed once in all, each file by one rank."""
    if manifest.get("algorithm") != ALGORITHM:
        return f"its manifest uses checksum {manifest.get('algorithm')!r}, which this MARJARA cannot check"
    rank, world = _world()
    names = sorted(manifest["files"])
    expected = [manifest["files"][name]["bytes"] for name in names]
    status = torch.zeros(len(names), dtype=torch.int64)
    for index, name in enumerate(names):
        path = tag_dir / name
        if not path.is_file():
            status[index] = _MISSING
        elif path.stat().st_size != expected[index]:
            status[index] = _WRONG_SIZE
    for index in _share(expected, rank, world):
        if status[index] == 0 and f"{digest_file(tag_dir / names[index]):016x}" != manifest["files"][names[index]][ALGORITHM]:
            status[index] = _WRONG_SUM
    status = _reduce(status, "max")
    for index, name in enumerate(names):
        code = int(status[index])
        if code == _MISSING:
            return f"{name} is missing"
        if code == _WRONG_SIZE:
            actual = (tag_dir / name).stat().st_size
            return f"{name} has {actual} bytes, {expected[index]} were saved (truncated or replaced)"
        if code == _WRONG_SUM:
            return f"{name} does not match its {ALGORITHM} checksum (its bytes changed after the save)"
    return None


def check_checkpoint(ckpt: Checkpoint, use_instead: Callable[[Checkpoint], str]) -> bool:
    """Raise AgreedError naming the damaged or missing file, and the newest intact earlier tag
    (`use_instead` words how to use it: --tag T, --resume DIR/T); a collective. Returns False for
    a checkpoint saved without a manifest (format_version 1), which cannot be checked."""
    if ckpt.manifest is None:
        return False
    problem = find_damage(ckpt.tag_dir, ckpt.manifest)
    if problem is None:
        return True
    instead = newest_intact_before(ckpt)
    advice = (f"use the newest intact earlier checkpoint: {use_instead(instead)}" if instead is not None
              else "no earlier intact checkpoint is left in this folder")
    raise AgreedError(f"checkpoint {ckpt.tag_dir} is damaged: {problem}; {advice}")


def newest_intact_before(ckpt: Checkpoint) -> Checkpoint | None:
    """The newest complete tag older than ckpt's whose files all match its manifest (a collective)."""
    step = tag_step(ckpt.tag)
    for tag in reversed(complete_tags(ckpt.ckpt_dir)):
        if tag == ckpt.tag or (step is not None and (tag_step(tag) is None or tag_step(tag) >= step)):
            continue
        try:
            candidate = Checkpoint(ckpt.ckpt_dir, tag, read_meta(ckpt.ckpt_dir / tag, ""))
        except MarjaraError:
            continue
        if candidate.manifest is not None and find_damage(candidate.tag_dir, candidate.manifest) is None:
            return candidate
    return None
