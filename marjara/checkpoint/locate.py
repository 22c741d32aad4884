"""Finding a checkpoint on disk: the tags of a folder, the one `latest` names, and the opened
Checkpoint for convert/generate/evaluate (errors name --tag) or for --resume."""

from __future__ import annotations

from pathlib import Path

from marjara.checkpoint.format import LATEST, META_FILE, Checkpoint, read_meta, tag_step
from marjara.errors import MarjaraError


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags under ckpt_dir whose save finished (they have marjara.json), oldest step first."""
    found = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and (p / META_FILE).is_file()] if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda tag: (tag_step(tag) if tag_step(tag) is not None else -1, tag))


def is_checkpoint_dir(path: Path) -> bool:
    """A folder a training run saved into (it has `latest`)."""
    return (path / LATEST).is_file()


def is_tag_dir(path: Path) -> bool:
    return tag_step(path.name) is not None or (path / META_FILE).exists()


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def open_checkpoint(ckpt_dir: str | Path, tag: str | None = None) -> Checkpoint:
    """The checkpoint under ckpt_dir named by tag, or by `latest` when tag is None (for convert,
    generate and evaluate: errors point at --tag)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise MarjaraError(f"checkpoint folder {ckpt_dir} does not exist; pass the --out_dir a training run wrote")
    if tag is None:
        if not is_checkpoint_dir(ckpt_dir):
            tags = complete_tags(ckpt_dir)
            hint = f"pick one with --tag: {', '.join(tags)}" if tags else "pass the --out_dir a training run wrote"
            raise MarjaraError(f"no DeepSpeed checkpoint in {ckpt_dir} (it has no '{LATEST}' file); {hint}")
        tag = latest_tag(ckpt_dir)
        if not tag:
            raise MarjaraError(f"{ckpt_dir / LATEST} is empty; pick a checkpoint with --tag")
    if not (ckpt_dir / tag).is_dir():
        tags = complete_tags(ckpt_dir)
        raise MarjaraError(
            f"checkpoint tag {tag!r} not found in {ckpt_dir}; "
            + (f"available tags: {', '.join(tags)}" if tags else "the folder holds no checkpoints")
        )
    return Checkpoint(ckpt_dir, tag, read_meta(ckpt_dir / tag, "use another --tag"))


def find_resume_point(path: str) -> Checkpoint:
    """--resume DIR (the tag `latest` names) or DIR/TAG, checked for completeness and version."""
    given = Path(path)
    if not given.exists():
        raise MarjaraError(f"--resume {path}: no such folder; pass a checkpoint folder (e.g. checkpoints/) or folder/TAG")
    if is_checkpoint_dir(given):
        ckpt_dir, tag = given, latest_tag(given)
    elif is_tag_dir(given):
        ckpt_dir, tag = given.parent, given.name
    else:
        raise MarjaraError(f"--resume {path}: no `{LATEST}` file and not a checkpoint tag folder; "
                           "pass the folder train.py saved into")
    return Checkpoint(ckpt_dir, tag, read_meta(ckpt_dir / tag, "resume from another tag"))
