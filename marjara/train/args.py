"""train.py's command line, generated from the settings' declaration (marjara/train/settings.py):
every flag with its help, the DeepSpeed JSON keys it shares, and its real default.

Flags default to argparse.SUPPRESS, so the parsed Namespace holds exactly the flags given; that is
what tells a flag given explicitly from one left out when the DeepSpeed JSON holds the setting too.
"""

from __future__ import annotations

import argparse
from typing import Any

from marjara.errors import MarjaraError
from marjara.train.config import TrainConfig
from marjara.train.settings import SECTIONS, Setting, settings

# Flags of the launchers, not settings of the run.
LAUNCHER_FLAGS = ("distributed", "local_rank", "deepspeed")


def _default_text(value: Any) -> str:
    if value is False:
        return "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def help_text(spec: Setting) -> str:
    """The declaration's help, the JSON keys it shares and the default, as --help prints them."""
    shares = f" (= {', '.join(spec.json)})" if spec.json else ""
    return f"{spec.help}{shares} (default: {spec.shown or _default_text(spec.default)})"


def build_parser() -> argparse.ArgumentParser:
    import deepspeed

    p = argparse.ArgumentParser(
        prog="train.py",
        description="Pre-train a MARJARA model through the DeepSpeed engine. With no arguments: the tiny "
        "preset on the built-in corpus (offline), a few minutes on a CPU. Where a flag and the DeepSpeed JSON "
        "hold the same setting (= KEY below), a flag left out takes the JSON's value and a flag that "
        "contradicts it stops the run.",
        allow_abbrev=False,
    )
    groups = {name: p.add_argument_group(title) for name, (_, title) in SECTIONS.items()}
    for name, spec in settings().items():
        kwargs = dict(spec.argparse)
        if spec.default is False:
            kwargs["action"] = "store_true"
        else:
            kwargs.setdefault("type", str if spec.default is None else type(spec.default))
            if spec.rule is not None and spec.rule.allowed is not None:
                kwargs["choices"] = list(spec.rule.allowed)
        kwargs["help"] = help_text(spec)
        groups[spec.section].add_argument(f"--{name}", default=argparse.SUPPRESS, **kwargs)

    launch = p.add_argument_group("launch")
    launch.add_argument("--distributed", action="store_true", default=argparse.SUPPRESS,
                        help="accepted for compatibility; the world always comes from the launcher's environment "
                        "(default: off)")
    launch.add_argument("--local_rank", type=int, default=argparse.SUPPRESS,
                        help="set by the deepspeed launcher (default: LOCAL_RANK from the environment)")
    deepspeed.add_config_arguments(p)
    _document_deepspeed_flags(p)
    return p


def _document_deepspeed_flags(parser: argparse.ArgumentParser) -> None:
    """deepspeed.add_config_arguments adds --deepspeed, --deepspeed_config and the deprecated
    --deepscale, --deepscale_config: hide the deprecated pair, and state defaults like every flag."""
    config_field = TrainConfig.__dataclass_fields__["deepspeed_config"].metadata
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        if action.dest in ("deepscale", "deepscale_config"):
            action.help = argparse.SUPPRESS
        elif action.dest == "deepspeed_config":
            action.help = f"{config_field['help']} (default: {config_field['shown']})"
        elif action.dest == "deepspeed":
            action.help = "accepted for DeepSpeed's scripts; MARJARA always trains through DeepSpeed (default: off)"


def parse_config(argv: list[str] | None = None, has_gpu: bool | None = None) -> TrainConfig:
    """train.py's flags (sys.argv when argv is None) and the JSON they name -> the run's TrainConfig
    (has_gpu: whether the run has a GPU, which picks the default precision; None: ask torch)."""
    return config_from_given(vars(build_parser().parse_args(argv)), has_gpu)


def config_from_given(given: dict[str, Any], has_gpu: bool | None = None) -> TrainConfig:
    """The TrainConfig of the flags a parser built on build_parser() holds (name -> value, only
    those given; the launchers' own flags are dropped). python -m marjara.plan resolves a training
    command line through this too."""
    given = {name: value for name, value in given.items() if name not in LAUNCHER_FLAGS + ("deepscale",)}
    if "deepscale_config" in given:
        raise MarjaraError("--deepscale_config is DeepSpeed's deprecated name; use --deepspeed_config")
    return TrainConfig.from_flags(given, has_gpu)


def train_flag_names() -> set[str]:
    """The destinations of every flag build_parser() adds (MARJARA's, the launchers', DeepSpeed's)."""
    return {action.dest for action in build_parser()._actions if action.dest != "help"}
