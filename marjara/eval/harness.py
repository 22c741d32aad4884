"""python -m marjara.evaluate's work: a MARJARA model handed to lm-eval's own CLI.

lm-eval cannot discover models from other packages, so the "marjara" model is registered here
(marjara/eval/lm_eval_adapter.py) before lm-eval's command line runs. A bad model folder, model
flag or task name gets MARJARA's one-line error before lm-eval spends seconds indexing tasks.
"""

from __future__ import annotations

import sys

from marjara.errors import MarjaraError

INSTALL_HINT = "pip install -e '.[eval]' in the MARJARA checkout (or pip install lm-eval==0.4.13)"


def include_path(rest: list[str]) -> str | None:
    """The --include_path among the flags passed on to lm-eval."""
    for i, arg in enumerate(rest):
        if arg == "--include_path" and i + 1 < len(rest):
            return rest[i + 1]
        if arg.startswith("--include_path="):
            return arg.split("=", 1)[1]
    return None


def lm_eval_argv(model: str, tasks: str, rest: list[str], tag: str | None, ema: bool, dtype: str | None,
                 device: str, batch_size: str) -> list[str]:
    clashing = [arg for arg in rest if arg.split("=")[0] in ("--model", "--model_args")]
    if clashing:
        raise MarjaraError(f"{clashing[0].split('=')[0]} is set by this command; give the model folder as MODEL "
                           "and use --tag, --ema, --dtype")
    if "," in str(model) or "=" in str(model):
        raise MarjaraError(f"the model path {model!r} contains ',' or '=', which lm-eval's --model_args cannot carry; "
                           "move or rename the folder")
    model_args = [f"pretrained={model}"]
    if tag:
        model_args.append(f"tag={tag}")
    if ema:
        model_args.append("ema=True")
    if dtype:
        model_args.append(f"dtype={dtype}")
    return ["lm-eval", "run", "--model", "marjara", "--model_args", ",".join(model_args), "--tasks", tasks,
            "--device", device, "--batch_size", str(batch_size), *rest]


def run_lm_eval(model: str, tasks: str, rest: list[str], tag: str | None = None, ema: bool = False,
                dtype: str | None = None, device: str = "cpu", batch_size: str = "16") -> None:
    """Check what MARJARA can check, then run lm-eval's CLI with `rest` (its own flags) appended."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MarjaraError(f"lm-evaluation-harness is not installed; {INSTALL_HINT}") from None
    from lm_eval.__main__ import cli_evaluate

    import marjara.eval.lm_eval_adapter  # noqa: F401  (registers the "marjara" model)
    from marjara.checkpoint.inference import resolve_model_path
    from marjara.compat.lm_eval import skip_builtin_task_index

    from marjara.eval.task_check import check_tasks

    resolve_model_path(model, tag, ema)
    argv_for_lm_eval = lm_eval_argv(model, tasks, rest, tag, ema, dtype, device, batch_size)
    check_tasks(tasks, include_path(rest))
    skip_builtin_task_index(tasks, include_path(rest))
    saved, sys.argv = sys.argv, argv_for_lm_eval
    try:
        cli_evaluate()
    except ConnectionError as exc:  # a dataset of a task group, when the Hub cannot be reached
        raise MarjaraError(f"lm-eval could not get a task's dataset ({exc}); run it once online, or use local "
                           "tasks (--include_path)") from None
    finally:
        sys.argv = saved
