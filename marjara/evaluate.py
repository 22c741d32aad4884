"""Run lm-evaluation-harness on an exported model (or a checkpoint), through lm-eval's own CLI.

    python -m marjara.evaluate MODEL --tasks hellaswag,arc_easy [--include_path DIR] [--limit N]
        [--output_path results/] [--batch_size 16] [--num_fewshot K] [...any other lm-eval flag]

MODEL is the OUT_DIR of python -m marjara.convert, or a checkpoint folder (--tag, --ema select
what to convert). lm-eval cannot discover models from other packages, so this registers the
"marjara" model and then hands the command line to lm-eval. Needs the eval extra:
pip install -e '.[eval]' in the MARJARA checkout.
"""

from __future__ import annotations

import argparse
import sys

from marjara.errors import MarjaraError, cli_entry

INSTALL_HINT = "pip install -e '.[eval]' in the MARJARA checkout (or pip install lm-eval==0.4.13)"


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m marjara.evaluate", description=__doc__.splitlines()[0],
                                     epilog="Other flags go to lm-eval unchanged (see lm-eval run --help).")
    parser.add_argument("model", help="exported model folder (python -m marjara.convert) or checkpoint folder")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, or task YAML files")
    parser.add_argument("--tag", default=None, help="checkpoint folders only: the tag to convert (default: latest)")
    parser.add_argument("--ema", action="store_true", help="checkpoint folders only: use the EMA weights")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="weights' dtype (default: as exported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", default="16", help="sequences per forward pass")
    return parser.parse_known_args(argv)


def _include_path(rest: list[str]) -> str | None:
    for i, arg in enumerate(rest):
        if arg == "--include_path" and i + 1 < len(rest):
            return rest[i + 1]
        if arg.startswith("--include_path="):
            return arg.split("=", 1)[1]
    return None


def lm_eval_argv(args: argparse.Namespace, rest: list[str]) -> list[str]:
    clashing = [arg for arg in rest if arg.split("=")[0] in ("--model", "--model_args")]
    if clashing:
        raise MarjaraError(f"{clashing[0].split('=')[0]} is set by this command; give the model folder as MODEL "
                           "and use --tag, --ema, --dtype")
    if "," in str(args.model) or "=" in str(args.model):
        raise MarjaraError(f"the model path {args.model!r} contains ',' or '=', which lm-eval's --model_args cannot carry; "
                           "move or rename the folder")
    model_args = [f"pretrained={args.model}"]
    if args.tag:
        model_args.append(f"tag={args.tag}")
    if args.ema:
        model_args.append("ema=True")
    if args.dtype:
        model_args.append(f"dtype={args.dtype}")
    return ["lm-eval", "run", "--model", "marjara", "--model_args", ",".join(model_args), "--tasks", args.tasks,
            "--device", args.device, "--batch_size", str(args.batch_size), *rest]


@cli_entry
def main(argv=None) -> int:
    args, rest = parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MarjaraError(f"lm-evaluation-harness is not installed; {INSTALL_HINT}") from None
    from lm_eval.__main__ import cli_evaluate

    import marjara.eval.lm_eval_adapter  # noqa: F401  (registers the "marjara" model)
    from marjara.checkpoint.inference import resolve_model_path
    from marjara.compat.lm_eval import skip_builtin_task_index

    from marjara.eval.task_check import check_tasks

    # A bad model folder, model flag or task name gets our one-line error before lm-eval spends
    # seconds indexing tasks.
    resolve_model_path(args.model, args.tag, args.ema)
    argv_for_lm_eval = lm_eval_argv(args, rest)
    check_tasks(args.tasks, _include_path(rest))
    skip_builtin_task_index(args.tasks, _include_path(rest))
    saved, sys.argv = sys.argv, argv_for_lm_eval
    try:
        cli_evaluate()
    except ConnectionError as exc:  # a dataset of a task group, when the Hub cannot be reached
        raise MarjaraError(f"lm-eval could not get a task's dataset ({exc}); run it once online, or use local "
                           "tasks (--include_path)") from None
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
