"""Task names checked before lm-eval starts: unknown names, and built-in tasks that cannot run offline.

lm-eval reports an unknown task only after indexing its ~230 task folders and loading the model,
as a traceback; a built-in task whose dataset is neither cached nor reachable fails after half a
minute of download retries, also as a traceback. Reading the task YAML files as text takes a
second or two and answers both questions up front:

- a name written in no task YAML (lm-eval's own, or --include_path's) is not a task;
- a task whose `dataset_path` is not in the Hugging Face caches, while the Hub does not answer,
  cannot run. When the Hub does not answer at all, lm-eval is also put in offline mode
  (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), so cached datasets load at once instead of after retries.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from marjara.errors import MarjaraError

_NAME = re.compile(r"""^\s*-?\s*["']?(?:task|group|tag)["']?\s*:\s*["']?([\w.\-]+)""", re.M)
_LIST_ITEM = re.compile(r"""^\s*-\s*["']?([\w.\-]+)["']?\s*$""", re.M)
_DATASET = re.compile(r"""^["']?dataset_path["']?\s*:\s*["']?([^\s"'#]+)""", re.M)
_INCLUDE = re.compile(r"""^["']?include["']?\s*:\s*["']?([^\s"'#]+)""", re.M)
_TASK_LINE = r"""^["']?task["']?\s*:\s*["']?{}["']?\s*$"""


def _task_folders(include_path: str | None) -> list[Path]:
    import lm_eval

    folders = [Path(lm_eval.__file__).parent / "tasks"]
    if include_path:
        folders.append(Path(include_path))
    return folders


def _yaml_files(folders: list[Path]):
    for folder in folders:
        if folder.is_file():
            yield folder
        elif folder.is_dir():
            yield from folder.rglob("*.yaml")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def check_tasks(tasks: str, include_path: str | None) -> None:
    """One MarjaraError line for an unknown task or a built-in task that cannot get its data."""
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    wanted = [n for n in names if not Path(n).is_file() and not any(c in n for c in "*?[")]
    if not wanted:
        return
    texts = {path: _read(path) for path in _yaml_files(_task_folders(include_path))}
    known: set[str] = set()
    for text in texts.values():
        known.update(_NAME.findall(text))
        known.update(_LIST_ITEM.findall(text))
    for name in wanted:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; lm-eval ls tasks lists them"
            where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (local YAML tasks need --include_path)"
            raise MarjaraError(f"--tasks: unknown task {name!r}, not in {where}{hint}")
    if _hub_reachable():
        return
    # Offline: cached datasets load without retries; an uncached one is named now.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    for name in wanted:
        dataset = _dataset_of(name, texts)
        if dataset and not _is_local(dataset) and not _cached(dataset):
            raise MarjaraError(
                f"--tasks: task {name!r} needs the dataset {dataset!r}, which is not in the Hugging Face cache, "
                "and the Hub cannot be reached; run it once online, or use local tasks (--include_path, "
                "dataset_path: json)"
            )


def _dataset_of(name: str, texts: dict[Path, str]) -> str | None:
    """The dataset_path of the YAML whose `task:` is `name` (or of the file it includes)."""
    line = re.compile(_TASK_LINE.format(re.escape(name)), re.M)
    for path, text in texts.items():
        if not line.search(text):
            continue
        found = _DATASET.search(text)
        if found:
            return found.group(1)
        include = _INCLUDE.search(text)
        if include:
            found = _DATASET.search(_read(path.parent / include.group(1)))
            if found:
                return found.group(1)
        return None
    return None


def _is_local(dataset: str) -> bool:
    return dataset in ("json", "csv", "parquet", "text", "arrow") or os.path.exists(dataset)


def _cached(dataset: str) -> bool:
    from datasets import config as datasets_config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    prepared = Path(datasets_config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    return hub.exists() or prepared.exists()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when the Hub is known unreachable: offline mode is set, or its host does not resolve
    or connect. Behind a proxy the direct connection says nothing, so the Hub is assumed reachable."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
