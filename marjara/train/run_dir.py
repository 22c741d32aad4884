"""What a run folder holds of an earlier run, clearing it, and trimming the metrics of one resumed
(the decision, with every rank agreeing, is the Checkpointer's claim()).

A fresh run (no --resume) into a folder that holds another run's checkpoints, metrics or events
stops with one line: continue that run with --resume, pick another --out_dir, or --overwrite,
which removes the old run's checkpoints, `latest`, metrics.jsonl and tensorboard events first so
that nothing of it mixes with the new one. A resumed run continues the folder's files: records
after the step it resumes from (those of an abandoned continuation) are dropped from
metrics.jsonl, and tensorboard is told to purge them from its view (`purge_step`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from marjara.checkpoint.format import LATEST, UNIVERSAL_SUFFIX, tag_step
from marjara.errors import MarjaraError
from marjara.fileio import atomic_path

METRICS_FILE = "metrics.jsonl"


def _is_tag(name: str) -> bool:
    return tag_step(name.removesuffix(UNIVERSAL_SUFFIX)) is not None


def previous_run(out_dir: Path, log_dir: Path) -> list[str]:
    """What of an earlier run the folder holds (empty: nothing)."""
    found = []
    if (out_dir / LATEST).is_file():
        found.append(LATEST)
    tags = sorted(p.name for p in out_dir.iterdir() if p.is_dir() and _is_tag(p.name)) if out_dir.is_dir() else []
    if tags:
        found.append(f"{len(tags)} checkpoint tag(s) ({tags[-1]} ...)")
    metrics = out_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    if log_dir.is_dir() and any(log_dir.rglob("events.out.tfevents.*")):
        found.append(f"tensorboard events in {log_dir}")
    return found


def refuse(out_dir: str, found: list[str]) -> MarjaraError:
    return MarjaraError(
        f"--out_dir {out_dir} holds another run ({', '.join(found)}); continue it with --resume {out_dir}, "
        "choose another --out_dir, or pass --overwrite to delete it"
    )


def clear(out_dir: str, log_dir: str) -> None:
    """Delete a previous run's checkpoints, `latest`, metrics and events (other files stay)."""
    out, logs = Path(out_dir), Path(log_dir)
    (out / LATEST).unlink(missing_ok=True)  # first: the folder never names a tag being deleted
    for child in out.iterdir() if out.is_dir() else []:
        if child.is_dir() and _is_tag(child.name):
            shutil.rmtree(child)
    (out / METRICS_FILE).unlink(missing_ok=True)
    if logs.is_dir():
        for events in logs.rglob("events.out.tfevents.*"):
            events.unlink()


def continue_metrics(out_dir: str, resume_step: int) -> None:
    """Keep the records of metrics.jsonl up to the step a run resumes from (rank 0)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resume_step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
