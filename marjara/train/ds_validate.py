"""The DeepSpeed JSON checked before anything starts, each mistake as one line naming key and file.

DeepSpeed itself ignores unknown top-level keys, validates its blocks (`zero_optimization`, `fp16`,
`tensorboard`, ...) with pydantic models whose errors are tracebacks dozens of lines long, and
reads scalars such as `gradient_clipping` unchecked, so `"gradient_clipping": "abc"` only fails at
the first optimizer step. Here:

- `check_top_level` (when the file is read): every top-level key must be one DeepSpeed reads (the
  nearest known key is suggested), and the values MARJARA or DeepSpeed use must have their type
  and range: a key a MARJARA setting holds (`gradient_clipping`, `optimizer.params.lr`, ...) by
  that setting's own rule, the same one its flag is checked by (`"auto"` allowed: the flag fills it);
- `check_with_deepspeed` (once `"auto"` values are filled): the config goes through DeepSpeed's own
  `DeepSpeedConfig`, and its validation errors become one line.
"""

from __future__ import annotations

import copy
import difflib

from marjara.compat.deepspeed import config_keys_read, config_model_fields
from marjara.errors import MarjaraError
from marjara.rules import above, at_least, true_or_false
from marjara.train.settings import json_rules

AUTO = "auto"
# Read by DeepSpeed's engine outside DeepSpeedConfig (Ulysses sequence parallelism's mesh).
_ENGINE_KEYS = {"sequence_parallel_size", "data_parallel_size"}


# DeepSpeed's scalars that no MARJARA setting holds (those that one does are checked by its rule,
# from marjara/train/settings.py): key -> (rule, "auto" allowed because MARJARA fills it).
_SCALARS = {
    "train_batch_size": (at_least(1, integer=True), True),
    "steps_per_print": (at_least(1, integer=True), False),
    "gradient_predivide_factor": (above(0), False),
    "prescale_gradients": (true_or_false(), False),
    "wall_clock_breakdown": (true_or_false(), False),
    "memory_breakdown": (true_or_false(), False),
    "zero_allow_untested_optimizer": (true_or_false(), False),
    "sparse_gradients": (true_or_false(), False),
}
_BLOCKS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "activation_checkpointing",
           "tensorboard", "checkpoint", "flops_profiler", "comms_logger", "wandb", "csv_monitor", "data_types")


def known_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed reads: those its config reader looks up (read from the
    installed DeepSpeed, never a copy of it), and those its engine reads outside it."""
    return config_keys_read() | _ENGINE_KEYS


def _nearest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_top_level(config: dict, source: str) -> None:
    """Unknown top-level keys, mistyped scalars and non-object blocks: one MarjaraError line."""
    known = known_top_level_keys()
    for key in config:
        if key not in known:
            raise MarjaraError(f"{source}: unknown top-level key {key!r}{_nearest(key, known)} "
                               "(DeepSpeed would ignore it silently)")
    for key in _BLOCKS:
        if key in config and not isinstance(config[key], dict):
            raise MarjaraError(f"{source}: \"{key}\" must be a JSON object {{...}}, not {config[key]!r}")
    for key in ("optimizer", "scheduler"):
        params = config.get(key, {}).get("params", {})
        if not isinstance(params, dict):
            raise MarjaraError(f"{source}: \"{key}.params\" must be a JSON object {{...}}, not {params!r}")
    for key in ("bf16", "fp16"):
        enabled = config.get(key, {}).get("enabled", False)
        if not isinstance(enabled, bool) and enabled != AUTO:
            raise MarjaraError(f'{source}: "{key}.enabled" must be true, false or "{AUTO}", not {enabled!r}')
    rules = {key: rule for key, (rule, _) in _SCALARS.items()} | json_rules()
    for path, rule in rules.items():
        found, value = _lookup(config, path)
        auto_ok = _SCALARS.get(path, (None, True))[1]
        if found and not (rule.holds(value) or (auto_ok and value == AUTO)):
            allowed = f' (or "{AUTO}")' if auto_ok else ""
            raise MarjaraError(f'{source}: "{path}" must be {rule.described}{allowed}, not {value!r}'
                               + (f"; {rule.hint}" if rule.hint else ""))


def _lookup(config: dict, path: str) -> tuple[bool, object]:
    """(present, value) of a dotted path into the JSON."""
    node: object = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_with_deepspeed(config: dict, source: str) -> None:
    """Run DeepSpeed's own config classes over the resolved config; their first complaint becomes
    one line naming the key path and the file."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    trial = copy.deepcopy(config)
    trial.pop("train_batch_size", None)  # DeepSpeed derives it from its own view of the world size
    try:
        DeepSpeedConfig(trial)
    except ValidationError as exc:
        raise MarjaraError(f"{source}: {_describe_validation_error(exc, config)}") from None
    except Exception as exc:  # DeepSpeedConfigError, and asserts/TypeErrors of its getters
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MarjaraError(f"{source}: DeepSpeed refuses this config ({first}); fix the key it names") from None


def _describe_validation_error(exc, config: dict) -> str:
    error = exc.errors()[0]
    loc = tuple(str(part) for part in error["loc"])
    block = _block_holding(config, loc)
    path = ".".join(((block,) if block else ()) + loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        fields = config_model_fields(exc.title, loc[:-1])
        return f'unknown key "{path}"{_nearest(loc[-1], fields)} ({exc.title} does not read it)'
    value = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
    return f'"{path}": {message}{value}'


def _block_holding(config: dict, loc: tuple[str, ...]) -> str | None:
    """The top-level block whose contents the error path points into (None: the path starts at
    the top level, as DeepSpeed's monitor model's paths do)."""
    if _resolves(config, loc):
        return None
    for key, value in config.items():
        if isinstance(value, dict) and _resolves(value, loc):
            return key
    return None


def _resolves(node, loc: tuple[str, ...]) -> bool:
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return bool(loc)
