"""Atomic file and folder writes (an interrupted run never leaves something that looks complete),
and the one reader of JSON-object files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from marjara.errors import MarjaraError

# Temporary names say which process on which host owns them, so that the next run writing the
# same path can remove what a killed run left behind without touching a live run's files.
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _normal_mode(path: Path) -> None:
    """mkstemp/mkdtemp make private (0600/0700) entries; results get the umask's usual modes, so a
    lab's shared folders stay readable by the group."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` left by killed runs on this host; returns what went."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.tmp-{re.escape(_HOST)}-(\d+)-[A-Za-z0-9_]+$")
    removed = []
    for sibling in path.parent.iterdir() if path.parent.is_dir() else []:
        match = pattern.match(sibling.name)
        if match and not _alive(int(match.group(1))):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _normal_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        _normal_mode(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def filling_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Make `path` (if need be) for files written into it; if the writing fails and the folder was
    made here, remove it, so a failed export leaves no folder behind."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def read_json_object(path: str | os.PathLike, bad_json_fix: str, not_object_fix: str | None = None,
                     what: str = "") -> dict:
    """The JSON object in `path`; one-line errors (ending in the given fixes) for an unreadable
    file, invalid JSON or another JSON value. `what` names the file's role before its path
    ("DeepSpeed config ds.json is not valid JSON ...")."""
    where = f"{what} {path}" if what else str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MarjaraError(f"cannot read {where} ({exc.strerror or exc}); {bad_json_fix}") from None
    except UnicodeDecodeError as exc:
        raise MarjaraError(f"{where} is not valid JSON ({exc}); {bad_json_fix}") from None
    return parse_json_object(text, where, bad_json_fix, not_object_fix or bad_json_fix)


def parse_json_object(text: str, where: str, bad_json_fix: str, not_object_fix: str) -> dict:
    """read_json_object's check for JSON text already in hand; `where` names it in the errors."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MarjaraError(f"{where} is not valid JSON ({exc}); {bad_json_fix}") from None
    if not isinstance(value, dict):
        raise MarjaraError(f"{where} is not a JSON object; {not_object_fix}")
    return value


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
