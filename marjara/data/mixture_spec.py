"""What `--data` names: nothing, one path, WEIGHT PATH pairs, or a mixture file (opened by source.py).

    --data data/web                              one source (see source.py for what a path may be)
    --data 0.7 data/web 0.3 data/code            a mixture; each source is named after its path
    --data mix.json                              a mixture with a name per source:
        {"sources": [{"name": "web", "weight": 0.7, "path": "data/web"},
                     {"name": "code", "weight": 0.3, "path": "data/code/train.bin"}]}

Weights are positive and normalised to sum to 1. Paths in a mixture file are relative to the
file's folder. Names appear in metric tags (val/loss/<name>), so they are letters, digits, and
`_ . -`. JSON only: YAML would need a parser MARJARA does not otherwise depend on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from marjara.errors import MarjaraError
from marjara.fileio import read_json_object

NAME = re.compile(r"[A-Za-z0-9_.-]+")
USAGE = "give one path, WEIGHT PATH pairs (--data 0.7 data/web 0.3 data/code) or a mixture file (--data mix.json)"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    weight: float
    path: str


def parse_data_arg(values: str | list[str] | list[SourceSpec] | None) -> str | list[SourceSpec] | None:
    """None (the built-in corpus), one path, or the sources of a mixture; MarjaraError if malformed."""
    if values is None:
        return None
    values = [values] if isinstance(values, str) else list(values)
    if values and all(isinstance(v, SourceSpec) for v in values):
        return _checked(values, "--data")
    if len(values) == 1:
        return read_mix_file(Path(values[0])) if values[0].endswith(".json") else values[0]
    if not values or len(values) % 2:
        raise MarjaraError(f"--data {' '.join(values)}: {USAGE}")
    specs = []
    for weight, path in zip(values[::2], values[1::2]):
        specs.append(SourceSpec(_name_of(path), _weight(weight, f"--data: weight {weight!r} of {path}"), path))
    return _checked(specs, "--data", "give them names in a mixture file (--data mix.json)")


def read_mix_file(path: Path) -> list[SourceSpec]:
    if not path.is_file():
        raise MarjaraError(f"--data {path}: no such mixture file; {USAGE}")
    example = '{"sources": [{"name": "web", "weight": 0.7, "path": "data/web"}, ...]}'
    shape = f"a mixture file holds one key, sources, e.g. {example}"
    spec = read_json_object(path, "fix the mixture file", shape, what="--data")
    if set(spec) != {"sources"} or not isinstance(spec["sources"], list):
        raise MarjaraError(f"--data {path}: {shape}")
    specs = []
    for i, entry in enumerate(spec["sources"]):
        where = f"--data {path}: source {i + 1}"
        if not isinstance(entry, dict) or set(entry) != {"name", "weight", "path"}:
            raise MarjaraError(f"{where} must have exactly the keys name, weight and path, e.g. {example}")
        if not isinstance(entry["name"], str) or not isinstance(entry["path"], str):
            raise MarjaraError(f"{where}: name and path must be strings")
        source_path = Path(entry["path"]).expanduser()
        if not source_path.is_absolute():
            source_path = path.parent / source_path
        specs.append(SourceSpec(entry["name"], _weight(entry["weight"], f"{where} ({entry['name']}): weight"),
                                str(source_path)))
    return _checked(specs, f"--data {path}", "give each source its own name")


def _weight(value, where: str) -> float:
    try:
        weight = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight) or weight <= 0:
        raise MarjaraError(f"{where} must be a positive number (got {value!r}); {USAGE}")
    return weight


def _name_of(path: str) -> str:
    """A source's name from its path: the folder's name, X for X.bin (the folder's for train.bin)."""
    p = Path(path.rstrip("/"))
    if p.suffix == ".bin" or p.suffix == ".txt":
        return p.parent.name if p.stem == "train" and p.parent.name else p.stem
    return p.name


def _checked(specs: list[SourceSpec], where: str, fix: str = "") -> list[SourceSpec]:
    if not specs:
        raise MarjaraError(f"{where}: the mixture has no sources; {USAGE}")
    seen = set()
    for spec in specs:
        if not NAME.fullmatch(spec.name):
            raise MarjaraError(f"{where}: source name {spec.name!r} may hold only letters, digits and _ . -")
        if spec.name in seen:
            raise MarjaraError(f"{where}: two sources are named {spec.name!r}; {fix or 'names must differ'}")
        seen.add(spec.name)
    return specs
